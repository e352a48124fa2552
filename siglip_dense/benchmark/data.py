"""``data``: augmentation images/s per worker, ours (albumentations) vs ``torchvision.transforms.v2``.

ADE20K crops, COCO LSJ and NYU/BTS pipelines on the same decoded images, one process and one thread
(as a DataLoader worker runs), and the workers needed to feed ``--target-images-per-s``. Timed with
a wall clock per call (see :mod:`siglip_dense.benchmark.timing` for why not the torch Timer).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from siglip_dense.benchmark.common import emit, ratio_table
from siglip_dense.benchmark.timing import time_interleaved

NAME = "data"
HELP = "augmentation images/s per worker: ours vs torchvision.transforms.v2"


def synthetic_seg_samples(n: int, h: int, w: int, num_classes: int, seed: int = 0) -> list[tuple]:
    """Decoded ADE20K-like samples: uint8 RGB H×W×3 and a blocky uint8 label map (some 255)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        grid = rng.integers(0, num_classes, (8, 11), dtype=np.uint8)
        grid[rng.random(grid.shape) < 0.1] = 255
        mask = np.ascontiguousarray(np.kron(grid, np.ones((h // 8 + 1, w // 11 + 1), np.uint8))[:h, :w])
        out.append((img, mask))
    return out


def toy_seg_samples(root: Path, n: int) -> list[tuple]:
    """Decoded samples from an ADE20K-layout root (``images/training`` + ``annotations/training``)."""
    from PIL import Image

    images = sorted((root / "images" / "training").glob("*.jpg"))[:n]
    out = []
    for p in images:
        ann = root / "annotations" / "training" / (p.stem + ".png")
        out.append((np.array(Image.open(p).convert("RGB")), np.array(Image.open(ann))))
    if not out:
        raise FileNotFoundError(f"no images under {root}/images/training")
    return out


def tv_seg_transform(crop: int, mean: tuple[float, ...], std: tuple[float, ...]) -> Callable:
    """torchvision v2 counterpart of the ADE20K recipe (short side 256..1024 ≈ ratio 0.5–2 × 512)."""
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.RandomResize(crop // 2, crop * 2),
            v2.RandomCrop(crop, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: 255}),
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(brightness=32 / 255, contrast=(0.5, 1.5), saturation=(0.5, 1.5), hue=18 / 360),
            v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
        ]
    )


def tv_det_transform(size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> Callable:
    """torchvision v2 LSJ: ScaleJitter(0.1–2.0) → crop/pad → flip → sanitize → normalise."""
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.ScaleJitter((size, size), scale_range=(0.1, 2.0)),
            v2.RandomCrop(size, pad_if_needed=True, fill=0),
            v2.RandomHorizontalFlip(),
            v2.SanitizeBoundingBoxes(min_size=1.0),
            v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
        ]
    )


def tv_depth_transform(crop: tuple[int, int], mean: tuple[float, ...], std: tuple[float, ...]) -> Callable:
    """torchvision v2 NYU/BTS: rotate ±2.5° → crop → flip → colour → normalise (depth as a Mask)."""
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.RandomRotation(2.5, fill=0),
            v2.RandomCrop(crop, pad_if_needed=True, fill=0),
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(brightness=(0.75, 1.25), saturation=(0.9, 1.1)),
            v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
        ]
    )


def _cycler(samples: list[Any]) -> Callable[[], Any]:
    """Return the samples in turn, forever."""
    state = {"i": 0}

    def nxt() -> Any:
        state["i"] = (state["i"] + 1) % len(samples)
        return samples[state["i"]]

    return nxt


