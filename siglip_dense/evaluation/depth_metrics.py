"""Monocular depth metrics with the NYUv2 / KITTI protocol (Eigen et al. 2014, BTS, AdaBins).

Published NYUv2 numbers are per-image metrics averaged over images, at ground-truth resolution,
inside the Eigen crop, on pixels with ``min_depth < gt < max_depth``, with predictions clipped to
that range. The metric keeps per-metric sums and an image count, all summed across processes, so
DDP evaluation equals single-process evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import Metric

DEPTH_METRIC_KEYS: tuple[str, ...] = (
    "abs_rel",
    "sq_rel",
    "rmse",
    "rmse_log",
    "log10",
    "silog",
    "delta1",
    "delta2",
    "delta3",
)
LOWER_IS_BETTER = {"abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog"}
EVAL_CROPS = ("eigen", "garg", "none")

# Eigen crop on NYUv2, defined on the 480×640 grid: rows 45:471, cols 41:601
_EIGEN_NYU = (45 / 480, 471 / 480, 41 / 640, 601 / 640)
# Garg crop (KITTI), as fractions of the image (BTS / AdaBins eval code)
_GARG = (0.40810811, 0.99189189, 0.03594771, 0.96405229)


def crop_box(height: int, width: int, crop: str | None = "eigen") -> tuple[int, int, int, int]:
    """``(y0, y1, x0, x1)`` of the evaluation crop at a ground-truth size, scaled from its definition.

    The Eigen crop is exact at 480×640 and scaled proportionally (rounded half up) for other GT
    sizes, so a double-resolution GT evaluates the same region.
    """
    crop = (crop or "none").lower()
    if crop == "none":
        return 0, height, 0, width
    if crop == "eigen":
        fy0, fy1, fx0, fx1 = _EIGEN_NYU
        return tuple(
            int(f * size + 0.5) for f, size in ((fy0, height), (fy1, height), (fx0, width), (fx1, width))
        )
    if crop == "garg":
        fy0, fy1, fx0, fx1 = _GARG
        return int(fy0 * height), int(fy1 * height), int(fx0 * width), int(fx1 * width)
    raise ValueError(f"unknown eval crop {crop!r}: use one of {EVAL_CROPS}")


def valid_mask(
    gt: torch.Tensor, min_depth: float = 1e-3, max_depth: float = 10.0, crop: str | None = "eigen"
) -> torch.Tensor:
    """Pixels that count: finite, ``min_depth < gt < max_depth`` and inside the crop (H×W or B×H×W)."""
    h, w = gt.shape[-2:]
    mask = torch.isfinite(gt) & (gt > min_depth) & (gt < max_depth)
    y0, y1, x0, x1 = crop_box(h, w, crop)
    region = torch.zeros((h, w), dtype=torch.bool, device=gt.device)
    region[y0:y1, x0:x1] = True
    return mask & region


def image_metrics(pred: torch.Tensor, gt: torch.Tensor) -> dict[str, torch.Tensor]:
    """The nine metrics of one image from its valid pixels (1-D tensors, positive, same length)."""
    pred, gt = pred.double(), gt.double()
    thresh = torch.maximum(gt / pred, pred / gt)
    diff = gt - pred
    log_diff = torch.log(pred) - torch.log(gt)
    return {
        "abs_rel": (diff.abs() / gt).mean(),
        "sq_rel": (diff**2 / gt).mean(),
        "rmse": torch.sqrt((diff**2).mean()),
        "rmse_log": torch.sqrt((log_diff**2).mean()),
        "log10": (torch.log10(pred) - torch.log10(gt)).abs().mean(),
        "silog": torch.sqrt(((log_diff**2).mean() - log_diff.mean() ** 2).clamp_min(0)) * 100,
        "delta1": (thresh < 1.25).double().mean(),
        "delta2": (thresh < 1.25**2).double().mean(),
        "delta3": (thresh < 1.25**3).double().mean(),
    }


def _as_batch(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.ndim == 2:
        return x[None]
    if x.ndim == 4 and x.shape[1] == 1:
        return x[:, 0]
    if x.ndim == 3:
        return x
    raise ValueError(f"{name} must be H×W, B×H×W or B×1×H×W, got shape {tuple(x.shape)}")


class DepthMetric(Metric):
    """Per-image depth metrics averaged over images (NYUv2 / KITTI protocol), DDP-summed.

    ``update(pred, gt)``: predictions of any size are bilinearly resized to the GT size, clipped to
    ``[min_depth, max_depth]``; images without a valid pixel are skipped and counted in ``num_empty``.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(
        self, min_depth: float = 1e-3, max_depth: float = 10.0, crop: str | None = "eigen", **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        crop_box(480, 640, crop)  # validate the name now
        self.min_depth, self.max_depth, self.crop = float(min_depth), float(max_depth), crop or "none"
        for key in DEPTH_METRIC_KEYS:
            self.add_state(key, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("num_empty", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, gt: torch.Tensor) -> None:
        pred, gt = _as_batch(pred, "pred").float(), _as_batch(gt, "gt").float()
        if pred.shape[0] != gt.shape[0]:
            raise ValueError(f"{pred.shape[0]} predictions for {gt.shape[0]} ground-truth maps")
        if pred.shape[-2:] != gt.shape[-2:]:
            pred = F.interpolate(pred[:, None], size=gt.shape[-2:], mode="bilinear", align_corners=False)[
                :, 0
            ]
        pred = pred.nan_to_num(nan=self.min_depth).clamp(self.min_depth, self.max_depth)
        masks = valid_mask(gt, self.min_depth, self.max_depth, self.crop)
        for p, g, m in zip(pred, gt, masks):
            if not m.any():
                self.num_empty += 1
                continue
            for key, value in image_metrics(p[m], g[m]).items():
                setattr(self, key, getattr(self, key) + value.to(self.count.device))
            self.count += 1

    def compute(self) -> dict[str, torch.Tensor]:
        """Means over images (NaN when no image had a valid pixel), plus ``num_images`` / ``num_empty``
        (the synced counts: after ``compute`` the states are this process's own again)."""
        n = int(self.count)
        out = {
            key: (getattr(self, key) / n if n else torch.tensor(math.nan, dtype=torch.float64)).float()
            for key in DEPTH_METRIC_KEYS
        }
        out["num_images"] = self.count.clone()
        out["num_empty"] = self.num_empty.clone()
        return out


def format_depth_table(metrics: Mapping[str, Any]) -> str:
    """One header row and one value row, in the order papers print them (↓ lower, ↑ higher is better)."""
    keys = [k for k in DEPTH_METRIC_KEYS if k in metrics]
    heads = [f"{k}{'↓' if k in LOWER_IS_BETTER else '↑'}" for k in keys]
    width = [max(len(h), 8) for h in heads]
    row1 = " | ".join(f"{h:>{w}}" for h, w in zip(heads, width))
    row2 = " | ".join(f"{float(metrics[k]):>{w}.4f}" for k, w in zip(keys, width))
    extra = [f"{k}: {metrics[k]}" for k in ("num_images", "num_empty") if k in metrics]
    return "\n".join([row1, "-" * len(row1), row2, *(["  ".join(extra)] if extra else [])])


__all__ = [
    "DEPTH_METRIC_KEYS",
    "EVAL_CROPS",
    "DepthMetric",
    "crop_box",
    "format_depth_table",
    "image_metrics",
    "valid_mask",
]
