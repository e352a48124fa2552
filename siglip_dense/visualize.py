"""Pictures people look at: segmentation overlays and prediction-vs-truth grids."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw


def palette(num_classes: int, seed: int = 3) -> np.ndarray:
    """A fixed, well-spread colour per class (index ``num_classes`` = ignore, drawn black)."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(40, 256, size=(num_classes + 1, 3), dtype=np.uint8)
    colours[num_classes] = 0
    return colours


def colorize(labels: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    lab = labels.astype(np.int64).copy()
    lab[(lab == ignore_index) | (lab < 0) | (lab >= num_classes)] = num_classes
    return palette(num_classes)[lab]


def denormalize(image: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """3×H×W normalised tensor -> H×W×3 uint8."""
    m = torch.tensor(mean, dtype=image.dtype).view(3, 1, 1)
    s = torch.tensor(std, dtype=image.dtype).view(3, 1, 1)
    img = (image.cpu() * s + m).clamp(0, 1)
    return (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def overlay(image: np.ndarray, labels: np.ndarray, num_classes: int, alpha: float = 0.5) -> np.ndarray:
    colour = colorize(labels, num_classes).astype(np.float32)
    return (image.astype(np.float32) * (1 - alpha) + colour * alpha).round().astype(np.uint8)


def save_segmentation_grid(task: Any, datamodule: Any, path: Path, num: int = 6) -> Path:
    """Rows of [image | ground truth | prediction] for the first ``num`` validation images."""
    ds = datamodule.val_dataset if hasattr(datamodule, "val_dataset") else None
    if ds is None:
        datamodule.setup("validate")
        ds = datamodule.val_dataset
    task.eval()
    rows = []
    k = task.num_classes
    for i in range(min(num, len(ds))):
        sample = ds[i]
        image = sample["image"]
        pred = task.predict_labels(image[None].to(task.device))[0].cpu().numpy()
        rgb = denormalize(image, task.mean, task.std)
        gt = colorize(sample["mask"].numpy(), k)
        rows.append(np.concatenate([rgb, gt, colorize(pred, k)], axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0))) for r in rows]
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    header = Image.new("RGB", (grid.width, 18), (255, 255, 255))
    draw = ImageDraw.Draw(header)
    third = rows[0].shape[1] // 3
    for j, title in enumerate(("image", "ground truth", "prediction")):
        draw.text((j * third + 4, 3), title, fill=(0, 0, 0))
    out = Image.new("RGB", (grid.width, grid.height + header.height))
    out.paste(header, (0, 0))
    out.paste(grid, (0, header.height))
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path)
    return path


def save_segmentation_overlay(
    image: np.ndarray, labels: np.ndarray, class_names: list[str], path: Path, alpha: float = 0.5
) -> Path:
    """The image with its label map blended in, and a legend of the classes present (largest first)."""
    k = len(class_names)
    blended = overlay(image, labels, k, alpha)
    ids, counts = np.unique(labels[(labels >= 0) & (labels < k)], return_counts=True)
    present = [int(i) for i in ids[np.argsort(-counts)]]
    colours = palette(k)
    row_h, width = 16, 180
    legend = Image.new("RGB", (width, max(blended.shape[0], row_h * len(present) + 4)), (255, 255, 255))
    draw = ImageDraw.Draw(legend)
    for n, c in enumerate(present):
        y = 2 + n * row_h
        draw.rectangle([4, y, 16, y + 12], fill=tuple(int(v) for v in colours[c]))
        draw.text((22, y), class_names[c], fill=(0, 0, 0))
    canvas = Image.new("RGB", (blended.shape[1] + width, legend.height), (255, 255, 255))
    canvas.paste(Image.fromarray(blended), (0, 0))
    canvas.paste(legend, (blended.shape[1], 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
