"""Dataset-level segmentation metrics from a confusion matrix, by a named protocol.

IoU is per class Σ intersection / Σ union over the whole set (not the per-image average of
torchmetrics' ``MeanIoU``). Which classes enter the mean is the protocol (:data:`METRIC_PROTOCOLS`):

``"mmseg"`` (MMSegmentation's ``IoUMetric``; ADE20K / VOC closed-set papers): the mean over classes
    whose union is non-empty (in the ground truth or predicted).
``"detectron2"`` (detectron2's ``SemSegEvaluator.evaluate``; CAT-Seg and the SigLIP 2 paper's
    open-vocabulary table): the mean over classes with ground-truth pixels only — a class that is
    predicted but absent from the ground truth has no IoU; adds ``fwIoU`` (IoU weighted by the
    classes' ground-truth pixel share).

Both: ``mAcc`` is the mean per-class accuracy over classes with ground-truth pixels, ``aAcc`` the pixel
accuracy (detectron2's ``pACC``). The state is one int64 confusion matrix summed across processes, so
DDP evaluation equals single-process evaluation whatever the protocol.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torchmetrics import Metric

from siglip_dense.data.io import DataError

METRIC_PROTOCOLS = ("mmseg", "detectron2")


def check_metric_protocol(protocol: str, setting: str = "metric_protocol") -> str:
    """``protocol`` if it is one of :data:`METRIC_PROTOCOLS`; otherwise a DataError (a ValueError the
    CLI reports in one line) naming ``setting``."""
    if protocol not in METRIC_PROTOCOLS:
        raise DataError(
            f"{setting} must be one of {list(METRIC_PROTOCOLS)} (mmseg: classes with union > 0, as "
            f"ADE20K / VOC papers; detectron2: classes with ground truth, as open-vocabulary papers), "
            f"got {protocol!r}"
        )
    return protocol


class SegmentationMetric(Metric):
    """Confusion-matrix mIoU / aAcc / mAcc (+ fwIoU for detectron2); rows are ground truth, columns
    predictions. ``protocol`` picks the classes averaged (module docstring); it is no state."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self, num_classes: int, ignore_index: int = 255, protocol: str = "mmseg", **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.protocol = check_metric_protocol(protocol)
        k = self.num_classes
        self.add_state("confmat", default=torch.zeros(k, k, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add label maps of any (equal) shape; logits B×K×... are argmax-ed over dim 1."""
        if pred.is_floating_point() and pred.ndim == target.ndim + 1:
            pred = pred.argmax(dim=1)
        if pred.numel() != target.numel():
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in size")
        pred = pred.reshape(-1).long().to(self.confmat.device)
        target = target.reshape(-1).long().to(self.confmat.device)
        k = self.num_classes
        # ignored pixels go to an extra row (index k) that is dropped: no boolean masking, which
        # dominated the cost on 512×512 maps; range checks are two reductions, detailed only on failure
        row = torch.where(target == self.ignore_index, k, target)
        if row.numel() and (row.min() < 0 or row.max() > k or pred.min() < 0 or pred.max() >= k):
            self._masked_update(pred, target)
            return
        counts = torch.bincount(row * k + pred, minlength=(k + 1) * k)
        self.confmat += counts[: k * k].reshape(k, k)

    def _masked_update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """The careful path: name out-of-range values, or count only the valid pixels."""
        k = self.num_classes
        valid = target != self.ignore_index
        bad_target = valid & ((target < 0) | (target >= k))
        if bad_target.any():
            values = sorted(target[bad_target].unique().tolist())[:10]
            raise ValueError(
                f"target values {values} are outside 0..{k - 1} and not ignore_index {self.ignore_index}"
            )
        bad_pred = valid & ((pred < 0) | (pred >= k))
        if bad_pred.any():
            values = sorted(pred[bad_pred].unique().tolist())[:10]
            raise ValueError(f"predicted values {values} are outside 0..{k - 1}")
        # out-of-range predictions only on ignored pixels: count the valid ones alone
        pred, target = pred[valid], target[valid]
        self.confmat += torch.bincount(target * k + pred, minlength=k * k).reshape(k, k)

    def compute(self) -> dict[str, torch.Tensor]:
        """``mIoU``, ``aAcc``, ``mAcc`` (fractions), ``per_class_IoU`` (NaN for a class outside the
        protocol's mean: union == 0 for mmseg, no ground-truth pixel for detectron2) and, for
        detectron2, ``fwIoU``."""
        cm = self.confmat.detach().cpu().double()
        inter = cm.diag()
        gt = cm.sum(dim=1)
        union = gt + cm.sum(dim=0) - inter
        valid = (union > 0) & (gt > 0) if self.protocol == "detectron2" else union > 0
        iou = torch.where(valid, inter / union.clamp_min(1), torch.full_like(inter, math.nan))
        acc = torch.where(gt > 0, inter / gt.clamp_min(1), torch.full_like(inter, math.nan))
        total = cm.sum()
        nan = torch.tensor(math.nan, dtype=torch.float64)
        a_acc = inter.sum() / total if total > 0 else nan
        out = {
            "mIoU": _nanmean(iou).float(),
            "aAcc": a_acc.float(),
            "mAcc": _nanmean(acc).float(),
            "per_class_IoU": iou.float(),
        }
        if self.protocol == "detectron2":  # Σ over valid classes of IoU · (class pixels / all pixels)
            out["fwIoU"] = ((iou[valid] * gt[valid]).sum() / total if total > 0 else nan).float()
        return out


def _nanmean(x: torch.Tensor) -> torch.Tensor:
    valid = ~torch.isnan(x)
    if not valid.any():
        return torch.tensor(math.nan, dtype=x.dtype)
    return x[valid].mean()


def _as_float(value: Any) -> float:
    """NaN for ``None``: metrics.json stores a class never seen (NaN IoU) as null."""
    return math.nan if value is None else float(value)


def _as_list(values: Any) -> list[float]:
    if isinstance(values, Mapping):
        return [_as_float(v) for v in values.values()]
    if isinstance(values, torch.Tensor):
        return [float(v) for v in values.flatten().tolist()]
    return [_as_float(v) for v in values]


def format_seg_table(metrics: Mapping[str, Any], class_names: Sequence[str]) -> str:
    """Per-class IoU table and a summary line, in percent; classes never seen show "-".

    ``per_class_IoU`` may be a tensor/list aligned with ``class_names`` or a name → value dict.
    """

    def pct(v: float) -> str:
        return "-" if v is None or math.isnan(v) else f"{100 * v:.2f}"

    per_class = _as_list(metrics.get("per_class_IoU", []))
    if per_class and len(per_class) != len(class_names):
        raise ValueError(f"{len(per_class)} per-class values for {len(class_names)} class names")
    width = max([len("Class"), *(len(str(n)) for n in class_names)])
    lines = [f"{'Class':<{width}} | {'IoU (%)':>8}", f"{'-' * width}-+-{'-' * 8}"]
    lines += [f"{str(n):<{width}} | {pct(v):>8}" for n, v in zip(class_names, per_class)]
    keys = ("mIoU", "mAcc", "aAcc", "fwIoU")
    summary = [f"{k}: {pct(_as_float(metrics[k]))}" for k in keys if k in metrics]
    if metrics.get("metric_protocol"):
        summary.append(f"({metrics['metric_protocol']} protocol)")
    lines.append(f"{'-' * width}-+-{'-' * 8}")
    lines.append("  ".join(summary))
    return "\n".join(lines)


__all__ = ["METRIC_PROTOCOLS", "SegmentationMetric", "check_metric_protocol", "format_seg_table"]
