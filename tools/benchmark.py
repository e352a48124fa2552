"""Benchmarks against the peers, all measured in one run (machines are noisy: read the ratios).

    python tools/benchmark.py backbone --arch so400m16 --img-size 512 --batch-size 8 --dtype bf16
    python tools/benchmark.py backbone --arch tiny --img-size 224 --batch-size 4      # CPU smoke
    python tools/benchmark.py data --images 16 --iters 40      # augmentation images/s per worker
    python tools/benchmark.py eval --coco-images 200           # COCO eval, sliding window, mIoU update
    python tools/benchmark.py train-step --batch-size 2        # one training step per task and variant

Each measurement prints one JSON line; a summary table with ratios against ours follows.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from siglip_dense.models import build_backbone  # noqa: E402
from siglip_dense.models.backbone import arch_config_of, create_vit  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Measurement:
    bench: str
    impl: str
    mode: str  # forward | forward_backward
    arch: str
    img_size: int
    batch_size: int
    dtype: str
    device: str
    images_per_s: float
    ms_per_iter: float
    peak_mem_mib: float | None
    tflops: float | None = None
    mfu: float | None = None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], None], device: torch.device, iters: int) -> list[float]:
    """Seconds per call for ``iters`` calls (synchronised on CUDA)."""
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def time_interleaved(
    fns: dict[str, Callable[[], None]], device: torch.device, warmup: int, iters: int, rounds: int
) -> dict[str, tuple[float, float | None]]:
    """Median seconds per call and peak memory (CUDA, MiB) for each peer, measured in alternation.

    Running the peers round-robin (rather than one after the other) spreads a noisy machine's slow
    phases over all of them, so the ratios stay meaningful even when absolute times wobble.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    peaks: dict[str, float | None] = dict.fromkeys(fns)
    for fn in fns.values():
        time_calls(fn, device, warmup)
    for _ in range(rounds):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times[name] += time_calls(fn, device, max(1, iters // rounds))
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device) / 2**20
                peaks[name] = max(peaks[name] or 0.0, peak)
    return {name: (sorted(t)[len(t) // 2], peaks[name]) for name, t in times.items()}


def hf_config_for(arch: str, img_size: int):
    """A transformers SiglipVisionConfig with the same shapes and numerics as ``arch``."""
    from transformers import SiglipVisionConfig

    cfg = arch_config_of(arch)
    return SiglipVisionConfig(
        hidden_size=cfg.embed_dim,
        intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.num_heads,
        patch_size=cfg.patch_size,
        image_size=img_size - img_size % cfg.patch_size,
        layer_norm_eps=cfg.norm_eps,
        hidden_act="gelu_pytorch_tanh",
        attn_implementation="sdpa",
    )


def build_peers(arch: str, img_size: int, device: torch.device, dtype: torch.dtype) -> dict[str, nn.Module]:
    """Ours, plain timm and transformers, all holding the same (random) weights."""
    from transformers import SiglipVisionModel

    size = img_size - img_size % arch_config_of(arch).patch_size
    with tempfile.TemporaryDirectory() as tmp:
        hf = SiglipVisionModel(hf_config_for(arch, size)).eval()
        hf.save_pretrained(tmp)
        ours = build_backbone(checkpoint=tmp, img_size=size, verbose=False).eval()
    plain = create_vit(ours.arch_config, dynamic_img_size=False, dynamic_img_pad=False).eval()
    plain.load_state_dict(ours.vit.state_dict())
    return {
        "siglip_dense": _Ours(ours).to(device, dtype),
        "timm": _Ours(plain).to(device, dtype),
        "transformers": _HF(hf).to(device, dtype),
    }


class _Ours(nn.Module):
    """Both ours and plain timm expose ``forward_features`` (final normed tokens)."""

    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m.forward_features(x)


class _HF(_Ours):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m(pixel_values=x).last_hidden_state


def vit_flops(arch: str, img_size: int, batch: int) -> float:
    """Forward FLOPs of the encoder (matmuls only: 2·MACs), counted from the shapes."""
    cfg = arch_config_of(arch)
    n = (img_size // cfg.patch_size) ** 2
    d, m, depth = cfg.embed_dim, cfg.mlp_dim, cfg.depth
    per_block = 2 * n * (4 * d * d + 2 * d * m) + 2 * 2 * n * n * d
    patch = 2 * n * d * 3 * cfg.patch_size**2
    return float(batch * (depth * per_block + patch))


def peak_tflops(device: torch.device) -> float | None:
    """Dense bf16 peak of the device, for model FLOP utilisation (None when unknown)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in (("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0)):
        if key in name:
            return value
    return None


def bench_backbone(args: argparse.Namespace) -> list[Measurement]:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    peers = build_peers(args.arch, args.img_size, device, dtype)
    size = args.img_size - args.img_size % arch_config_of(args.arch).patch_size
    x = torch.randn(args.batch_size, 3, size, size, device=device, dtype=dtype)
    flops = vit_flops(args.arch, size, args.batch_size)
    peak = peak_tflops(device)
    results = []
    for mode in ("forward", "forward_backward"):
        steps = {}
        for impl, model in peers.items():
            if args.grad_checkpointing and impl == "siglip_dense":
                model.m.set_grad_checkpointing(True)
            model.train(mode == "forward_backward")

            def step(model: nn.Module = model, mode: str = mode) -> None:
                if mode == "forward":
                    with torch.no_grad():
                        model(x)
                else:
                    model(x).float().mean().backward()

            steps[impl] = step
        timed = time_interleaved(steps, device, args.warmup, args.iters, args.rounds)
        for impl, (sec, mem) in timed.items():
            work = flops * (3 if mode == "forward_backward" else 1)
            tflops = work / sec / 1e12
            m = Measurement(
                bench="backbone",
                impl=impl,
                mode=mode,
                arch=args.arch,
                img_size=size,
                batch_size=args.batch_size,
                dtype=args.dtype,
                device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                images_per_s=args.batch_size / sec,
                ms_per_iter=sec * 1e3,
                peak_mem_mib=mem,
                tflops=tflops,
                mfu=tflops / peak if peak else None,
            )
            print(json.dumps(asdict(m)), flush=True)
            results.append(m)
    return results


def summary(results: list[Measurement]) -> str:
    """Table of images/s and memory, with ratios against ours for each mode."""
    lines = [f"{'mode':<18}{'impl':<14}{'img/s':>10}{'ratio':>8}{'peak MiB':>10}{'MFU':>7}"]
    for mode in dict.fromkeys(m.mode for m in results):
        rows = [m for m in results if m.mode == mode]
        ours = next(m for m in rows if m.impl == "siglip_dense")
        for m in rows:
            ratio = ours.images_per_s / m.images_per_s
            mem = f"{m.peak_mem_mib:.0f}" if m.peak_mem_mib is not None else "n/a"
            mfu = f"{100 * m.mfu:.1f}%" if m.mfu is not None else "n/a"
            lines.append(f"{mode:<18}{m.impl:<14}{m.images_per_s:>10.1f}{ratio:>8.3f}{mem:>10}{mfu:>7}")
    lines.append("ratio = our images/s ÷ that implementation's (≥ 1 means we are as fast or faster)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# shared: generic rows (one JSON object each) and a ratio table against a reference implementation
# ---------------------------------------------------------------------------------------------
def emit(row: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Print one measurement as a JSON line and keep it."""
    print(json.dumps(row), flush=True)
    rows.append(row)


def ratio_table(rows: list[dict[str, Any]], key: str, ref: str, higher_is_better: bool = True) -> str:
    """Rows grouped by ``group``; ratio = ``ref``'s advantage over each impl on ``key``."""
    lines = [f"{'group':<22}{'impl':<22}{key:>14}{'ratio':>9}"]
    for group in dict.fromkeys(r["group"] for r in rows if key in r):
        grp = [r for r in rows if r["group"] == group and key in r]
        base = next((r for r in grp if r["impl"] == ref), grp[0])
        for r in grp:
            ratio = base[key] / r[key] if higher_is_better else r[key] / base[key]
            lines.append(f"{group:<22}{r['impl']:<22}{r[key]:>14.2f}{ratio:>9.2f}")
    better = "faster" if higher_is_better else "cheaper"
    lines.append(f"ratio = {ref}'s advantage over that impl on {key} (> 1: {ref} is {better})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# data: augmentation throughput per worker, ours (albumentations) vs torchvision.transforms.v2
# ---------------------------------------------------------------------------------------------
def synthetic_seg_samples(n: int, h: int, w: int, num_classes: int, seed: int = 0) -> list[tuple]:
    """Decoded ADE20K-like samples: uint8 RGB H×W×3 and a blocky uint8 label map (some 255)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        grid = rng.integers(0, num_classes, (8, 11), dtype=np.uint8)
        grid[rng.random(grid.shape) < 0.1] = 255
        mask = np.ascontiguousarray(np.kron(grid, np.ones((h // 8 + 1, w // 11 + 1), np.uint8))[:h, :w])
        out.append((img, mask))
    return out


def toy_seg_samples(root: Path, n: int) -> list[tuple]:
    """Decoded samples from an ADE20K-layout root (``images/training`` + ``annotations/training``)."""
    from PIL import Image

    images = sorted((root / "images" / "training").glob("*.jpg"))[:n]
    out = []
    for p in images:
        ann = root / "annotations" / "training" / (p.stem + ".png")
        out.append((np.array(Image.open(p).convert("RGB")), np.array(Image.open(ann))))
    if not out:
        raise FileNotFoundError(f"no images under {root}/images/training")
    return out


def tv_seg_transform(crop: int, mean: tuple[float, ...], std: tuple[float, ...]) -> Callable:
    """torchvision v2 counterpart of the ADE20K recipe (short side 256..1024 ≈ ratio 0.5–2 × 512)."""
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.RandomResize(crop // 2, crop * 2),
            v2.RandomCrop(crop, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: 255}),
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(brightness=32 / 255, contrast=(0.5, 1.5), saturation=(0.5, 1.5), hue=18 / 360),
            v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
        ]
    )


def tv_det_transform(size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> Callable:
    """torchvision v2 LSJ: ScaleJitter(0.1–2.0) → crop/pad → flip → sanitize → normalise."""
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.ScaleJitter((size, size), scale_range=(0.1, 2.0)),
            v2.RandomCrop(size, pad_if_needed=True, fill=0),
            v2.RandomHorizontalFlip(),
            v2.SanitizeBoundingBoxes(min_size=1.0),
            v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
        ]
    )


def tv_depth_transform(crop: tuple[int, int], mean: tuple[float, ...], std: tuple[float, ...]) -> Callable:
    """torchvision v2 NYU/BTS: rotate ±2.5° → crop → flip → colour → normalise (depth as a Mask)."""
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.RandomRotation(2.5, fill=0),
            v2.RandomCrop(crop, pad_if_needed=True, fill=0),
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(brightness=(0.75, 1.25), saturation=(0.9, 1.1)),
            v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
        ]
    )


def _cycler(samples: list[Any]) -> Callable[[], Any]:
    """Return the samples in turn, forever."""
    state = {"i": 0}

    def nxt() -> Any:
        state["i"] = (state["i"] + 1) % len(samples)
        return samples[state["i"]]

    return nxt


def data_steps(args: argparse.Namespace) -> dict[str, dict[str, Callable[[], None]]]:
    """Per pipeline, one callable per implementation that augments one image."""
    from torchvision import tv_tensors

    from siglip_dense.data import transforms as T

    mean = std = (0.5, 0.5, 0.5)
    groups: dict[str, dict[str, Callable[[], None]]] = {}
    if args.root is not None:
        seg = toy_seg_samples(args.root, args.images)
    elif args.toy:
        from siglip_dense.data.toy import ensure_toy_data

        tmp = Path(tempfile.mkdtemp(prefix="bench_toy_"))
        ensure_toy_data(tmp)
        root = next(p.parents[2] for p in tmp.rglob("images/training/*.jpg"))
        seg = toy_seg_samples(root, args.images)
    else:
        seg = synthetic_seg_samples(args.images, 512, 683, 150, args.seed)
    seg_next = _cycler(seg)
    ours_seg = T.build_seg_train_transform((args.crop, args.crop), mean=mean, std=std, seed=args.seed)
    tv_seg = tv_seg_transform(args.crop, mean, std)

    def tv_seg_step() -> None:
        img, mask = seg_next()
        tv_seg(
            tv_tensors.Image(torch.from_numpy(img).permute(2, 0, 1)), tv_tensors.Mask(torch.from_numpy(mask))
        )

    groups[f"ade20k_{args.crop}"] = {
        "siglip_dense": lambda: ours_seg(**dict(zip(("image", "mask"), seg_next()))),
        "torchvision_v2": tv_seg_step,
    }
    if "det" in args.pipelines:
        rng = np.random.default_rng(args.seed)
        det = []
        for _ in range(max(2, args.images // 2)):
            img = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
            xy = rng.uniform(0, 400, (7, 2))
            wh = rng.uniform(10, 200, (7, 2))
            boxes = np.concatenate([xy, wh], 1).astype(np.float32)
            masks = np.zeros((7, 480, 640), np.uint8)
            for k, (x, y, bw, bh) in enumerate(boxes.astype(int)):
                masks[k, y : y + bh, x : x + bw] = 1
            det.append((img, boxes, rng.integers(1, 80, 7), masks))
        det_next = _cycler(det)
        ours_det = T.build_det_train_transform(args.det_size, mean=mean, std=std, seed=args.seed)
        tv_det = tv_det_transform(args.det_size, mean, std)

        def ours_det_step() -> None:
            img, boxes, labels, masks = det_next()
            T.apply_det_transform(ours_det, img, boxes, labels, masks)

        def tv_det_step() -> None:
            img, boxes, labels, masks = det_next()
            xyxy = torch.from_numpy(boxes).clone()
            xyxy[:, 2:] += xyxy[:, :2]
            target = {
                "boxes": tv_tensors.BoundingBoxes(xyxy, format="XYXY", canvas_size=img.shape[:2]),
                "masks": tv_tensors.Mask(torch.from_numpy(masks)),
                "labels": torch.from_numpy(labels),
            }
            tv_det(tv_tensors.Image(torch.from_numpy(img).permute(2, 0, 1)), target)

        groups[f"coco_lsj_{args.det_size}"] = {"siglip_dense": ours_det_step, "torchvision_v2": tv_det_step}
    if "depth" in args.pipelines:
        rng = np.random.default_rng(args.seed)
        dep = [
            (
                rng.integers(0, 256, (480, 640, 3), dtype=np.uint8),
                rng.uniform(0.5, 10, (480, 640)).astype(np.float32),
            )
            for _ in range(max(2, args.images // 2))
        ]
        dep_next = _cycler(dep)
        crop = (416, 544)
        ours_dep = T.build_depth_train_transform(crop, mean=mean, std=std, seed=args.seed)
        tv_dep = tv_depth_transform(crop, mean, std)

        def tv_dep_step() -> None:
            img, depth = dep_next()
            tv_dep(
                tv_tensors.Image(torch.from_numpy(img).permute(2, 0, 1)),
                tv_tensors.Mask(torch.from_numpy(depth)),
            )

        groups["nyu_416x544"] = {
            "siglip_dense": lambda: ours_dep(**dict(zip(("image", "mask"), dep_next()))),
            "torchvision_v2": tv_dep_step,
        }
    return groups


def bench_data(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Images/s per worker (one process, one thread) and the workers needed for the target rate."""
    torch.set_num_threads(1)  # a DataLoader worker runs single-threaded
    import cv2

    cv2.setNumThreads(0)
    rows: list[dict[str, Any]] = []
    for group, steps in data_steps(args).items():
        timed = time_interleaved(steps, torch.device("cpu"), args.warmup, args.iters, args.rounds)
        for impl, (sec, _) in timed.items():
            ips = 1.0 / sec
            row = {
                "bench": "data",
                "group": group,
                "impl": impl,
                "images_per_s": ips,
                "ms_per_image": sec * 1e3,
                "target_images_per_s": args.target_images_per_s,
                "workers_needed": math.ceil(args.target_images_per_s / ips),
            }
            emit(row, rows)
    return rows


def data_summary(rows: list[dict[str, Any]], target: float) -> str:
    """Ratio table plus the workers each pipeline needs to feed ``target`` images/s."""
    lines = [ratio_table(rows, "images_per_s", "siglip_dense")]
    lines.append(f"workers needed for {target:.0f} images/s (assumed GPU consumption rate):")
    lines += [f"  {r['group']:<20}{r['impl']:<20}{r['workers_needed']:>5}" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# eval: COCO evaluators, sliding-window inference, mIoU accumulation
# ---------------------------------------------------------------------------------------------
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
    timed = time_interleaved(
        {n: run(n) for n in impls}, torch.device("cpu"), 1, args.coco_iters, args.coco_iters
    )
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


# ---------------------------------------------------------------------------------------------
# train-step: one full optimisation step per task (toy-sized batch, already on the device)
# ---------------------------------------------------------------------------------------------
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
    config_dir = str(Path(__file__).resolve().parents[1] / "configs")
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
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            }
            emit(row, rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="bench", required=True)
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p = sub.add_parser("backbone", help="ours vs plain timm vs transformers SiglipVisionModel")
    p.add_argument("--arch", default="tiny")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--device", default=default_device)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20, help="timed calls per peer, over all rounds")
    p.add_argument("--rounds", type=int, default=5, help="round-robin rounds over the peers")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON lines here")

    d = sub.add_parser("data", help="augmentation images/s per worker: ours vs torchvision.transforms.v2")
    d.add_argument("--images", type=int, default=16, help="decoded images to cycle through")
    d.add_argument("--root", type=Path, default=None, help="ADE20K-layout root (default: synthetic)")
    d.add_argument("--toy", action="store_true", help="use the toy generator's ADE20K-layout data")
    d.add_argument("--crop", type=int, default=512)
    d.add_argument("--det-size", type=int, default=1024)
    d.add_argument("--pipelines", nargs="*", default=["det", "depth"], choices=["det", "depth"])
    d.add_argument(
        "--target-images-per-s",
        type=float,
        default=400.0,
        help="GPU consumption rate to feed (assumption: ADE20K UPerNet recipe on one H100)",
    )
    d.add_argument("--warmup", type=int, default=3)
    d.add_argument("--iters", type=int, default=40)
    d.add_argument("--rounds", type=int, default=4)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", type=Path, default=None)

    e = sub.add_parser("eval", help="COCO evaluators, sliding-window inference, mIoU accumulation")
    e.add_argument("--coco-images", type=int, default=200)
    e.add_argument("--coco-iters", type=int, default=3)
    e.add_argument("--arch", default="tiny")
    e.add_argument("--seg-size", type=int, nargs=2, default=[512, 683], metavar=("H", "W"))
    e.add_argument("--seg-iters", type=int, default=3)
    e.add_argument("--miou-iters", type=int, default=20)
    e.add_argument("--miou-size", type=int, default=512, help="side of the square label map")
    e.add_argument("--device", default=default_device)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", type=Path, default=None)

    t = sub.add_parser("train-step", help="one training step per task, with/without grad checkpointing")
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
    t.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if getattr(args, "device", "cpu") == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.bench == "backbone":
        results = bench_backbone(args)
        print(summary(results))
        lines = [json.dumps(asdict(m)) for m in results]
    elif args.bench == "data":
        rows = bench_data(args)
        print(data_summary(rows, args.target_images_per_s))
        lines = [json.dumps(r) for r in rows]
    elif args.bench == "train-step":
        rows = bench_train_step(args)
        print(ratio_table(rows, "images_per_s", args.variants[0]))
        lines = [json.dumps(r) for r in rows]
    else:
        rows = bench_eval(args)
        print(eval_summary(rows))
        lines = [json.dumps(r) for r in rows]
    if args.out:
        args.out.write_text("".join(line + "\n" for line in lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
