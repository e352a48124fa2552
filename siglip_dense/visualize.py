"""Pictures people look at: segmentation overlays and prediction-vs-truth grids, each with a legend
of the class colours it shows (:func:`with_legend`)."""

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


LEGEND_ROW = 16  # legend row height in pixels: a 12-px swatch and the class name


def legend_layout(
    class_ids: list[int], class_names: list[str], width: int
) -> tuple[list[tuple[int, int, int]], int]:
    """Where each legend entry goes: ``[(class id, x, y)]`` of its swatch's top-left corner, entries
    flowing left to right in rows ``LEGEND_ROW`` high within ``width``, and the strip's height."""
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    x, y, out = 4, 2, []
    for c in class_ids:
        entry = 22 + int(draw.textlength(class_names[c])) + 12
        if x > 4 and x + entry > width:
            x, y = 4, y + LEGEND_ROW
        out.append((int(c), x, y))
        x += entry
    return out, (y + LEGEND_ROW + 2 if out else 0)


def legend_strip(class_ids: list[int], class_names: list[str], width: int) -> Image.Image | None:
    """A white strip naming ``class_ids`` next to their :func:`palette` colours (None: no classes)."""
    entries, height = legend_layout(class_ids, class_names, width)
    if not entries:
        return None
    colours = palette(len(class_names))
    strip = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for c, x, y in entries:
        draw.rectangle([x, y, x + 11, y + 11], fill=tuple(int(v) for v in colours[c]))
        draw.text((x + 18, y), class_names[c], fill=(0, 0, 0))
    return strip


def with_legend(picture: Image.Image, class_ids: list[int], class_names: list[str]) -> Image.Image:
    """``picture`` with a legend strip of ``class_ids`` (sorted, deduplicated) appended below."""
    ids = sorted({int(c) for c in class_ids if 0 <= int(c) < len(class_names)})
    strip = legend_strip(ids, class_names, picture.width)
    if strip is None:
        return picture
    out = Image.new("RGB", (picture.width, picture.height + strip.height), (255, 255, 255))
    out.paste(picture, (0, 0))
    out.paste(strip, (0, picture.height))
    return out


def present_classes(label_maps: list[np.ndarray], num_classes: int) -> list[int]:
    """Sorted class indices occurring in any of ``label_maps`` (ignore values and negatives left out)."""
    found: set[int] = set()
    for m in label_maps:
        m = np.asarray(m)
        found |= {int(v) for v in np.unique(m[(m >= 0) & (m < num_classes)])}
    return sorted(found)


def save_segmentation_grid(task: Any, datamodule: Any, path: Path, num: int = 6) -> Path:
    """Rows of [image | ground truth | prediction] for the first ``num`` validation images."""
    ds = datamodule.val_dataset if hasattr(datamodule, "val_dataset") else None
    if ds is None:
        datamodule.setup("validate")
        ds = datamodule.val_dataset
    task.eval()
    panels, maps = [], []
    k = task.num_classes
    for i in range(min(num, len(ds))):
        sample = ds[i]
        image = sample["image"]
        pred = task.predict_labels(image[None].to(task.device))[0].cpu().numpy()
        rgb = denormalize(image, task.mean, task.std)
        maps += [sample["mask"].numpy(), pred]
        panels.append((rgb, colorize(sample["mask"].numpy(), k), colorize(pred, k)))
    # every column as wide as the widest image, so the titles sit above their column in every row
    col = max(p[0].shape[1] for p in panels) + 4
    rows = [
        np.pad(
            np.concatenate([np.pad(x, ((0, 0), (0, col - x.shape[1]), (0, 0))) for x in row], 1),
            ((0, 4), (0, 0), (0, 0)),
        )
        for row in panels
    ]
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    header = Image.new("RGB", (grid.width, 18), (255, 255, 255))
    draw = ImageDraw.Draw(header)
    for j, title in enumerate(("image", "ground truth", "prediction")):
        draw.text((j * col + 4, 3), title, fill=(0, 0, 0))
    out = Image.new("RGB", (grid.width, grid.height + header.height))
    out.paste(header, (0, 0))
    out.paste(grid, (0, header.height))
    out = with_legend(out, present_classes(maps, k), list(task.class_names))
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path)
    return path


# ---------------------------------------------------------------------------------------------
# depth
# ---------------------------------------------------------------------------------------------
def colorize_depth(
    depth: np.ndarray,
    vmin: float,
    vmax: float,
    cmap: str = "turbo",
    invalid: tuple[int, int, int] = (0, 0, 0),
) -> np.ndarray:
    """H×W metres -> H×W×3 uint8 on a fixed ``[vmin, vmax]`` range (so panels are comparable);
    pixels that are not finite or <= 0 (no measurement) are drawn in ``invalid``."""
    import matplotlib

    d = np.asarray(depth, dtype=np.float64)
    valid = np.isfinite(d) & (d > 0)
    t = np.clip((np.where(valid, d, vmin) - vmin) / max(vmax - vmin, 1e-9), 0.0, 1.0)
    rgb = (matplotlib.colormaps[cmap](t)[..., :3] * 255).round().astype(np.uint8)
    rgb[~valid] = invalid
    return rgb


