"""``eval``: COCO evaluators, sliding-window inference and mIoU accumulation.

pycocotools vs faster-coco-eval on the same synthetic detections (the stats must match exactly),
ADE20K sliding-window vs whole-image inference with the tiny backbone and a 1×1 head, and
``SegmentationMetric.update`` per image as a fraction of slide inference.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from siglip_dense.benchmark.common import emit, ratio_table
from siglip_dense.benchmark.timing import time_interleaved
from siglip_dense.models import build_backbone

NAME = "eval"
HELP = "COCO evaluators, sliding-window inference, mIoU accumulation"


def synthetic_coco(
    n_images: int, n_cats: int = 20, per_image: int = 8, seed: int = 0
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A COCO ground-truth dict and noisy detections (jittered boxes + false positives)."""
    rng = np.random.default_rng(seed)
    images, anns, dets = [], [], []
    for i in range(1, n_images + 1):
        images.append({"id": i, "width": 640, "height": 480, "file_name": f"{i:06d}.jpg"})
        for _ in range(int(rng.integers(1, per_image * 2))):
            w, h = rng.uniform(4, 300, 2)
            x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
            cat = int(rng.integers(1, n_cats + 1))
            box = [float(x), float(y), float(w), float(h)]
            anns.append(
                {"id": len(anns) + 1, "image_id": i, "category_id": cat, "bbox": box, "area": float(w * h)}
            )
            anns[-1]["iscrowd"] = 0
            if rng.random() < 0.9:
                jit = rng.normal(0, 0.08, 4) * [w, h, w, h]
                dbox = [float(box[0] + jit[0]), float(box[1] + jit[1]), float(max(1.0, w + jit[2]))]
                dbox.append(float(max(1.0, h + jit[3])))
                dets.append({"image_id": i, "category_id": cat, "bbox": dbox, "score": float(rng.random())})
        for _ in range(int(rng.integers(0, per_image))):
            w, h = rng.uniform(4, 200, 2)
            box = [float(rng.uniform(0, 600)), float(rng.uniform(0, 440)), float(w), float(h)]
            cat = int(rng.integers(1, n_cats + 1))
            dets.append({"image_id": i, "category_id": cat, "bbox": box, "score": float(rng.random() * 0.5)})
    gt = {
        "images": images,
        "annotations": anns,
        "categories": [{"id": c, "name": f"c{c}"} for c in range(1, n_cats + 1)],
    }
    return gt, dets


