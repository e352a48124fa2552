"""The benchmark tool keeps working (a smoke run; speed itself is never asserted in tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


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
