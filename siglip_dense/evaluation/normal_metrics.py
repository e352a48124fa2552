"""Surface-normal metrics (NYUv2 protocol of Eigen & Fergus 2015 / Fouhey et al. 2013), exact under DDP.

Per valid pixel the angular error ``θ = angle(pred, gt)`` in degrees; over the whole dataset (pixels
pooled, not per image): ``mean``, ``median``, ``rmse`` = sqrt(mean θ²), and the fractions of pixels
with θ < 11.25°, 22.5°, 30° (``a11.25``, ``a22.5``, ``a30``, in [0, 1]).

Exact across processes: the sums and counts are float64 / int64 all-reduced; the median is found
without gathering the errors. Each rank keeps its own per-pixel errors (float32 on the CPU: 4 bytes a
valid pixel, ≈ 0.8 GB for the 654 NYUv2 test images at 480×640 spread over the ranks) and the k-th
smallest value of the union is found by bisection on the float32 bit pattern (for non-negative
floats the int32 view is monotonic): 31 rounds, each one all-reduced count of values ≤ a candidate,
so the result is exactly the value ``numpy.median`` returns on the concatenation of all ranks'
errors (the mean of the two middle values for an even count).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

NORMAL_METRIC_KEYS: tuple[str, ...] = ("mean", "median", "rmse", "a11.25", "a22.5", "a30")
THRESHOLDS: tuple[float, ...] = (11.25, 22.5, 30.0)
LOWER_IS_BETTER = {"mean", "median", "rmse"}
_INF_BITS = 0x7F800000  # float32 +inf


def angular_error_deg(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Angle in degrees between vectors along the last dim (…×3), in float64.

    ``atan2(|p × g|, p · g)`` (stable near 0° and 180°, where ``arccos`` of the cosine loses digits);
    neither input needs unit length (the angle does not depend on it).
    """
    p, g = pred.double(), gt.double()
    cross = torch.linalg.vector_norm(torch.linalg.cross(p, g, dim=-1), dim=-1)
    dot = (p * g).sum(dim=-1)
    return torch.rad2deg(torch.atan2(cross, dot))


def valid_normals(gt: torch.Tensor, min_norm: float = 0.5) -> torch.Tensor:
    """Pixels whose ground-truth vector (channels last, …×3) has norm ≥ ``min_norm`` and is finite."""
    norm = torch.linalg.vector_norm(gt.double(), dim=-1)
    return torch.isfinite(norm) & (norm >= min_norm)


