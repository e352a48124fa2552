"""``train-step``: one full optimisation step per task and variant (toy batch already on the device).

Each task is built from ``configs/`` (``experiment=toy_seg / toy_depth / toy_det``) with Hydra
overrides per variant (grad checkpointing, channels-last, compile, window attention); counted FLOPs
per step and, on a known GPU, model FLOP utilisation.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from siglip_dense.benchmark.common import DTYPES, device_name, emit, peak_tflops, ratio_table
from siglip_dense.benchmark.timing import time_interleaved

NAME = "train-step"
HELP = "one training step per task, with/without grad checkpointing"


TRAIN_EXPERIMENTS = {"seg_upernet": "toy_seg", "depth_dpt": "toy_depth", "det_mask_rcnn": "toy_det"}


# memory/speed switches compared against "plain" (Hydra overrides of train.yaml)
TRAIN_VARIANTS: dict[str, list[str]] = {
    "plain": [],
    "grad_checkpointing": ["backbone.grad_checkpointing=true"],
    "channels_last": ["channels_last=true"],
    "compile": ["compile=true"],
    "window_attention": ["backbone.window_size=14"],
}


def count_flops(step: Callable[[], None]) -> float:
    """FLOPs of one call, counted by torch's dispatcher (every matmul/conv of forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    # torch counts the GPU attention kernels but not the CPU flash kernel: same formula for it
    aten = torch.ops.aten

    def cpu_attention(query, key, value, *args, out_shape=None, **kwargs) -> int:  # noqa: ANN001
        return sdpa_flop_count(query, key, value)

    def cpu_attention_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:  # noqa: ANN001
        return sdpa_backward_flop_count(grad_out, query, key, value)

    mapping = {
        aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_attention_backward,
    }
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        step()
    return float(counter.get_total_flops())


def build_train_step(
    experiment: str,
    overrides: list[str],
    data_dir: Path,
    device: torch.device,
    amp: str = "fp32",
    seed: int = 0,
) -> tuple:
    """Compose ``configs/train.yaml`` with ``experiment``; return (step fn, batch size)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    from siglip_dense.train import build_task

    GlobalHydra.instance().clear()
    from siglip_dense.config_check import CONFIG_DIR

    config_dir = str(CONFIG_DIR)
    with initialize_config_dir(version_base="1.3", config_dir=config_dir):
        cfg = compose(
            "train", overrides=[f"experiment={experiment}", f"paths.data_dir={data_dir}", *overrides]
        )
    GlobalHydra.instance().clear()
    import lightning as L

    L.seed_everything(seed, verbose=False)  # same weights and batch for every variant of a task
    datamodule = instantiate(cfg.data, _convert_="all")
    task = build_task(cfg, datamodule)
    if cfg.get("channels_last"):
        task.use_channels_last()
    if cfg.get("compile"):
        task.compile_backbone(**dict(cfg.get("compile_options") or {}))
    datamodule.mean, datamodule.std = tuple(task.mean), tuple(task.std)
    datamodule.num_workers = 0
    if hasattr(datamodule, "prepare_data"):
        datamodule.prepare_data()
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    task = task.to(device).train()
    batch = task.transfer_batch_to_device(batch, device, 0)
    task.scheduler_cfg = {**dict(task.scheduler_cfg), "total_steps": 1000}
    optimizer = task.configure_optimizers()["optimizer"]

    autocast = torch.autocast(device.type, dtype=DTYPES[amp], enabled=amp != "fp32")

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = task.training_step(batch, 0)
        loss.backward()
        optimizer.step()

    images = batch["image"] if "image" in batch else batch["images"]
    return step, len(images)


def bench_train_step(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Images/s, peak memory and model FLOP utilisation of a training step per task and variant."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    device = torch.device(args.device)
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="bench_train_"))
    peak = peak_tflops(device)
    rows: list[dict[str, Any]] = []
    for task_name in args.tasks:
        steps, sizes = {}, {}
        for variant in args.variants:
            extra = [*args.overrides, f"data.batch_size={args.batch_size}", *TRAIN_VARIANTS[variant]]
            steps[variant], sizes[variant] = build_train_step(
                TRAIN_EXPERIMENTS[task_name], extra, data_dir, device, args.amp, args.seed
            )
        # model FLOPs of the plain step (recomputation by checkpointing is not model work)
        flops = count_flops(steps[args.variants[0]]) if args.count_flops else None
        timed = time_interleaved(steps, device, args.warmup, args.iters, args.rounds)
        for impl, (sec, mem) in timed.items():
            tflops = flops / sec / 1e12 if flops else None
            row = {
                "bench": "train-step",
                "group": task_name,
                "impl": impl,
                "batch_size": sizes[impl],
                "images_per_s": sizes[impl] / sec,
                "ms_per_step": sec * 1e3,
                "amp": args.amp,
                "peak_mem_mib": mem,
                "step_tflop": flops / 1e12 if flops else None,
                "tflops": tflops,
                "mfu": tflops / peak if tflops and peak else None,
                "device": device_name(device),
            }
            emit(row, rows)
    return rows


def add_arguments(t: argparse.ArgumentParser, default_device: str) -> None:
    t.add_argument("--tasks", nargs="*", default=list(TRAIN_EXPERIMENTS), choices=list(TRAIN_EXPERIMENTS))
    t.add_argument("--batch-size", type=int, default=2)
    t.add_argument("--overrides", nargs="*", default=[], help="extra Hydra overrides (e.g. backbone=b16)")
    t.add_argument("--data-dir", type=Path, default=None, help="where the toy data lives (default: temp)")
    t.add_argument("--device", default=default_device)
    t.add_argument("--amp", choices=sorted(DTYPES), default="fp32", help="autocast dtype of the step")
    t.add_argument(
        "--variants",
        nargs="*",
        default=["plain", "grad_checkpointing"],
        choices=list(TRAIN_VARIANTS),
        help="compared against the first (compile: GPU, minutes of compiling; window_attention: det)",
    )
    t.add_argument("--no-count-flops", dest="count_flops", action="store_false")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--warmup", type=int, default=2)
    t.add_argument("--iters", type=int, default=8)
    t.add_argument("--rounds", type=int, default=4)


def run(args: argparse.Namespace) -> tuple[list[str], str]:
    """JSON lines of the measurements and the ratio table against the first variant."""
    rows = bench_train_step(args)
    return [json.dumps(r) for r in rows], ratio_table(rows, "images_per_s", args.variants[0])
