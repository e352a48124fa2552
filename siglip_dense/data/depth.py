"""LightningDataModule for monocular depth: the NYUv2 split-file layout or an RGB + depth folder. The
evaluation protocol (depth range, crop) lives here and reaches the task through ``task_kwargs``."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from siglip_dense.data.base import DenseDataModule, list_batch, stack_batch
from siglip_dense.data.depth_folder import DepthDataset, DepthFolderDataset
from siglip_dense.data.io import DataError
from siglip_dense.data.nyu import NYUDepthDataset
from siglip_dense.data.samplers import worker_seed
from siglip_dense.data.scan import header_size, resolve_root, scan_datamodule
from siglip_dense.data.toy import DEFAULT_NUM_TRAIN, DEFAULT_NUM_VAL
from siglip_dense.data.transforms import build_depth_eval_transform, build_depth_train_transform

collate_depth_train = functools.partial(stack_batch, target="depth")
collate_depth_eval = functools.partial(list_batch, target="depth")


DATASETS: dict[str, type[DepthDataset]] = {"nyu": NYUDepthDataset, "folder": DepthFolderDataset}


def smallest_image(
    dataset: DepthDataset, limit: int = 64, short_side: int | None = None
) -> tuple[int, int] | None:
    """Smallest height and width (from headers) among the first ``limit`` images, after the training
    resize to ``short_side`` when one is set (keep ratio, rounded as :class:`RandomResizeDepth`);
    None if none reads."""
    sizes = []
    for sample in dataset.samples[:limit]:
        try:
            h, w = header_size(sample.image)
        except DataError:
            continue  # the scan reports unreadable files
        if short_side:
            scale = short_side / min(h, w)
            h, w = max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))
        sizes.append((h, w))
    if not sizes:
        return None
    return min(h for h, _ in sizes), min(w for _, w in sizes)


def warn_if_crop_exceeds(
    dataset: DepthDataset, crop_size: tuple[int, int], limit: int = 64, short_side: int | None = None
) -> bool:
    """Warn when the training crop is larger than the images as they reach the crop (after the
    ``short_side`` resize when one is set; ``scale_range`` jitter aside).

    Such crops are padded (padding is invalid depth, masked out of the loss), so most of each
    batch would be padding. Returns whether it warned.
    """
    smallest = smallest_image(dataset, limit, short_side)
    if smallest is None or (crop_size[0] <= smallest[0] and crop_size[1] <= smallest[1]):
        return False
    fit = f"data.crop_size=[{min(crop_size[0], smallest[0])},{min(crop_size[1], smallest[1])}]"
    if short_side:
        what = f"training images resized to data.short_side={short_side} (smallest "
        fix = f"set {fit} or a larger data.short_side (at least {max(crop_size)})"
    else:
        what = "training images (smallest "
        fix = f"set {fit} or resize with data.short_side"
    warnings.warn(
        f"data.crop_size {list(crop_size)} (H, W) is larger than the {what}"
        f"{smallest[0]}x{smallest[1]} H×W among the first {min(limit, len(dataset.samples))} of "
        f"{_describe_split(dataset)}): crops are padded with invalid depth, so much of each batch is "
        f"padding; {fix}",
        stacklevel=2,
    )
    return True


def _describe_split(dataset: DepthDataset) -> str:
    split_file = getattr(dataset, "split_file", None)
    if split_file is not None:
        return str(split_file)
    return str(Path(getattr(dataset, "root", ".")) / "images" / str(getattr(dataset, "split", "")))


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
            warn_if_crop_exceeds(self.train_dataset, self.crop_size, short_side=self.short_side)
        self.val_dataset = self._dataset(self.val_split, build_depth_eval_transform(self.mean, self.std))
        scan_datamodule(self, stage)


__all__ = ["DATASETS", "DepthDataModule", "collate_depth_eval", "collate_depth_train"]
