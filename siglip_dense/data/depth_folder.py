"""RGB + depth datasets: the base that decodes, checks and counts invalid depth, and the generic folder
layout ``ROOT/images/<split>/*.jpg|png`` with ``ROOT/depth/<split>/<stem>.png`` (16-bit, millimetres) or
``<stem>.npy`` (float metres). The NYUv2 split-file layout subclasses the base (:mod:`siglip_dense.data.nyu`).

Depth reaches the model in metres with every invalid pixel (0, NaN, inf, negative) set to 0; such
pixels are counted per dataset and warned about, never silently trained on.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from siglip_dense.data.io import DataError, orphan_annotations, read_depth, read_image, report_orphans
from siglip_dense.data.skip import load_or_skip
from siglip_dense.data.transforms import build_depth_eval_transform

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
DEPTH_SUFFIXES = (".png", ".npy")


def sanitize_depth(depth: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
    """Set non-finite and negative depths to 0 (invalid); return the map and per-kind pixel counts."""
    nonfinite = ~np.isfinite(depth)
    negative = np.zeros_like(nonfinite)
    np.less(depth, 0, out=negative, where=~nonfinite)
    zero = depth == 0
    counts = {"nonfinite": int(nonfinite.sum()), "negative": int(negative.sum()), "zero": int(zero.sum())}
    if counts["nonfinite"] or counts["negative"]:
        depth = depth.copy()
        depth[nonfinite | negative] = 0.0
    return depth, counts


@dataclass(frozen=True)
class DepthSample:
    image: Path
    depth: Path
    focal: float | None = None
    source: str = ""  # where it was listed ("splits/val.txt line 12"), for error messages


def _default_transform() -> Callable[..., dict[str, Any]]:
    return build_depth_eval_transform((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


class DepthDataset(Dataset):
    """RGB + depth pairs; subclasses fill ``samples``. Every problem is a :class:`DataError` naming the
    file; with ``skip_bad`` a broken sample is skipped (:mod:`siglip_dense.data.skip`), counted and warned about.

    ``invalid_counts`` counts pixels set invalid (``zero``, ``nonfinite``, ``negative``) and samples with
    no valid pixel (``empty_samples``) in this process (each DataLoader worker keeps its own).
    """

    def __init__(
        self,
        transform: Callable[..., dict[str, Any]] | None = None,
        depth_scale: float = 1000.0,
        skip_bad: bool = False,
    ) -> None:
        self.transform = transform if transform is not None else _default_transform()
        self.depth_scale = float(depth_scale)
        self.skip_bad = bool(skip_bad)
        self.num_skipped = 0
        self.invalid_counts: Counter[str] = Counter()
        self.samples: list[DepthSample] = []
        self._warned_zero = False

    def __len__(self) -> int:
        return len(self.samples)

    def _where(self, sample: DepthSample) -> str:
        return f" (listed at {sample.source})" if sample.source else ""

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Decoded, checked image (H×W×3 uint8) and depth (H×W float32 metres, 0 = invalid)."""
        s = self.samples[index]
        image = read_image(s.image)
        depth = read_depth(s.depth, self.depth_scale)
        if depth.shape != image.shape[:2]:
            raise DataError(
                f"depth {s.depth} is {depth.shape[1]}x{depth.shape[0]} (WxH) but its image {s.image} is "
                f"{image.shape[1]}x{image.shape[0]}{self._where(s)}"
            )
        depth, counts = sanitize_depth(depth)
        self.invalid_counts.update(counts)
        if counts["nonfinite"] or counts["negative"]:
            warnings.warn(
                f"depth {s.depth}: {counts['nonfinite']} NaN/inf and {counts['negative']} negative pixels "
                f"set to 0 (invalid, masked out); {dict(self.invalid_counts)} so far in this process",
                stacklevel=2,
            )
        if counts["zero"] and not self._warned_zero:
            self._warned_zero = True
            warnings.warn(
                f"depth {s.depth} has {counts['zero']} zero pixels (no measurement): zeros are treated as "
                "invalid and masked out (counted in dataset.invalid_counts; warned once)",
                stacklevel=2,
            )
        if not (depth > 0).any():
            self.invalid_counts["empty_samples"] += 1
            warnings.warn(f"depth {s.depth} has no valid pixel{self._where(s)}", stacklevel=2)
        return image, depth

    def sample_file(self, index: int) -> Path:
        """The image file of sample ``index`` (what skip totals name)."""
        return self.samples[index].image

    def __getitem__(self, index: int) -> dict[str, Any]:
        """The sample at ``index``; with ``skip_bad`` a bad one is a skip marker (see :mod:`~siglip_dense.data.skip`)."""
        return load_or_skip(self, index, lambda i: self._make_item(i, *self.load(i)))

    def _make_item(self, i: int, image: np.ndarray, depth: np.ndarray) -> dict[str, Any]:
        s = self.samples[i]
        out = self.transform(image=image, mask=depth)
        target = out["mask"]
        target = target.float() if isinstance(target, torch.Tensor) else torch.as_tensor(target).float()
        meta = {
            "path": str(s.image),
            "depth_path": str(s.depth),
            "stem": s.image.stem,
            "orig_size": (int(image.shape[0]), int(image.shape[1])),
            "focal": s.focal,
        }
        return {"image": out["image"].float(), "depth": target, "meta": meta}


class DepthFolderDataset(DepthDataset):
    """``ROOT/images/<split>/*.jpg|png`` with ``ROOT/depth/<split>/<stem>.png`` (mm) or ``.npy`` (m)."""

    def __init__(
        self,
        root: str | Path,
        split: str,
        transform: Callable[..., dict[str, Any]] | None = None,
        depth_scale: float = 1000.0,
        skip_bad: bool = False,
    ) -> None:
        super().__init__(transform, depth_scale, skip_bad)
        self.root = Path(root)
        self.split = split
        self.samples = self._pair_files()

    def _pair_files(self) -> list[DepthSample]:
        img_dir, depth_dir = self.root / "images" / self.split, self.root / "depth" / self.split
        images = (
            sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if img_dir.is_dir()
            else []
        )
        if not images:
            raise DataError(f"no images (*.jpg, *.jpeg, *.png) found in {img_dir}")
        samples, missing = [], []
        for img in images:
            found = [depth_dir / f"{img.stem}{suf}" for suf in DEPTH_SUFFIXES]
            found = [p for p in found if p.is_file()]
            if found:
                samples.append(DepthSample(img, found[0]))
            else:
                missing.append(img)
        if missing:
            if not self.skip_bad:
                raise DataError(
                    f"image {missing[0]} has no depth map {depth_dir / missing[0].stem}.png|.npy ({len(missing)} "
                    f"of {len(images)} images lack one; set data.skip_bad=true to drop them)"
                )
            warnings.warn(f"dropped {len(missing)} images in {img_dir} without a depth map", stacklevel=3)
        if not samples:
            raise DataError(f"no image in {img_dir} has a depth map in {depth_dir}")
        orphans = orphan_annotations(depth_dir, {img.stem for img in images}, DEPTH_SUFFIXES)
        self.num_orphans = report_orphans(orphans, "depth map", img_dir, self.skip_bad)
        return samples


__all__ = ["DepthDataset", "DepthFolderDataset", "DepthSample", "sanitize_depth"]
