"""ADE20K-layout segmentation folders: ROOT/images/<split>/*.jpg with ROOT/annotations/<split>/*.png."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from siglip_dense.data.io import DataError, read_image, read_label

# SceneParsing (ADEChallengeData2016) class names for label values 1..150, in order.
ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper",
    "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table",
    "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table",
    "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island",
    "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer",
    "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike",
    "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal",
    "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase",
    "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip
assert len(ADE20K_CLASSES) == 150

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
IGNORE_INDEX = 255


def orphan_annotations(ann_dir: Path, image_stems: set[str], suffixes: tuple[str, ...]) -> list[Path]:
    """Annotation files in ``ann_dir`` whose image is missing (a split that would silently shrink)."""
    if not ann_dir.is_dir():
        return []
    return sorted(p for p in ann_dir.iterdir() if p.suffix.lower() in suffixes and p.stem not in image_stems)


def report_orphans(orphans: list[Path], kind: str, img_dir: Path, skip_bad: bool) -> int:
    """An annotation without its image is an error naming it, or (``skip_bad``) a counted warning.

    Returns:
        the number of orphans skipped.

    Raises:
        DataError: naming the first orphan and the count, unless ``skip_bad``.
    """
    if not orphans:
        return 0
    if not skip_bad:
        raise DataError(
            f"{kind} {orphans[0]} has no image {img_dir / orphans[0].stem}.* ({len(orphans)} {kind}s in "
            f"{orphans[0].parent} lack one; set data.skip_bad=true to skip them)"
        )
    warnings.warn(
        f"skipped {len(orphans)} {kind}s in {orphans[0].parent} without an image in {img_dir} "
        f"(e.g. {orphans[0].name})",
        stacklevel=4,
    )
    return len(orphans)


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

    With ``skip_bad`` a broken sample is replaced by the next good one, counted in ``num_skipped``
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

    def __getitem__(self, index: int) -> dict[str, Any]:
        for attempt in range(len(self.samples)):
            i = (index + attempt) % len(self.samples)
            try:
                image, label = self.load(i)
            except DataError as exc:
                if not self.skip_bad:
                    raise
                self.num_skipped += 1
                warnings.warn(
                    f"skipped bad sample ({self.num_skipped} so far in this process): {exc}", stacklevel=2
                )
                continue
            return self._make_item(i, image, label)
        raise DataError(f"every sample in {self.root / 'images' / self.split} failed to load")

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
