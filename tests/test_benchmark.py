"""The benchmark tool keeps working (a smoke run; speed itself is never asserted in tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from siglip_dense.benchmark.backbone import vit_flops
from siglip_dense.benchmark.train_step import count_flops

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_backbone_benchmark_smoke(tmp_path: Path) -> None:
    out = tmp_path / "bench.jsonl"
    cmd = [sys.executable, "tools/benchmark.py", "backbone", "--arch", "tiny", "--img-size", "64"]
    cmd += ["--batch-size", "2", "--warmup", "1", "--iters", "2", "--rounds", "2", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(r["impl"], r["mode"]) for r in rows} == {
        (impl, mode)
        for impl in ("siglip_dense", "timm", "transformers")
        for mode in ("forward", "forward_backward")
    }
    assert all(r["images_per_s"] > 0 for r in rows)
    assert "ratio" in proc.stdout


def _run_bench(args: list[str], out: Path) -> tuple[list[dict], str]:
    """Run ``tools/benchmark.py`` with ``args`` and return its JSON rows and stdout."""
    cmd = [sys.executable, "tools/benchmark.py", *args, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(line) for line in out.read_text().splitlines()], proc.stdout


@pytest.mark.slow
def test_data_benchmark_smoke(tmp_path: Path) -> None:
    args = ["data", "--images", "2", "--iters", "2", "--rounds", "1", "--warmup", "0"]
    args += ["--crop", "128", "--det-size", "256", "--target-images-per-s", "100"]
    rows, stdout = _run_bench(args, tmp_path / "data.jsonl")
    assert {(r["group"], r["impl"]) for r in rows} == {
        (group, impl)
        for group in ("ade20k_128", "coco_lsj_256", "nyu_416x544")
        for impl in ("siglip_dense", "torchvision_v2")
    }
    for r in rows:
        assert r["bench"] == "data" and r["images_per_s"] > 0 and r["workers_needed"] >= 1
        assert r["target_images_per_s"] == 100
    assert "ratio" in stdout and "workers needed" in stdout


@pytest.mark.slow
def test_eval_benchmark_smoke(tmp_path: Path) -> None:
    args = ["eval", "--coco-images", "8", "--coco-iters", "1", "--seg-size", "64", "96"]
    args += ["--seg-iters", "1", "--miou-iters", "2", "--miou-size", "128"]
    args += ["--device", "cpu"]
    rows, stdout = _run_bench(args, tmp_path / "eval.jsonl")
    coco = [r for r in rows if r["group"] == "coco_bbox_8img"]
    assert {r["impl"] for r in coco} == {"pycocotools", "faster_coco_eval"}
    assert all(r["stats_match"] and r["seconds"] > 0 for r in coco)
    assert coco[0]["bbox_AP"] == coco[1]["bbox_AP"]
    infer = [r for r in rows if r["group"] == "ade20k_infer_64x96"]
    assert {r["impl"] for r in infer} == {"tiny_slide", "tiny_whole"}
    miou = [r for r in rows if r["group"] == "miou_update_128"]
    assert {r["impl"] for r in miou} == {"labels", "logits_argmax"}
    assert all(r["ms_per_image"] > 0 and r["fraction_of_slide_inference"] > 0 for r in miou)
    assert "COCO stats identical: True" in stdout


@pytest.mark.slow
def test_train_step_benchmark_smoke(tmp_path: Path, toy_data_root: Path) -> None:
    args = ["train-step", "--tasks", "seg_upernet", "--batch-size", "2", "--warmup", "0", "--iters", "1"]
    args += ["--rounds", "1", "--device", "cpu", "--data-dir", str(toy_data_root.parent)]
    args += ["--variants", "plain", "grad_checkpointing", "channels_last"]
    rows, stdout = _run_bench(args, tmp_path / "train.jsonl")
    assert {(r["group"], r["impl"]) for r in rows} == {
        ("seg_upernet", "plain"),
        ("seg_upernet", "grad_checkpointing"),
        ("seg_upernet", "channels_last"),
    }
    assert all(r["batch_size"] == 2 and r["images_per_s"] > 0 and r["ms_per_step"] > 0 for r in rows)
    # a training step is at least forward + backward of the backbone (3x its forward) on 128 px crops
    backbone_forward = vit_flops("tiny", 128, 2)
    assert all(r["step_tflop"] * 1e12 > 3 * backbone_forward for r in rows)
    assert all(r["mfu"] is None for r in rows)  # no known peak on a CPU
    assert "ratio" in stdout


def test_counted_flops_match_the_closed_form() -> None:
    """The dispatcher's FLOP count of a ViT forward equals the formula MFU is computed from."""
    from siglip_dense.models import build_backbone

    backbone = build_backbone("tiny", img_size=64)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        counted = count_flops(lambda: backbone.forward_features(x))
    assert counted == vit_flops("tiny", 64, 2)


def test_time_interleaved_measures_each_peer_with_both_clocks() -> None:
    """Against ``time.sleep``: a 20 ms call reads ≥ 20 ms and clearly slower than a 2 ms one, with the
    torch Timer and the wall clock; warm-up and round calls are made as documented."""
    import time

    from siglip_dense.benchmark.timing import time_interleaved

    calls = {"fast": 0, "slow": 0}

    def sleeper(name: str, seconds: float):
        def fn() -> None:
            calls[name] += 1
            time.sleep(seconds)

        return fn

    fns = {"fast": sleeper("fast", 0.002), "slow": sleeper("slow", 0.02)}
    for wall_clock in (False, True):
        calls.update(fast=0, slow=0)
        timed = time_interleaved(fns, torch.device("cpu"), warmup=1, iters=4, rounds=2, wall_clock=wall_clock)
        (fast, fast_mem), (slow, slow_mem) = timed["fast"], timed["slow"]
        assert fast >= 0.002 and slow >= 0.02 and slow > 3 * fast
        assert fast_mem is None and slow_mem is None  # peak memory is CUDA-only
        # 1 warm-up + 2 rounds × 2 timed calls, plus Timer.timeit's own 2 warm-up calls per round
        assert calls == {"fast": 5 if wall_clock else 9, "slow": 5 if wall_clock else 9}
