"""Random states in checkpoints, per rank (plain tensors and lists: loadable with weights_only=True).

An exact resume restores every random stream (shuffle, augmentation, dropout, detector samplers) of
each rank from the checkpoint.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


# ---------------------------------------------------------------------------------------------
# random states in checkpoints (plain tensors and lists: loadable with weights_only=True)
# ---------------------------------------------------------------------------------------------
def collect_rng_states() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos)},
        "numpy_gauss": [int(has_gauss), float(cached)],
        "python": [int(version), list(internal), gauss_next],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _world() -> tuple[int, int]:
    """(global rank, world size) of the initialised process group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def gather_rng_states() -> dict[str, Any]:
    """Every rank's random states, indexed by global rank: ``{"world_size": W, "ranks": [states_0, ...]}``.

    Under DDP each rank's streams differ (e.g. Mask R-CNN's proposal and mask samplers draw from the
    global torch generator on each rank), so an exact resume restores each rank's own states. A
    collective: every rank must call it (Lightning dumps checkpoints on every rank, rank 0 writes).
    """
    states = collect_rng_states()
    rank, world = _world()
    if world == 1:
        return {"world_size": 1, "ranks": [states]}
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, states)
    return {"world_size": world, "ranks": gathered}


def rng_states_for_rank(saved: dict[str, Any], mid_epoch: bool) -> dict[str, Any]:
    """This rank's states from a checkpoint's ``rng_states`` (per-rank layout or the older rank-0-only one).

    Raises:
        ValueError: a mid-epoch checkpoint written with another number of processes (the random
            streams of the missing or extra ranks cannot be continued exactly).
    """
    if "ranks" not in saved:  # checkpoints written before per-rank states: rank 0's, on every rank
        return saved
    rank, world = _world()
    saved_world = int(saved["world_size"])
    if saved_world != world and mid_epoch:
        raise ValueError(
            f"cannot resume mid-epoch: the checkpoint holds the random states of {saved_world} process(es), "
            f"this run has {world}. Resume with the same number of processes, or from an end-of-epoch "
            "checkpoint."
        )
    return saved["ranks"][rank % saved_world]


def checkpoint_is_mid_epoch(checkpoint: dict[str, Any]) -> bool:
    """Whether a Lightning checkpoint was written after some but before the last of its epoch's
    training batches (a state rewritten as the start of an epoch has trained none of it)."""
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress", {})
    trained = int(progress.get("current", {}).get("processed", 1))
    return trained > 0 and not bool(progress.get("is_last_batch", True))


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    keys = states["numpy"]["keys"].numpy().astype(np.uint32)
    has_gauss, cached = states["numpy_gauss"]
    np.random.set_state(("MT19937", keys, states["numpy"]["pos"], has_gauss, cached))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