def _in_ddp() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum across ranks on the device the process group needs (NCCL: this rank's GPU), back on the CPU."""
    if not _in_ddp():
        return t
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else t.device
    out = t.to(device)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.cpu()


class NormalMetric:
    """Accumulates angular errors of valid pixels; :meth:`compute` syncs across DDP ranks exactly.

    ``update(pred, gt)``: B×3×H×W (or 3×H×W) prediction and ground truth at the same size; a pixel
    counts when its ground-truth norm is ≥ ``min_norm``. Every rank must call :meth:`compute` (it
    runs collectives when torch.distributed is initialised). Not a torchmetrics ``Metric``: its
    "cat" states would gather every error on every rank, this keeps them where they are.
    """

    def __init__(self, min_norm: float = 0.5) -> None:
        self.min_norm = float(min_norm)
        self.reset()

    def reset(self) -> None:
        self.errors: list[torch.Tensor] = []
        self.num_images = 0
        self.num_empty = 0

    @torch.no_grad()
    def update(self, pred: torch.Tensor, gt: torch.Tensor) -> None:
        """Add one batch (B×3×H×W or 3×H×W, channels first; sizes must match).

        Raises:
            ValueError: shapes that differ or have no 3-channel axis.
        """
        if pred.ndim == 3:
            pred, gt = pred[None], gt[None]
        if pred.shape != gt.shape or pred.ndim != 4 or pred.shape[1] != 3:
            raise ValueError(
                f"normal metric needs B×3×H×W prediction and ground truth of the same shape, got "
                f"{tuple(pred.shape)} and {tuple(gt.shape)}"
            )
        p, g = pred.permute(0, 2, 3, 1), gt.permute(0, 2, 3, 1)
        for pi, gi in zip(p, g):
            valid = valid_normals(gi, self.min_norm)
            self.num_images += 1
            if not bool(valid.any()):
                self.num_empty += 1
                continue
            err = angular_error_deg(pi[valid], gi[valid]).float()
            self.errors.append(err.cpu())

    def _local(self) -> torch.Tensor:
        return torch.cat(self.errors) if self.errors else torch.zeros(0, dtype=torch.float32)

    def compute(self) -> dict[str, float]:
        """The six metrics (NaN when no rank has a valid pixel), plus ``num_images`` / ``num_empty``."""
        errors = self._local()
        e64 = errors.double()
        stats = torch.tensor(
            [e64.sum(), (e64**2).sum(), *[(errors < t).sum() for t in THRESHOLDS], errors.numel()],
            dtype=torch.float64,
        )
        counts = torch.tensor([self.num_images, self.num_empty], dtype=torch.int64)
        stats, counts = _all_reduce(stats), _all_reduce(counts)
        n = int(stats[-1])
        out: dict[str, float] = {"num_images": float(counts[0]), "num_empty": float(counts[1])}
        if n == 0:
            out.update({k: float("nan") for k in NORMAL_METRIC_KEYS})
            return out
        lo = kth_smallest(errors, (n - 1) // 2)
        hi = kth_smallest(errors, n // 2) if n % 2 == 0 else lo
        out.update(
            {
                "mean": float(stats[0] / n),
                "median": 0.5 * (lo + hi),
                "rmse": float(torch.sqrt(stats[1] / n)),
                "a11.25": float(stats[2] / n),
                "a22.5": float(stats[3] / n),
                "a30": float(stats[4] / n),
            }
        )
        return out


def kth_smallest(values: torch.Tensor, k: int) -> float:
    """The ``k``-th smallest (0-based) of the union of every rank's non-negative float32 ``values``.

    Bisection on the int32 view of the float32 bits: the smallest bit pattern ``b`` with
    ``count(values ≤ b) > k`` over all ranks is that value, exactly (31 all-reduced counts).

    Raises:
        ValueError: a negative value or ``k`` outside the union.
    """
    bits = values.float().contiguous().view(torch.int32)
    if bits.numel() and int(bits.min()) < 0:
        raise ValueError("kth_smallest needs non-negative values (angular errors)")
    total = _all_reduce(torch.tensor([bits.numel()], dtype=torch.int64))
    if not 0 <= k < int(total):
        raise ValueError(f"k={k} outside the {int(total)} values")
    lo, hi = 0, _INF_BITS  # invariant: count(≤ hi) > k, count(≤ lo - 1) ≤ k
    while lo < hi:
        mid = (lo + hi) // 2
        count = _all_reduce(torch.tensor([int((bits <= mid).sum())], dtype=torch.int64))
        if int(count) > k:
            hi = mid
        else:
            lo = mid + 1
    return float(torch.tensor([lo], dtype=torch.int32).view(torch.float32))


def format_normal_table(metrics: Mapping[str, Any]) -> str:
    """Metrics as one readable block (degrees; fractions as percentages)."""
    lines = []
    for key in NORMAL_METRIC_KEYS:
        if key in metrics:
            value = float(metrics[key])
            unit = "°" if key in LOWER_IS_BETTER else ""
            shown = f"{value:.3f}{unit}" if key in LOWER_IS_BETTER else f"{100 * value:.2f}%"
            lines.append(f"{key:>7}: {shown}")
    return "\n".join(lines)


__all__ = [
    "NORMAL_METRIC_KEYS",
    "NormalMetric",
    "THRESHOLDS",
    "angular_error_deg",
    "format_normal_table",
    "kth_smallest",
    "valid_normals",
]
