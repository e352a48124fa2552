"""LightningDataModule for ADE20K-layout segmentation (the real dataset, your folder, or toy data)."""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterator, Sequence, Sized
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

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
    """A 63-bit seed distinct per (base seed, worker, global rank)."""
    base = int(initial_seed) - int(worker_id)
    ss = np.random.SeedSequence([base & 0xFFFFFFFF, base >> 32 & 0xFFFFFFFF, int(worker_id), int(rank)])
    return int(ss.generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def _mix(*words: int) -> int:
    """A 63-bit seed from non-negative integers (numpy's SeedSequence: well mixed, no collisions by sum)."""
    entropy = []
    for w in words:
        w = int(w) % 2**64
        entropy += [w & 0xFFFFFFFF, w >> 32]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def augmentation_seed(run_seed: int, epoch: int, pass_index: int, index: int) -> int:
    """The augmentation seed of one training sample: a function of (run seed, epoch, pass, dataset index).

    It does not depend on the DataLoader worker, the number of workers, the rank or where iteration
    (re)started, so a resumed run augments every sample exactly as the uninterrupted run did.
    ``pass_index`` counts re-iterations of a loader within one epoch (a multi-task loader cycling a
    shorter dataset), which get fresh draws.
    """
    return _mix(run_seed, epoch, pass_index, index)


def seed_worker(worker_id: int, rank: int = 0) -> None:
    """DataLoader ``worker_init_fn``: OpenCV single-threaded, numpy/random/torch seeded per worker and rank.

    Training augmentation does not come from these streams: every sample reseeds its transform
    (:class:`PerSampleSeeded`). Lightning's own worker init (which it skips when a loader brings one)
    does the numpy/random/torch seeding.
    """
    import cv2
    from lightning.fabric.utilities.seed import pl_worker_init_function

    cv2.setNumThreads(0)  # OpenCV threads × workers oversubscribe the CPU
    pl_worker_init_function(worker_id, rank)


class SeededIndex(NamedTuple):
    """What :class:`ResumableDistributedSampler` yields: a dataset index and its augmentation seed."""

    index: int
    seed: int


class PerSampleSeeded(Dataset):
    """Training view of a dataset: seeds its albumentations transform from the sample's key, then loads it.

    albumentations' Compose has its own RNG; seeding it per sample (instead of per worker stream)
    makes the augmentation of each sample independent of workers and of resume points. A plain
    integer key loads the sample with the transform's current RNG state.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: SeededIndex | int) -> Any:
        if isinstance(key, SeededIndex):
            transform = getattr(self.dataset, "transform", None)
            if transform is not None and hasattr(transform, "set_random_state"):
                seed_transform(transform, key.seed)
            key = key.index
        return self.dataset[key]


class ResumableDistributedSampler(DistributedSampler):
    """Shuffled training order, split across ranks, that resumes mid-epoch (``state_dict``/``load_state_dict``).

    A ``DistributedSampler`` so that Lightning keeps it under DDP (it replaces any other sampler with a
    plain ``DistributedSampler``); with ``num_replicas=1`` it is the single-process sampler too. The
    order of epoch ``e`` is a permutation seeded by (seed, e, pass), padded and split by rank as torch's
    ``DistributedSampler`` does; each yielded :class:`SeededIndex` carries the sample's augmentation seed.

    The state (epoch, completed passes, samples yielded in the current pass) is read by torchdata's
    ``StatefulDataLoader`` when it snapshots (Lightning stores that in checkpoints). Loading it resumes
    right after the last sample of the saved position. When Lightning resumes from an epoch-end
    checkpoint (the datamodule's :attr:`at_epoch_end` probe, asked at load time) the next pass is
    epoch ``e + 1`` from its start instead, also when the epoch was cut short by
    ``limit_train_batches``.
    """

    def __init__(self, dataset: Sized, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)  # type: ignore[arg-type]
        self.passes = 0  # passes completed in this epoch
        self.yielded = 0  # samples yielded by the pass in progress
        self.at_epoch_end: Callable[[], bool] = lambda: False
        self._resume_from: int | None = None

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != self.epoch:
            self.epoch, self.passes, self.yielded, self._resume_from = int(epoch), 0, 0, None

    def order(self, epoch: int, pass_index: int) -> list[int]:
        """This rank's dataset indices for one pass (padded to equal length across ranks)."""
        g = torch.Generator()
        g.manual_seed(_mix(self.seed, epoch, pass_index))
        indices = torch.randperm(len(self.dataset), generator=g).tolist()  # type: ignore[arg-type]
        padding = self.total_size - len(indices)
        if padding > 0:
            indices += (indices * math.ceil(padding / len(indices)))[:padding]
        return indices[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[SeededIndex]:  # type: ignore[override]
        epoch, pass_index = self.epoch, self.passes
        start, self._resume_from = self._resume_from or 0, None
        self.yielded = start
        for index in self.order(epoch, pass_index)[start:]:
            self.yielded += 1
            yield SeededIndex(index, augmentation_seed(self.seed, epoch, pass_index, index))
        self.passes, self.yielded = pass_index + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "passes": self.passes,
            "yielded": self.yielded,
            "num_replicas": self.num_replicas,
            "dataset_len": len(self.dataset),  # type: ignore[arg-type]
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from ``state``; raises ValueError when the data or world size changed mid-epoch."""
        if self.at_epoch_end():
            self.epoch, self.passes, self.yielded, self._resume_from = int(state["epoch"]) + 1, 0, 0, None
            return
        saved = (int(state["num_replicas"]), int(state["dataset_len"]))
        now = (self.num_replicas, len(self.dataset))  # type: ignore[arg-type]
        if saved != now:
            raise ValueError(
                f"cannot resume mid-epoch: the checkpoint was written with {saved[0]} process(es) over "
                f"{saved[1]} training samples, this run has {now[0]} over {now[1]}. Resume with the same "
                "number of processes and data, or from an end-of-epoch checkpoint."
            )
        self.epoch, self.passes = int(state["epoch"]), int(state["passes"])
        self.yielded = self._resume_from = int(state["yielded"])


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
    Training batches come from a torchdata ``StatefulDataLoader`` over a
    :class:`ResumableDistributedSampler` with per-sample augmentation seeds (exact resume, also
    mid-epoch and under DDP); evaluation splits across ranks without repeats (``eval_sampler``).
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

    def _world_size(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(trainer.world_size) if trainer is not None else 1

    def _resuming_at_epoch_end(self) -> bool:
        """Whether Lightning is restoring a fit from a checkpoint written after an epoch's last batch."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return False
        loop = trainer.fit_loop
        return bool(loop.restarting and loop.epoch_loop.batch_progress.is_last_batch)

    def _loader_kwargs(self, rank: int) -> dict[str, Any]:
        return {
            "num_workers": self.num_workers,
            "pin_memory": torch.cuda.is_available(),
            "persistent_workers": self.num_workers > 0,
            "worker_init_fn": functools.partial(seed_worker, rank=rank),
            # the loader's base seed comes from here, not from torch's global RNG (whose state a
            # checkpoint restores): iterating a loader never shifts the model's random stream
            "generator": torch.Generator().manual_seed(worker_seed(self.run_seed, 0, rank)),
        }

    def _train_loader(self, dataset: Dataset) -> StatefulDataLoader:
        rank = self._global_rank()
        sampler = ResumableDistributedSampler(
            dataset,  # type: ignore[arg-type]
            num_replicas=self._world_size(),
            rank=rank,
            seed=self.run_seed,
        )
        sampler.at_epoch_end = self._resuming_at_epoch_end
        return StatefulDataLoader(
            PerSampleSeeded(dataset),
            batch_size=self.batch_size,
            sampler=sampler,
            # a dataset smaller than one batch would otherwise train on nothing, silently
            drop_last=len(sampler) >= self.batch_size,
            collate_fn=type(self).collate_train,
            **self._loader_kwargs(rank),
        )

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.val_batch_size,
            sampler=eval_sampler(dataset),
            collate_fn=type(self).collate_eval,
            **self._loader_kwargs(self._global_rank()),
        )

    def train_dataloader(self) -> StatefulDataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        assert self.train_dataset is not None
        return self._train_loader(self.train_dataset)

    def val_dataloader(self) -> DataLoader:
        if self.val_dataset is None:
            self.setup("validate")
        assert self.val_dataset is not None
        return self._eval_loader(self.val_dataset)

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
