"""Round-robin timing of peers that do the same work, shared by every benchmark.

Running the peers in alternation (rather than one after the other) spreads a noisy machine's slow
phases over all of them, so the ratios stay meaningful even when absolute times wobble.

Two clocks:

- default (backbone, sliding-window inference, mIoU update, train-step: torch work that may run on a
  GPU): ``torch.utils.benchmark.Timer``, which synchronises the accelerator around each run and
  keeps the thread count fixed. Each round is one ``Timer.timeit(n)`` per peer (the Timer adds its
  own ≥ 2 warm-up calls per round); the result is the median over rounds of the per-call mean.
- ``wall_clock=True`` (data pipelines, COCO evaluation: CPU-only numpy / OpenCV / PIL /
  pycocotools work): ``time.perf_counter`` around each call, the result the median over calls.
  Augmenting one image costs very different amounts with the random crop and scale drawn, so the
  median is taken per call rather than of a mean over ``n``; the Timer's extra warm-up calls would
  repeat a whole COCO evaluation per round, and its accelerator synchronisation would time a GPU
  queue that a DataLoader worker never touches.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.utils.benchmark import Timer


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], None], device: torch.device, iters: int) -> list[float]:
    """Wall-clock seconds of each of ``iters`` calls (synchronised on CUDA)."""
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _timer_seconds(timer: Timer, number: int) -> list[float]:
    """Mean seconds per call over ``number`` calls, as one sample (``Timer.timeit``)."""
    return [timer.timeit(number).mean]


def time_interleaved(
    fns: dict[str, Callable[[], None]],
    device: torch.device,
    warmup: int,
    iters: int,
    rounds: int,
    wall_clock: bool = False,
) -> dict[str, tuple[float, float | None]]:
    """Median seconds per call and peak CUDA memory (MiB, ``None`` on CPU) of each peer.

    Every peer is called ``warmup`` times, then ``rounds`` times in turn for ``max(1, iters //
    rounds)`` timed calls. ``wall_clock`` switches from ``torch.utils.benchmark.Timer`` to a wall
    clock around each call (see the module docstring for when each fits).
    """
    per_round = max(1, iters // rounds)
    threads = torch.get_num_threads()  # Timer would otherwise pin one thread
    timers = {name: Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads) for name, fn in fns.items()}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    peaks: dict[str, float | None] = dict.fromkeys(fns)
    for fn in fns.values():
        time_calls(fn, device, warmup)
    for _ in range(rounds):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            if wall_clock:
                samples[name] += time_calls(fn, device, per_round)
            else:
                samples[name] += _timer_seconds(timers[name], per_round)
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device) / 2**20
                peaks[name] = max(peaks[name] or 0.0, peak)
    return {name: (sorted(t)[len(t) // 2], peaks[name]) for name, t in samples.items()}


__all__ = ["sync", "time_calls", "time_interleaved"]
