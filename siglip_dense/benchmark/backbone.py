"""``backbone``: our backbone vs plain timm vs transformers' ``SiglipVisionModel`` (same weights).

Forward and forward+backward images/s, peak memory and, on a known GPU, model FLOP utilisation.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import asdict, dataclass

import torch
from torch import nn

from siglip_dense.benchmark.common import DTYPES, device_name, peak_tflops
from siglip_dense.benchmark.timing import time_interleaved
from siglip_dense.models import build_backbone
from siglip_dense.models.arch import arch_config_of, create_vit

NAME = "backbone"
HELP = "ours vs plain timm vs transformers SiglipVisionModel"


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
                device=device_name(device),
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


def add_arguments(p: argparse.ArgumentParser, default_device: str) -> None:
    p.add_argument("--arch", default="tiny")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--device", default=default_device)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20, help="timed calls per peer, over all rounds")
    p.add_argument("--rounds", type=int, default=5, help="round-robin rounds over the peers")
    p.add_argument("--grad-checkpointing", action="store_true")


def run(args: argparse.Namespace) -> tuple[list[str], str]:
    """JSON lines of the measurements and the summary table."""
    results = bench_backbone(args)
    return [json.dumps(asdict(m)) for m in results], summary(results)
