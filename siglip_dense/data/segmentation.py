"""LightningDataModule for semantic segmentation: ADE20K layout (the real dataset, your folder, or toy data)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from siglip_dense.data.base import DenseDataModule, list_batch, stack_batch
from siglip_dense.data.samplers import worker_seed
from siglip_dense.data.scan import resolve_root, scan_datamodule
from siglip_dense.data.seg_folder import SegFolderDataset, load_class_names
from siglip_dense.data.transforms import IGNORE_INDEX, build_seg_eval_transform, build_seg_train_transform

collate_seg_train = functools.partial(stack_batch, target="mask")
collate_seg_eval = functools.partial(list_batch, target="mask")


class SegDataModule(DenseDataModule):
    """ADE20K layout; class names resolved at construction (the task is sized from them before setup).

    ``mean``/``std`` are plain attributes: train.py sets them to the backbone's before ``fit``, and the
    transforms are built in :meth:`setup`. ``metric_protocol`` is the benchmark's mIoU rule (``mmseg``
    for ADE20K / VOC, ``detectron2`` for the open-vocabulary benchmarks; see
    :mod:`siglip_dense.evaluation.seg_metrics`), passed to the task.
    """

    collate_train = staticmethod(collate_seg_train)
    collate_eval = staticmethod(collate_seg_eval)

    def __init__(
        self,
        root: str | Path | None,
        dataset: str = "ade20k",
        toy: bool = False,
        toy_root: str | Path | None = None,
        train_split: str = "training",
        val_split: str = "validation",
        crop_size: Sequence[int] = (512, 512),
        scale_range: Sequence[float] = (0.5, 2.0),
        base_size: Sequence[int] = (2048, 512),
        cat_max_ratio: float = 0.75,
        reduce_zero_label: bool = True,
        classes: Sequence[str] | None = None,
        batch_size: int = 16,
        val_batch_size: int = 1,
        num_workers: int = 8,
        skip_bad: bool = False,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        seed: int | None = None,
        scan: bool = True,
        metric_protocol: str = "mmseg",
    ) -> None:
        super().__init__()
        if dataset not in ("ade20k", "folder"):
            raise ValueError(f"dataset must be 'ade20k' or 'folder', got {dataset!r}")
        self.root = resolve_root(root, "ade20k" if dataset == "ade20k" else "seg_folder", toy, toy_root)
        self.scan = bool(scan)
        self.dataset = dataset
        self.toy = toy
        self.train_split, self.val_split = train_split, val_split
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.base_size = (int(base_size[0]), int(base_size[1]))
        self.cat_max_ratio = float(cat_max_ratio)
        self.reduce_zero_label = bool(reduce_zero_label)
        self.batch_size, self.val_batch_size = int(batch_size), int(val_batch_size)
        self.num_workers = int(num_workers)
        self.skip_bad = bool(skip_bad)
        self.mean, self.std = tuple(mean), tuple(std)
        self.seed = seed
        self.class_names: list[str] = load_class_names(self.root, dataset, classes)
        self.metric_protocol = str(metric_protocol)  # checked by the task's metric
        self.train_dataset: SegFolderDataset | None = None
        self.val_dataset: SegFolderDataset | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def task_kwargs(self) -> dict[str, Any]:
        """What the task must know about the data to size itself (train.py passes it on)."""
        return {
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "metric_protocol": self.metric_protocol,
        }

    def _dataset(self, split: str, transform: Any) -> SegFolderDataset:
        return SegFolderDataset(
            self.root,
            split,
            transform=transform,
            reduce_zero_label=self.reduce_zero_label,
            num_classes=self.num_classes,
            skip_bad=self.skip_bad,
        )

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            transform = build_seg_train_transform(
                self.crop_size,
                scale_range=self.scale_range,
                base_size=self.base_size,
                cat_max_ratio=self.cat_max_ratio,
                mean=self.mean,
                std=self.std,
                ignore_index=IGNORE_INDEX,
                seed=worker_seed(self.run_seed, 0, self._global_rank()),  # used as is when num_workers=0
            )
            self.train_dataset = self._dataset(self.train_split, transform)
        self.val_dataset = self._dataset(self.val_split, build_seg_eval_transform(self.mean, self.std))
        scan_datamodule(self, stage)


__all__ = ["SegDataModule", "collate_seg_eval", "collate_seg_train"]