def data_steps(args: argparse.Namespace) -> dict[str, dict[str, Callable[[], None]]]:
    """Per pipeline, one callable per implementation that augments one image."""
    from torchvision import tv_tensors

    from siglip_dense.data import transforms as T

    mean = std = (0.5, 0.5, 0.5)
    groups: dict[str, dict[str, Callable[[], None]]] = {}
    if args.root is not None:
        seg = toy_seg_samples(args.root, args.images)
    elif args.toy:
        from siglip_dense.data.toy import ensure_toy_data

        tmp = Path(tempfile.mkdtemp(prefix="bench_toy_"))
        ensure_toy_data(tmp)
        root = next(p.parents[2] for p in tmp.rglob("images/training/*.jpg"))
        seg = toy_seg_samples(root, args.images)
    else:
        seg = synthetic_seg_samples(args.images, 512, 683, 150, args.seed)
    seg_next = _cycler(seg)
    ours_seg = T.build_seg_train_transform((args.crop, args.crop), mean=mean, std=std, seed=args.seed)
    tv_seg = tv_seg_transform(args.crop, mean, std)

    def tv_seg_step() -> None:
        img, mask = seg_next()
        tv_seg(
            tv_tensors.Image(torch.from_numpy(img).permute(2, 0, 1)), tv_tensors.Mask(torch.from_numpy(mask))
        )

    groups[f"ade20k_{args.crop}"] = {
        "siglip_dense": lambda: ours_seg(**dict(zip(("image", "mask"), seg_next()))),
        "torchvision_v2": tv_seg_step,
    }
    if "det" in args.pipelines:
        rng = np.random.default_rng(args.seed)
        det = []
        for _ in range(max(2, args.images // 2)):
            img = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
            xy = rng.uniform(0, 400, (7, 2))
            wh = rng.uniform(10, 200, (7, 2))
            boxes = np.concatenate([xy, wh], 1).astype(np.float32)
            masks = np.zeros((7, 480, 640), np.uint8)
            for k, (x, y, bw, bh) in enumerate(boxes.astype(int)):
                masks[k, y : y + bh, x : x + bw] = 1
            det.append((img, boxes, rng.integers(1, 80, 7), masks))
        det_next = _cycler(det)
        ours_det = T.build_det_train_transform(args.det_size, mean=mean, std=std, seed=args.seed)
        tv_det = tv_det_transform(args.det_size, mean, std)

        def ours_det_step() -> None:
            img, boxes, labels, masks = det_next()
            T.apply_det_transform(ours_det, img, boxes, labels, masks)

        def tv_det_step() -> None:
            img, boxes, labels, masks = det_next()
            xyxy = torch.from_numpy(boxes).clone()
            xyxy[:, 2:] += xyxy[:, :2]
            target = {
                "boxes": tv_tensors.BoundingBoxes(xyxy, format="XYXY", canvas_size=img.shape[:2]),
                "masks": tv_tensors.Mask(torch.from_numpy(masks)),
                "labels": torch.from_numpy(labels),
            }
            tv_det(tv_tensors.Image(torch.from_numpy(img).permute(2, 0, 1)), target)

        groups[f"coco_lsj_{args.det_size}"] = {"siglip_dense": ours_det_step, "torchvision_v2": tv_det_step}
    if "depth" in args.pipelines:
        rng = np.random.default_rng(args.seed)
        dep = [
            (
                rng.integers(0, 256, (480, 640, 3), dtype=np.uint8),
                rng.uniform(0.5, 10, (480, 640)).astype(np.float32),
            )
            for _ in range(max(2, args.images // 2))
        ]
        dep_next = _cycler(dep)
        crop = (416, 544)
        ours_dep = T.build_depth_train_transform(crop, mean=mean, std=std, seed=args.seed)
        tv_dep = tv_depth_transform(crop, mean, std)

        def tv_dep_step() -> None:
            img, depth = dep_next()
            tv_dep(
                tv_tensors.Image(torch.from_numpy(img).permute(2, 0, 1)),
                tv_tensors.Mask(torch.from_numpy(depth)),
            )

        groups["nyu_416x544"] = {
            "siglip_dense": lambda: ours_dep(**dict(zip(("image", "mask"), dep_next()))),
            "torchvision_v2": tv_dep_step,
        }
    return groups


def bench_data(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Images/s per worker (one process, one thread) and the workers needed for the target rate."""
    torch.set_num_threads(1)  # a DataLoader worker runs single-threaded
    import cv2

    cv2.setNumThreads(0)
    rows: list[dict[str, Any]] = []
    for group, steps in data_steps(args).items():
        timed = time_interleaved(
            steps, torch.device("cpu"), args.warmup, args.iters, args.rounds, wall_clock=True
        )
        for impl, (sec, _) in timed.items():
            ips = 1.0 / sec
            row = {
                "bench": "data",
                "group": group,
                "impl": impl,
                "images_per_s": ips,
                "ms_per_image": sec * 1e3,
                "target_images_per_s": args.target_images_per_s,
                "workers_needed": math.ceil(args.target_images_per_s / ips),
            }
            emit(row, rows)
    return rows


def data_summary(rows: list[dict[str, Any]], target: float) -> str:
    """Ratio table plus the workers each pipeline needs to feed ``target`` images/s."""
    lines = [ratio_table(rows, "images_per_s", "siglip_dense")]
    lines.append(f"workers needed for {target:.0f} images/s (assumed GPU consumption rate):")
    lines += [f"  {r['group']:<20}{r['impl']:<20}{r['workers_needed']:>5}" for r in rows]
    return "\n".join(lines)


def add_arguments(d: argparse.ArgumentParser, default_device: str) -> None:
    d.add_argument("--images", type=int, default=16, help="decoded images to cycle through")
    d.add_argument("--root", type=Path, default=None, help="ADE20K-layout root (default: synthetic)")
    d.add_argument("--toy", action="store_true", help="use the toy generator's ADE20K-layout data")
    d.add_argument("--crop", type=int, default=512)
    d.add_argument("--det-size", type=int, default=1024)
    d.add_argument("--pipelines", nargs="*", default=["det", "depth"], choices=["det", "depth"])
    d.add_argument(
        "--target-images-per-s",
        type=float,
        default=400.0,
        help="GPU consumption rate to feed (assumption: ADE20K UPerNet recipe on one H100)",
    )
    d.add_argument("--warmup", type=int, default=3)
    d.add_argument("--iters", type=int, default=40)
    d.add_argument("--rounds", type=int, default=4)
    d.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> tuple[list[str], str]:
    """JSON lines of the measurements and the summary table."""
    rows = bench_data(args)
    return [json.dumps(r) for r in rows], data_summary(rows, args.target_images_per_s)