def bench_coco(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    """pycocotools vs faster-coco-eval through ``evaluate_coco``; stats must be identical."""
    from siglip_dense.evaluation.coco_eval import evaluate_coco

    gt, dets = synthetic_coco(args.coco_images, seed=args.seed)
    stats: dict[str, dict[str, float | None]] = {}

    def run(name: str) -> Callable[[], None]:
        def fn() -> None:
            stats[name] = evaluate_coco(copy.deepcopy(gt), dets, evaluator=name)

        return fn

    impls = ("faster_coco_eval", "pycocotools")
    steps = {n: run(n) for n in impls}
    timed = time_interleaved(steps, torch.device("cpu"), 1, args.coco_iters, args.coco_iters, wall_clock=True)
    a, b = stats["faster_coco_eval"], stats["pycocotools"]
    diff = max(abs((a[k] or 0.0) - (b[k] or 0.0)) for k in a)
    match = a.keys() == b.keys() and diff < 1e-9 and all((a[k] is None) == (b[k] is None) for k in a)
    if not match:
        print(f"!!! COCO STATS MISMATCH (max |diff| {diff:.3g}):\n{a}\n{b}", file=sys.stderr, flush=True)
    for impl, (sec, _) in timed.items():
        row = {
            "bench": "eval",
            "group": f"coco_bbox_{args.coco_images}img",
            "impl": impl,
            "seconds": sec,
            "images_per_s": args.coco_images / sec,
            "n_images": args.coco_images,
            "n_detections": len(dets),
            "stats_match": bool(match),
            "max_abs_diff": diff,
            "bbox_AP": stats[impl]["bbox_AP"],
        }
        emit(row, rows)


def bench_sliding(args: argparse.Namespace, rows: list[dict[str, Any]]) -> float:
    """ADE20K single-scale sliding-window (and whole-image) inference with the tiny backbone."""
    from siglip_dense.evaluation.sliding_window import inference_with_tta

    device = torch.device(args.device)
    backbone = build_backbone(args.arch, verbose=False).to(device).eval()
    head = nn.Conv2d(backbone.arch_config.embed_dim, 150, 1).to(device).eval()

    def model_fn(x: torch.Tensor) -> torch.Tensor:
        feats = backbone(x)
        return head(next(iter(feats.values())))

    h, w = args.seg_size
    image = torch.randn(1, 3, h, w, device=device)
    steps = {
        mode: (lambda mode=mode: inference_with_tta(model_fn, image, 150, crop_size=(512, 512), mode=mode))
        for mode in ("slide", "whole")
    }
    timed = time_interleaved(steps, device, 1, args.seg_iters, args.seg_iters)
    for mode, (sec, mem) in timed.items():
        row = {
            "bench": "eval",
            "group": f"ade20k_infer_{h}x{w}",
            "impl": f"{args.arch}_{mode}",
            "images_per_s": 1.0 / sec,
            "ms_per_image": sec * 1e3,
            "peak_mem_mib": mem,
            "device": str(device),
        }
        emit(row, rows)
    return timed["slide"][0]


def bench_miou(args: argparse.Namespace, rows: list[dict[str, Any]], slide_sec: float) -> None:
    """``SegmentationMetric.update`` per S×S image (default 512): label maps and 150-class logits."""
    from siglip_dense.evaluation.seg_metrics import SegmentationMetric

    device = torch.device(args.device)
    metric = SegmentationMetric(150).to(device)
    g = torch.Generator().manual_seed(args.seed)
    size = args.miou_size
    target = torch.randint(0, 150, (1, size, size), generator=g).to(device)
    labels = torch.randint(0, 150, (1, size, size), generator=g).to(device)
    logits = torch.randn(1, 150, size, size, generator=g).to(device)
    steps = {
        "labels": lambda: metric.update(labels, target),
        "logits_argmax": lambda: metric.update(logits, target),
    }
    timed = time_interleaved(steps, device, 2, args.miou_iters, 5)
    for impl, (sec, _) in timed.items():
        row = {
            "bench": "eval",
            "group": f"miou_update_{size}",
            "impl": impl,
            "ms_per_image": sec * 1e3,
            "images_per_s": 1.0 / sec,
            "fraction_of_slide_inference": sec / slide_sec,
        }
        emit(row, rows)


def bench_eval(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    bench_coco(args, rows)
    slide_sec = bench_sliding(args, rows)
    bench_miou(args, rows, slide_sec)
    return rows


def eval_summary(rows: list[dict[str, Any]]) -> str:
    """COCO ratio (faster-coco-eval's speed-up), inference rates and mIoU overhead."""
    coco = [r for r in rows if r["group"].startswith("coco")]
    lines = [ratio_table(coco, "seconds", "faster_coco_eval", higher_is_better=False)]
    lines.append(f"COCO stats identical: {all(r['stats_match'] for r in coco)}")
    lines.append(f"{'group':<22}{'impl':<22}{'img/s':>10}{'ms/img':>10}")
    for r in rows:
        if not r["group"].startswith("coco"):
            lines.append(
                f"{r['group']:<22}{r['impl']:<22}{r['images_per_s']:>10.2f}{r['ms_per_image']:>10.2f}"
            )
    for r in rows:
        if r["group"].startswith("miou_update"):
            lines.append(
                f"mIoU update ({r['impl']}) = {100 * r['fraction_of_slide_inference']:.2f}% of slide inference"
            )
    return "\n".join(lines)


def add_arguments(e: argparse.ArgumentParser, default_device: str) -> None:
    e.add_argument("--coco-images", type=int, default=200)
    e.add_argument("--coco-iters", type=int, default=3)
    e.add_argument("--arch", default="tiny")
    e.add_argument("--seg-size", type=int, nargs=2, default=[512, 683], metavar=("H", "W"))
    e.add_argument("--seg-iters", type=int, default=3)
    e.add_argument("--miou-iters", type=int, default=20)
    e.add_argument("--miou-size", type=int, default=512, help="side of the square label map")
    e.add_argument("--device", default=default_device)
    e.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> tuple[list[str], str]:
    """JSON lines of the measurements and the summary table."""
    rows = bench_eval(args)
    return [json.dumps(r) for r in rows], eval_summary(rows)
