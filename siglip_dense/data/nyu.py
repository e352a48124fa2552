"""Depth datasets: the BTS / Depth Anything NYUv2 layout and a generic RGB + depth folder, plus their
LightningDataModule.

NYUv2 layout: ``ROOT/splits/{train,val}.txt`` with ``rgb_relpath depth_relpath [focal]`` lines, depth
as 16-bit PNG in millimetres (0 = no measurement). Folder layout: ``ROOT/images/<split>/*.jpg|png``
with ``ROOT/depth/<split>/<stem>.png`` (16-bit, millimetres) or ``<stem>.npy`` (float metres).
Depth reaches the model in metres with every invalid pixel (0, NaN, inf, negative) set to 0; such
pixels are counted per dataset and warned about, never silently trained on.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from siglip_dense.data.ade20k import orphan_annotations, report_orphans
from siglip_dense.data.datamodule import DenseDataModule, worker_seed
from siglip_dense.data.io import DataError, read_image
from siglip_dense.data.scan import resolve_root, scan_datamodule
from siglip_dense.data.toy import DEFAULT_NUM_TRAIN, DEFAULT_NUM_VAL
from siglip_dense.data.transforms import build_depth_eval_transform, build_depth_train_transform

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
DEPTH_SUFFIXES = (".png", ".npy")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")


# ---------------------------------------------------------------------------------------------
# depth file I/O
# ---------------------------------------------------------------------------------------------
def read_depth(path: str | Path, depth_scale: float = 1000.0) -> np.ndarray:
    """Decode a depth map to H×W float32 metres: 16-bit PNG ÷ ``depth_scale``, or ``.npy`` (metres).

    An 8-bit or colour PNG is refused (a visualisation, not a measurement), as is a non-float or
    non-2-D ``.npy``; the error names the file. Invalid values are kept here (see :func:`sanitize_depth`).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"depth file not found: {path}")
    if path.suffix.lower() == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read depth {path}: {exc}") from exc
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.floating):
            raise DataError(
                f"depth {path} has dtype {arr.dtype} and shape {arr.shape}: a .npy depth map must be a "
                "2-D float array in metres"
            )
        return arr.astype(np.float32)
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            arr = np.asarray(img)
    except (OSError, UnidentifiedImageError, SyntaxError) as exc:
        raise DataError(f"cannot decode depth {path}: {exc} (corrupt or truncated file?)") from exc
    if mode == "F":  # 32-bit float TIFF/PNG-like: already metres
        return arr.astype(np.float32)
    if mode not in _SIXTEEN_BIT_MODES or arr.ndim != 2:
        raise DataError(
            f"depth {path} is a PIL mode {mode!r} image of dtype {arr.dtype} and shape {arr.shape}: "
            f"expected a single-channel 16-bit PNG in millimetres (depth_scale={depth_scale:g}) or a "
            ".npy in metres"
        )
    return (arr.astype(np.float64) / float(depth_scale)).astype(np.float32)


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
    file; with ``skip_bad`` a broken sample is replaced by the next good one, counted and warned about.

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

    def __getitem__(self, index: int) -> dict[str, Any]:
        for attempt in range(len(self.samples)):
            i = (index + attempt) % len(self.samples)
            try:
                image, depth = self.load(i)
            except DataError as exc:
                if not self.skip_bad:
                    raise
                self.num_skipped += 1
                warnings.warn(
                    f"skipped bad sample ({self.num_skipped} so far in this process): {exc}", stacklevel=2
                )
                continue
            return self._make_item(i, image, depth)
        raise DataError(f"every sample of {type(self).__name__} failed to load")

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


def _rel(root: Path, entry: str) -> Path:
    """Split-file paths are relative to ROOT; BTS's train list starts them with '/'."""
    return root / entry.lstrip("/")