def depth_scale_bar(
    width: int, vmin: float, vmax: float, cmap: str = "turbo", height: int = 12, ticks: int = 5
) -> Image.Image:
    """A horizontal colour bar with tick labels in metres, to read depths off the panels."""
    ramp = np.linspace(vmin, vmax, max(width - 16, 2))[None].repeat(height, axis=0)
    bar = colorize_depth(np.maximum(ramp, 1e-9), vmin, vmax, cmap)
    out = Image.new("RGB", (width, height + 16), (255, 255, 255))
    out.paste(Image.fromarray(bar), (8, 0))
    draw = ImageDraw.Draw(out)
    for k in range(ticks):
        frac = k / max(ticks - 1, 1)
        x = 8 + int(frac * (bar.shape[1] - 1))
        draw.line([(x, height), (x, height + 3)], fill=(0, 0, 0))
        label = f"{vmin + frac * (vmax - vmin):.1f} m"
        draw.text((min(max(x - 12, 0), width - 40), height + 4), label, fill=(0, 0, 0))
    return out


def save_depth_grid(task: Any, datamodule: Any, path: Path, num: int = 6, cmap: str = "turbo") -> Path:
    """Rows of [image | ground truth | prediction] on one colour range, with a scale bar in metres."""
    ds = getattr(datamodule, "val_dataset", None)
    if ds is None:
        datamodule.setup("validate")
        ds = datamodule.val_dataset
    task.eval()
    samples = []
    for i in range(min(num, len(ds))):
        sample = ds[i]
        image = sample["image"]
        pred = task.predict_depth(image[None].to(task.device))[0].float().cpu().numpy()
        gt = sample["depth"].float().cpu().numpy()
        samples.append((denormalize(image, task.mean, task.std), gt, pred))
    gts = [g[(g > task.min_depth) & (g < task.max_depth)] for _, g, _ in samples]
    gts = [g for g in gts if g.size]
    vmin = 0.0
    vmax = float(max(g.max() for g in gts)) if gts else float(task.max_depth)
    rows = [
        np.concatenate(
            [rgb, colorize_depth(gt, vmin, vmax, cmap), colorize_depth(pred, vmin, vmax, cmap)], axis=1
        )
        for rgb, gt, pred in samples
    ]
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0))) for r in rows]
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    header = Image.new("RGB", (grid.width, 18), (255, 255, 255))
    draw = ImageDraw.Draw(header)
    third = samples[0][0].shape[1] if samples else grid.width // 3
    for j, title in enumerate(("image", "ground truth (black: invalid)", "prediction")):
        draw.text((j * third + 4, 3), title, fill=(0, 0, 0))
    bar = depth_scale_bar(min(grid.width, 480), vmin, vmax, cmap)
    out = Image.new("RGB", (grid.width, header.height + grid.height + bar.height), (255, 255, 255))
    out.paste(header, (0, 0))
    out.paste(grid, (0, header.height))
    out.paste(bar, (0, header.height + grid.height))
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path)
    return path


# -- detection / instance segmentation ------------------------------------------------------------------
def draw_detections(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    scores: np.ndarray | None = None,
    masks: np.ndarray | None = None,
    alpha: float = 0.45,
    legend: bool = False,
) -> np.ndarray:
    """Boxes (xyxy pixels), optional binary masks, class names and scores drawn on an RGB image;
    ``legend``: a strip of the classes drawn appended below (the picture grows by its height)."""
    k = len(class_names)
    colours = palette(k)
    out = image.astype(np.float32).copy()
    if masks is not None:
        for m, lab in zip(masks, labels):
            m = m.astype(bool)
            out[m] = out[m] * (1 - alpha) + colours[int(lab) % k].astype(np.float32) * alpha
    pil = Image.fromarray(out.round().clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for i, (box, lab) in enumerate(zip(boxes, labels)):
        colour = tuple(int(c) for c in colours[int(lab) % k])
        x0, y0, x1, y1 = (float(v) for v in box)
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=2)
        text = class_names[int(lab)] if 0 <= int(lab) < k else str(int(lab))
        if scores is not None:
            text += f" {float(scores[i]):.2f}"
        draw.text((x0 + 2, max(y0 - 11, 0)), text, fill=colour)
    if legend:
        pil = with_legend(pil, [int(v) for v in labels], class_names)
    return np.asarray(pil)


