"""Training order and augmentation seeds that survive resume: the sampler, the per-sample seeded view, the
worker seeding, and the evaluation sampler (no padding repeats under DDP).

Every data module's loaders use these (:class:`siglip_dense.data.base.DenseDataModule`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler

from siglip_dense.data.skip import is_skipped, substitute
from siglip_dense.data.transforms import seed_transform


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
    integer key loads the sample with the transform's current RNG state. A bad sample (``skip_bad``)
    is replaced by a substitute drawn from the whole split with the sample's seed
    (:func:`siglip_dense.data.skip.substitute`).
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: SeededIndex | int) -> Any:
        seed = None
        if isinstance(key, SeededIndex):
            transform = getattr(self.dataset, "transform", None)
            if transform is not None and hasattr(transform, "set_random_state"):
                seed_transform(transform, key.seed)
            key, seed = key.index, key.seed
        item = self.dataset[key]
        if is_skipped(item):  # skip_bad: a uniformly drawn, seeded substitute (siglip_dense.data.skip)
            item = substitute(self.dataset, int(key), seed, item)
        return item


class ResumableDistributedSampler(DistributedSampler):
    """Shuffled training order, split across ranks, that resumes mid-epoch (``state_dict``/``load_state_dict``).

    A ``DistributedSampler`` so that Lightning keeps it under DDP (it replaces any other sampler with a
    plain ``DistributedSampler``); with ``num_replicas=1`` it is the single-process sampler too. The
    order of epoch ``e`` is a permutation seeded by (seed, e, pass), padded and split by rank as torch's
    ``DistributedSampler`` does; each yielded :class:`SeededIndex` carries the sample's augmentation seed.

    The state (epoch, completed passes, samples yielded in the current pass) is read by torchdata's
    ``StatefulDataLoader`` when it snapshots (Lightning stores that in checkpoints). Loading it resumes
    right after the last sample of the saved position; a saved pass that was spent (every sample of
    it yielded) resumes with the next pass. A resume at an epoch boundary loads no position: the
    loop's ``set_epoch`` starts the next epoch (:class:`siglip_dense.callbacks.RestoreLoaderStates`).
    """

    def __init__(self, dataset: Sized, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)  # type: ignore[arg-type]
        self.passes = 0  # passes completed in this epoch
        self.yielded = 0  # samples yielded by the pass in progress
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
        """Continue from ``state``; raises ValueError when the data or world size changed mid-pass."""
        per_rank = math.ceil(int(state["dataset_len"]) / int(state["num_replicas"]))
        if int(state["yielded"]) >= per_rank:  # spent: nothing of this pass is left to continue
            self.epoch, self.passes = int(state["epoch"]), int(state["passes"]) + 1
            self.yielded, self._resume_from = 0, None
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
