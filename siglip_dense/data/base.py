"""The LightningDataModule every task's data module builds on: seeds, rank, train / evaluation loaders."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from siglip_dense.data.samplers import (
    PerSampleSeeded,
    ResumableDistributedSampler,
    eval_sampler,
    seed_worker,
    worker_seed,
)
from siglip_dense.data.skip import collate_kept


def stack_batch(batch: list[dict[str, Any]], target: str) -> dict[str, Any]:
    """Training batches: fixed-size crops stacked (``image`` and ``target``); ``meta`` stays a list of
    per-image dicts (error messages read their paths)."""
    return {
        "image": torch.stack([b["image"] for b in batch]),
        target: torch.stack([b[target] for b in batch]),
        "meta": [b["meta"] for b in batch],
    }


def list_batch(batch: list[dict[str, Any]], target: str) -> dict[str, Any]:
    """Evaluation (and detection) batches: lists of per-image tensors, each at its own size."""
    return {
        "image": [b["image"] for b in batch],
        target: [b[target] for b in batch],
        "meta": [b["meta"] for b in batch],
    }


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
            # a sample that fails after the scan (skip_bad) is dropped from its batch, never replaced
            collate_fn=functools.partial(collate_kept, collate=type(self).collate_eval),
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
