"""The normal metric under DDP (gloo, 2 processes): a rank with no valid pixel and another number of
updates reaches every collective as often as the others (no hang) and gets the same, exact result.

Kept apart from the other normals tests so that the spawned ranks import only torch and the metric.
"""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from siglip_dense.evaluation.normal_metrics import NORMAL_METRIC_KEYS, NormalMetric


def unit_field(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    g = rng.normal(size=(h, w, 3))
    return (g / np.linalg.norm(g, axis=-1, keepdims=True)).astype(np.float32)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_metric(rank: int, port: int, pred: np.ndarray, gt: np.ndarray, out: str) -> None:
    """Rank 0 holds every image, rank 1 only an image without a valid pixel, and one more update."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        metric = NormalMetric()
        p, g = torch.from_numpy(pred).permute(0, 3, 1, 2), torch.from_numpy(gt).permute(0, 3, 1, 2)
        if rank == 0:
            metric.update(p, g)
        else:
            metric.update(p[:1], torch.zeros_like(g[:1]))
            metric.update(p[:1], torch.zeros_like(g[:1]))
        result = metric.compute()
        torch.save(result, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_metric_ranks_with_no_valid_pixel_and_other_batch_counts_agree(tmp_path: Path) -> None:
    """Every collective is reached by every rank the same number of times (a rank with no valid pixel
    and a different number of updates must neither hang nor change the result)."""
    rng = np.random.default_rng(2)
    gt = np.stack([unit_field(rng, 7, 9) for _ in range(3)])
    pred = np.stack([unit_field(rng, 7, 9) for _ in range(3)])
    out = str(tmp_path / "m")
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_rank_metric, args=(r, port, pred, gt, out)) for r in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0, "a rank hung or failed"
    from tests.test_normals import numpy_normal_metrics

    want = numpy_normal_metrics(list(pred), list(gt))
    for rank in range(2):
        got = torch.load(f"{out}.{rank}")
        assert got["num_images"] == 5 and got["num_empty"] == 2
        for key in NORMAL_METRIC_KEYS:
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-6), (rank, key)