def save_detection_grid(task: Any, datamodule: Any, path: Path, num: int = 6) -> Path:
    """Rows of [ground truth | prediction (score ≥ task.vis_score_threshold)] for validation images."""
    ds = getattr(datamodule, "val_dataset", None)
    if ds is None:
        datamodule.setup("validate")
        ds = datamodule.val_dataset
    task.eval()
    names = list(task.class_names)
    thr = float(getattr(task, "vis_score_threshold", 0.5))
    rows, drawn = [], []
    for i in range(min(num, len(ds))):
        sample = ds[i]
        image = sample["image"]
        rgb = denormalize(image, task.mean, task.std)
        tgt = sample["target"]
        drawn += [int(v) for v in tgt["labels"]]
        gt_masks = tgt["masks"].numpy() if "masks" in tgt else None
        gt = draw_detections(rgb, tgt["boxes"].numpy(), tgt["labels"].numpy(), names, masks=gt_masks)
        out = task.detect([image])[0]
        keep = (out["scores"] >= thr).cpu()
        pm = None
        if "masks" in out:
            pm = (out["masks"][:, 0].cpu()[keep] > getattr(task, "mask_threshold", 0.5)).numpy()
        pred = draw_detections(
            rgb,
            out["boxes"].cpu()[keep].numpy(),
            out["labels"].cpu()[keep].numpy(),
            names,
            scores=out["scores"].cpu()[keep].numpy(),
            masks=pm,
        )
        drawn += [int(v) for v in out["labels"].cpu()[keep]]
        rows.append(np.concatenate([gt, pred], axis=1))
    if not rows:
        raise ValueError("no validation images to draw")
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0))) for r in rows]
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    header = Image.new("RGB", (grid.width, 18), (255, 255, 255))
    draw = ImageDraw.Draw(header)
    draw.text((4, 3), "ground truth", fill=(0, 0, 0))
    draw.text((rows[0].shape[1] // 2 + 4, 3), f"prediction (score >= {thr:.2f})", fill=(0, 0, 0))
    out_img = Image.new("RGB", (grid.width, grid.height + header.height))
    out_img.paste(header, (0, 0))
    out_img.paste(grid, (0, header.height))
    out_img = with_legend(out_img, drawn, names)
    path.parent.mkdir(parents=True, exist_ok=True)
    out_img.save(path)
    return path


_FONT_CHARS: dict[str, frozenset[int]] = {}  # font file -> code points it has glyphs for
_FONT_WARNED: set[str] = set()


def _font_chars(path: str) -> frozenset[int]:
    from matplotlib import ft2font

    if path not in _FONT_CHARS:
        try:
            _FONT_CHARS[path] = frozenset(ft2font.FT2Font(path).get_charmap())
        except (OSError, RuntimeError):
            _FONT_CHARS[path] = frozenset()
    return _FONT_CHARS[path]


def legend_font(names: list[str], size: int = 12) -> Any:
    """A TrueType font with glyphs for every character of ``names``: matplotlib's DejaVu Sans (Latin,
    Greek, Cyrillic) when it covers them, else the first installed font that does (a CJK font, found
    through matplotlib's font list; nothing is downloaded). None covering them: DejaVu Sans, and a
    warning (once per missing set) that those names are drawn as boxes."""
    import warnings

    from matplotlib import font_manager
    from PIL import ImageFont

    needed = {ord(c) for name in names for c in name if not c.isspace()}
    default = font_manager.findfont("DejaVu Sans")
    installed = {f.fname for f in font_manager.fontManager.ttflist if "LastResort" not in f.fname}
    candidates = [default] + sorted(installed - {default})  # (LastResort: placeholder boxes only)
    for path in candidates:
        if needed <= _font_chars(path):
            return ImageFont.truetype(path, size)
    missing = "".join(sorted(chr(c) for c in needed - _font_chars(default)))
    if missing not in _FONT_WARNED:
        _FONT_WARNED.add(missing)
        warnings.warn(
            f"no installed font has glyphs for {missing!r}: legend names with them are drawn as boxes "
            "(install a CJK font such as fonts-noto-cjk)",
            stacklevel=2,
        )
    return ImageFont.truetype(default, size)


def save_segmentation_overlay(
    image: np.ndarray, labels: np.ndarray, class_names: list[str], path: Path, alpha: float = 0.5
) -> Path:
    """The image with its label map blended in, and a legend of the classes present (largest first),
    names in a font that has their glyphs (:func:`legend_font`), the legend as wide as the longest."""
    k = len(class_names)
    blended = overlay(image, labels, k, alpha)
    ids, counts = np.unique(labels[(labels >= 0) & (labels < k)], return_counts=True)
    present = [int(i) for i in ids[np.argsort(-counts)]]
    colours = palette(k)
    font = legend_font([class_names[c] for c in present])
    longest = max((font.getlength(class_names[c]) for c in present), default=0.0)
    row_h, width = 16, max(180, 22 + int(np.ceil(longest)) + 8)
    legend = Image.new("RGB", (width, max(blended.shape[0], row_h * len(present) + 4)), (255, 255, 255))
    draw = ImageDraw.Draw(legend)
    for n, c in enumerate(present):
        y = 2 + n * row_h
        draw.rectangle([4, y, 16, y + 12], fill=tuple(int(v) for v in colours[c]))
        draw.text((22, y), class_names[c], fill=(0, 0, 0), font=font)
    canvas = Image.new("RGB", (blended.shape[1] + width, legend.height), (255, 255, 255))
    canvas.paste(Image.fromarray(blended), (0, 0))
    canvas.paste(legend, (blended.shape[1], 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
