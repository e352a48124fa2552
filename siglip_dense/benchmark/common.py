"""What the benchmarks share: dtype names, device names and peaks, JSON rows and ratio tables."""

from __future__ import annotations

import json
from typing import Any

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def device_name(device: torch.device) -> str:
    """The GPU's marketing name, or ``"cpu"``."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def peak_tflops(device: torch.device) -> float | None:
    """Dense bf16 peak of the device, for model FLOP utilisation (None when unknown)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in (("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0)):
        if key in name:
            return value
    return None


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


__all__ = ["DTYPES", "device_name", "emit", "peak_tflops", "ratio_table"]
