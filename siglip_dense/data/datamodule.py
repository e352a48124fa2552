"""LightningDataModule for ADE20K-layout segmentation (the real dataset, your folder, or toy data)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, get_worker_info

from siglip_dense.data.ade20k import IGNORE_INDEX, SegFolderDataset, load_class_names
from siglip_dense.data.scan import resolve_root, scan_datamodule
from siglip_dense.data.transforms import build_seg_eval_transform, build_seg_train_transform, seed_transform


def collate_train(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack fixed-size crops; ``meta`` stays a list of per-image dicts (error messages read paths)."""
    return {
        "image": torch.stack([b["image"] for b in batch]),
        "mask": torch.stack([b["mask"] for b in batch]),
        "meta": [b["meta"] for b in batch],
    }


def collate_eval(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Lists of per-image tensors: evaluation runs at each image's original size."""
    return {
        "image": [b["image"] for b in batch],
        "mask": [b["mask"] for b in batch],
        "meta": [b["meta"] for b in batch],
    }


def worker_seed(initial_seed: int, worker_id: int, rank: int) -> int:
    """A 63-bit augmentation seed distinct per (DataLoader base seed, worker, global rank)."""
    base = int(initial_seed) - int(worker_id)
    ss = np.random.SeedSequence([base & 0xFFFFFFFF, base >> 32 & 0xFFFFFFFF, int(worker_id), int(rank)])
    return int(ss.generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def seed_worker(worker_id: int, rank: int = 0) -> None:
    """DataLoader ``worker_init_fn``: reseed the worker's albumentations Compose (it has its own RNG).

    ``torch.initial_seed()`` differs per worker and per epoch (non-persistent workers) but not per rank
    when every rank ran the same ``seed_everything``, hence ``rank``. Lightning's own worker init (which
    it skips when a loader brings one) is called too, so numpy/random/torch are also seeded per worker.
    """
    import cv2
    from lightning.fabric.utilities.seed import pl_worker_init_function

    cv2.setNumThreads(0)  # OpenCV threads × workers oversubscribe the CPU
    seed = worker_seed(torch.initial_seed(), worker_id, rank)
    pl_worker_init_function(worker_id, rank)
    info = get_worker_info()
    dataset = info.dataset if info is not None else None
    transform = getattr(dataset, "transform", None)
    if transform is not None and hasattr(transform, "set_random_state"):
        seed_transform(transform, seed)


class ReseedingRandomSampler(RandomSampler):
    """A RandomSampler that also reseeds the in-process augmentation at the start of every epoch.

    With ``num_workers=0`` the transforms run in this process with one RNG stream for the whole run;
    a run resumed from a checkpoint would restart that stream. Drawing the epoch's augmentation seed
    from torch's global RNG (restored on resume, see DenseTask) makes a resumed run augment exactly as
    an uninterrupted one. Worker processes reseed themselves (``seed_worker``), so this is harmless
    there.
    """

    def __init__(self, data_source: Any, rank: int = 0, seed: int = 0) -> None:
        super().__init__(data_source)
        self.rank, self.seed = rank, seed

    def __iter__(self) -> Iterator[int]:
        seed = int(torch.randint(0, 2**62, (1,)).item())
        transform = getattr(self.data_source, "transform", None)
        if get_worker_info() is None and transform is not None and hasattr(transform, "set_random_state"):
            mixed = np.random.SeedSequence([seed, self.seed & 0xFFFFFFFF, self.rank]).generate_state(1)[0]
            seed_transform(transform, int(mixed))
        yield from super().__iter__()


def eval_sampler(dataset: Any) -> Sampler | None:
    """Under DDP, split evaluation data across ranks WITHOUT the padding repeats of DistributedSampler.

    Lightning keeps a sampler that is already a ``DistributedSampler``; ranks may then see unequal
    counts, which is fine for evaluation (metrics sync once, at compute) and avoids double counting.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    if torch.distributed.get_world_size() == 1:
        return None
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    return UnrepeatedDistributedSampler(dataset, shuffle=False)


class DenseDataModule(L.LightningDataModule):
    """What every task's data module shares: seeds, rank, and the train / evaluation loaders.

    Subclasses set ``train_dataset`` / ``val_dataset`` in ``setup`` and the attributes read here
    (``batch_size``, ``val_batch_size``, ``num_workers``, ``seed``), and name their collate functions.
    Training batches come from ``ReseedingRandomSampler`` (exact resume); evaluation splits across
    ranks without repeats (``eval_sampler``).
    """

    collate_train: Callable[[list[dict[str, Any]]], dict[str, Any]]
    collate_eval: Callable[[list[dict[str, Any]]], dict[str, Any]]
    train_dataset: Dataset | None = None
    val_dataset: Dataset | None = None

    @property
    def run_seed(self) -> int:
        """The explicit seed, else the one ``seed_everything`` exported, else 0."""
        if self.seed is not None:
            return int(self.seed)
        return int(os.environ.get("PL_GLOBAL_SEED", 0))

    def _global_rank(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(trainer.global_rank) if trainer is not None else 0

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        rank = self._global_rank()
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.val_batch_size,
            sampler=ReseedingRandomSampler(dataset, rank=rank, seed=self.run_seed)
            if train
            else eval_sampler(dataset),
            # a dataset smaller than one batch would otherwise train on nothing, silently
            drop_last=train and len(dataset) >= self.batch_size,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            worker_init_fn=functools.partial(seed_worker, rank=rank),
            collate_fn=type(self).collate_train if train else type(self).collate_eval,
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        assert self.train_dataset is not None
        return self._loader(self.train_dataset, train=True)

    def val_dataloader(self) -> DataLoader:
        if self.val_dataset is None:
            self.setup("validate")
        assert self.val_dataset is not None
        return self._loader(self.val_dataset, train=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()


class SegDataModule(DenseDataModule):
    """ADE20K layout; class names resolved at construction (the task is sized from them before setup).

    ``mean``/``std`` are plain attributes: train.py sets them to the backbone's before ``fit``, and the
    transforms are built in :meth:`setup`.
    """

    collate_train = staticmethod(collate_train)
    collate_eval = staticmethod(collate_eval)

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
        self.train_dataset: SegFolderDataset | None = None
        self.val_dataset: SegFolderDataset | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def task_kwargs(self) -> dict[str, Any]:
        """What the task must know about the data to size itself (train.py passes it on)."""
        return {"num_classes": self.num_classes, "class_names": list(self.class_names)}



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
