"""The segmentation-folder dataset: ROOT/images/<split>/*.jpg with ROOT/annotations/<split>/*.png label
maps matched by file stem (the ADE20K layout; any dataset written the same way)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from siglip_dense.data.ade20k import ADE20K_CLASSES
from siglip_dense.data.io import DataError, orphan_annotations, read_image, read_label, report_orphans
from siglip_dense.data.skip import load_or_skip
from siglip_dense.data.transforms import IGNORE_INDEX

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """ADE20K convention: 0 (other) → 255 (ignored), v → v - 1; an existing 255 stays ignored."""
    out = label.astype(np.int16) - 1
    out[label == 0] = IGNORE_INDEX
    out[label == IGNORE_INDEX] = IGNORE_INDEX
    return out.astype(np.uint8)


def load_class_names(
    root: str | Path, dataset: str = "ade20k", classes: Sequence[str] | None = None
) -> list[str]:
    """Explicit ``classes`` > ROOT/classes.txt > the 150 ADE20K names (dataset='ade20k')."""
    if classes:
        return [str(c) for c in classes]
    path = Path(root) / "classes.txt"
    if path.is_file():
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not names:
            raise DataError(f"{path} is empty: write one class name per line")
        return names
    if dataset == "ade20k":
        return list(ADE20K_CLASSES)
    raise DataError(
        f"no class names for dataset={dataset!r} at {root}: write {path} (one name per line, in label "
        "order) or set data.classes=[...]"
    )


def _default_transform() -> Callable[..., dict[str, Any]]:
    from siglip_dense.data.transforms import build_seg_eval_transform

    return build_seg_eval_transform((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


class SegFolderDataset(Dataset):
    """Image/label pairs matched by file stem; every problem is a :class:`DataError` naming the file.

    With ``skip_bad`` a broken sample is skipped (:mod:`siglip_dense.data.skip`), counted in ``num_skipped``
    and warned about (per process: each DataLoader worker keeps its own count).
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        transform: Callable[..., dict[str, Any]] | None = None,
        reduce_zero_label: bool = True,
        num_classes: int | None = None,
        skip_bad: bool = False,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.transform = transform if transform is not None else _default_transform()
        self.reduce_zero_label = reduce_zero_label
        self.num_classes = num_classes
        self.skip_bad = skip_bad
        self.num_skipped = 0
        self.samples = self._pair_files()

    def _pair_files(self) -> list[tuple[Path, Path]]:
        img_dir = self.root / "images" / self.split
        ann_dir = self.root / "annotations" / self.split
        images = (
            sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if img_dir.is_dir()
            else []
        )
        if not images:
            raise DataError(f"no images (*.jpg, *.jpeg, *.png) found in {img_dir}")
        samples, missing = [], []
        for img in images:
            ann = ann_dir / f"{img.stem}.png"
            if ann.is_file():
                samples.append((img, ann))
            else:
                missing.append((img, ann))
        if missing:
            if not self.skip_bad:
                img, ann = missing[0]
                raise DataError(
                    f"image {img} has no annotation {ann} ({len(missing)} of {len(images)} images in "
                    f"{img_dir} lack one; set data.skip_bad=true to drop them)"
                )
            warnings.warn(
                f"dropped {len(missing)} of {len(images)} images in {img_dir} without an annotation in "
                f"{ann_dir} (e.g. {missing[0][0].name})",
                stacklevel=3,
            )
        if not samples:
            raise DataError(f"no image in {img_dir} has an annotation in {ann_dir}")
        orphans = orphan_annotations(ann_dir, {img.stem for img in images}, (".png",))
        self.num_orphans = report_orphans(orphans, "annotation", img_dir, self.skip_bad)
        return samples

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Decoded, checked image (H×W×3 uint8) and label (H×W uint8, reduced if configured)."""
        img_path, ann_path = self.samples[index]
        image = read_image(img_path)
        label = read_label(ann_path)
        if image.shape[:2] != label.shape:
            raise DataError(
                f"annotation {ann_path} is {label.shape[1]}x{label.shape[0]} (WxH) but its image {img_path} "
                f"is {image.shape[1]}x{image.shape[0]}"
            )
        if self.reduce_zero_label:
            label = reduce_zero_label(label)
        if self.num_classes is not None:
            values = np.flatnonzero(np.bincount(label.ravel(), minlength=256))  # uint8: no sort needed
            bad = values[(values >= self.num_classes) & (values != IGNORE_INDEX)]
            if bad.size:
                shown = (bad + 1 if self.reduce_zero_label else bad).tolist()[:10]
                raise DataError(
                    f"annotation {ann_path} has label values {shown} (as stored) beyond the "
                    f"{self.num_classes} classes (reduce_zero_label={self.reduce_zero_label}); wrong "
                    "class list or reduce_zero_label?"
                )
        return image, label

    def sample_file(self, index: int) -> Path:
        """The image file of sample ``index`` (what skip totals name)."""
        return self.samples[index][0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        """The sample at ``index``; with ``skip_bad`` a bad one is a skip marker (see :mod:`~siglip_dense.data.skip`)."""
        return load_or_skip(self, index, lambda i: self._make_item(i, *self.load(i)))

    def _make_item(self, i: int, image: np.ndarray, label: np.ndarray) -> dict[str, Any]:
        img_path, ann_path = self.samples[i]
        out = self.transform(image=image, mask=label)
        mask = out["mask"]
        mask = torch.as_tensor(mask).long() if not isinstance(mask, torch.Tensor) else mask.long()
        meta = {
            "path": str(img_path),
            "ann_path": str(ann_path),
            "stem": img_path.stem,
            "orig_size": (int(image.shape[0]), int(image.shape[1])),
        }
        return {"image": out["image"].float(), "mask": mask, "meta": meta}


__all__ = ["SegFolderDataset", "load_class_names", "reduce_zero_label"]