class NYUDepthDataset(DepthDataset):
    """The BTS / Depth Anything NYUv2 layout: ``ROOT/splits/<split>.txt`` (or ``split`` = a file path)."""

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
        candidate = Path(split)
        self.split_file = (
            candidate
            if candidate.suffix == ".txt" and candidate.is_file()
            else self.root / "splits" / f"{split}.txt"
        )
        self.samples = self._read_split()

    def _read_split(self) -> list[DepthSample]:
        if not self.split_file.is_file():
            raise DataError(
                f"split file not found: {self.split_file} (NYUv2 layout: ROOT/splits/{self.split}.txt with "
                "'rgb_relpath depth_relpath [focal]' lines)"
            )
        samples, bad = [], []
        for lineno, raw in enumerate(self.split_file.read_text().splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            where = f"{self.split_file} line {lineno}"
            if len(parts) < 2:
                raise DataError(f"{where}: expected 'rgb_relpath depth_relpath [focal]', got {line!r}")
            rgb, depth = _rel(self.root, parts[0]), _rel(self.root, parts[1])
            focal = None
            if len(parts) > 2:
                try:
                    focal = float(parts[2])
                except ValueError:
                    focal = None
            if parts[1] == "None":
                bad.append(f"{where}: no depth file listed for {rgb}")
            elif not rgb.is_file():
                bad.append(f"{where}: image {rgb} not found")
            elif not depth.is_file():
                bad.append(f"{where}: depth {depth} not found")
            else:
                samples.append(DepthSample(rgb, depth, focal, where))
        if bad:
            if not self.skip_bad:
                more = (
                    f" ({len(bad)} bad lines in all; set data.skip_bad=true to drop them)"
                    if len(bad) > 1
                    else ""
                )
                raise DataError(bad[0] + more)
            warnings.warn(f"dropped {len(bad)} lines of {self.split_file}, e.g. {bad[0]}", stacklevel=3)
        if not samples:
            raise DataError(f"{self.split_file} lists no usable sample")
        return samples


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


# ---------------------------------------------------------------------------------------------
# batching and the datamodule
# ---------------------------------------------------------------------------------------------
def collate_depth_train(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack fixed-size crops; ``meta`` stays a list of per-image dicts."""
    return {
        "image": torch.stack([b["image"] for b in batch]),
        "depth": torch.stack([b["depth"] for b in batch]),
        "meta": [b["meta"] for b in batch],
    }


def collate_depth_eval(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Lists of per-image tensors: evaluation runs at each image's own (ground-truth) size."""
    return {
        "image": [b["image"] for b in batch],
        "depth": [b["depth"] for b in batch],
        "meta": [b["meta"] for b in batch],
    }


DATASETS: dict[str, type[DepthDataset]] = {"nyu": NYUDepthDataset, "folder": DepthFolderDataset}


class DepthDataModule(DenseDataModule):
    """NYUv2 layout or an RGB + depth folder; the evaluation protocol (depth range, crop) lives here and
    reaches the task through :meth:`task_kwargs`, so pointing ``data`` at KITTI-like data changes both.
    """

    collate_train = staticmethod(collate_depth_train)
    collate_eval = staticmethod(collate_depth_eval)

    def __init__(
        self,
        root: str | Path | None,
        dataset: str = "nyu",
        toy: bool = False,
        toy_root: str | Path | None = None,
        toy_num_train: int = DEFAULT_NUM_TRAIN,
        toy_num_val: int = DEFAULT_NUM_VAL,
        train_split: str = "train",
        val_split: str = "val",
        crop_size: Sequence[int] = (416, 544),
        short_side: int | None = None,
        scale_range: Sequence[float] = (1.0, 1.0),
        rotate: float = 2.5,
        flip: bool = True,
        photometric: bool = True,
        depth_scale: float = 1000.0,
        min_depth: float = 1e-3,
        max_depth: float = 10.0,
        eval_crop: str = "eigen",
        batch_size: int = 8,
        val_batch_size: int = 1,
        num_workers: int = 8,
        skip_bad: bool = False,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        seed: int | None = None,
        scan: bool = True,
    ) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {dataset!r}")
        layout = "nyu" if dataset == "nyu" else "depth_folder"
        self.root = resolve_root(root, layout, toy, toy_root, num_train=toy_num_train, num_val=toy_num_val)
        self.scan = bool(scan)
        self.dataset, self.toy = dataset, toy
        self.train_split, self.val_split = train_split, val_split
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.short_side = int(short_side) if short_side else None
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.rotate, self.flip, self.photometric = float(rotate), bool(flip), bool(photometric)
        self.depth_scale = float(depth_scale)
        self.min_depth, self.max_depth, self.eval_crop = float(min_depth), float(max_depth), str(eval_crop)
        self.batch_size, self.val_batch_size = int(batch_size), int(val_batch_size)
        self.num_workers = int(num_workers)
        self.skip_bad = bool(skip_bad)
        self.mean, self.std = tuple(mean), tuple(std)
        self.seed = seed
        self.train_dataset: DepthDataset | None = None
        self.val_dataset: DepthDataset | None = None

    def task_kwargs(self) -> dict[str, Any]:
        """The evaluation protocol the task must use for this data (train.py passes it on)."""
        return {"min_depth": self.min_depth, "max_depth": self.max_depth, "eval_crop": self.eval_crop}

    def _dataset(self, split: str, transform: Any) -> DepthDataset:
        cls = DATASETS[self.dataset]
        return cls(
            self.root, split, transform=transform, depth_scale=self.depth_scale, skip_bad=self.skip_bad
        )

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            transform = build_depth_train_transform(
                self.crop_size,
                short_side=self.short_side,
                scale_range=self.scale_range,
                rotate=self.rotate,
                flip=self.flip,
                photometric=self.photometric,
                mean=self.mean,
                std=self.std,
                seed=worker_seed(self.run_seed, 0, self._global_rank()),
            )
            self.train_dataset = self._dataset(self.train_split, transform)
        self.val_dataset = self._dataset(self.val_split, build_depth_eval_transform(self.mean, self.std))
        scan_datamodule(self, stage)


__all__ = [
    "DepthDataModule",
    "DepthDataset",
    "DepthFolderDataset",
    "NYUDepthDataset",
    "collate_depth_eval",
    "collate_depth_train",
    "read_depth",
    "sanitize_depth",
]
