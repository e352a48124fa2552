"""SegmentationMetric against an independent numpy computation (MMSeg's rule) and detectron2's
``SemSegEvaluator`` re-typed (the open-vocabulary rule); DDP-style state merging; the table."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from siglip_dense.evaluation.seg_metrics import SegmentationMetric, format_seg_table
from tests.helpers.peer_rules import detectron2_sem_seg

K = 7  # classes 5 and 6 never appear in pred or target
IGNORE = 255


def _batches(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in [(2, 17, 23), (1, 31, 9), (40,), (3, 5, 4)]:
        target = torch.randint(0, 5, shape, generator=g)
        target[torch.rand(shape, generator=g) < 0.2] = IGNORE
        # predictions mostly right, so IoUs are spread out, never using classes 5/6
        pred = torch.where(
            torch.rand(shape, generator=g) < 0.6, target, torch.randint(0, 5, shape, generator=g)
        )
        pred[pred == IGNORE] = 4
        out.append((pred, target))
    return out


def _numpy_reference(batches: list[tuple[torch.Tensor, torch.Tensor]], k: int) -> dict[str, object]:
    pred = np.concatenate([p.numpy().ravel() for p, _ in batches])
    gt = np.concatenate([t.numpy().ravel() for _, t in batches])
    keep = gt != IGNORE
    cm = np.bincount(gt[keep] * k + pred[keep], minlength=k * k).reshape(k, k)  # rows = gt
    inter = np.diag(cm).astype(float)
    union = cm.sum(0) + cm.sum(1) - np.diag(cm)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / union, np.nan)
        acc = np.where(cm.sum(1) > 0, inter / cm.sum(1), np.nan)
    return {
        "cm": cm,
        "mIoU": np.nanmean(iou),
        "aAcc": inter.sum() / cm.sum(),
        "mAcc": np.nanmean(acc),
        "per_class_IoU": iou,
    }


def test_metric_matches_numpy_over_several_updates() -> None:
    batches = _batches()
    metric = SegmentationMetric(K, ignore_index=IGNORE)
    for pred, target in batches:
        metric.update(pred, target)
    ref = _numpy_reference(batches, K)
    np.testing.assert_array_equal(metric.confmat.numpy(), ref["cm"])
    res = metric.compute()
    assert set(res) == {"mIoU", "aAcc", "mAcc", "per_class_IoU"}
    for key in ("mIoU", "aAcc", "mAcc"):
        assert res[key].is_floating_point() and res[key].ndim == 0
        assert 0.0 < float(res[key]) < 1.0
        assert float(res[key]) == pytest.approx(ref[key], abs=1e-6)
    per_class = res["per_class_IoU"]
    assert per_class.shape == (K,) and per_class.is_floating_point()
    assert torch.isnan(per_class[5:]).all() and not torch.isnan(per_class[:5]).any()
    np.testing.assert_allclose(per_class.numpy(), ref["per_class_IoU"], atol=1e-6)


def test_dataset_level_not_per_image_average() -> None:
    # image 1: class 0 fully right on 1 pixel; image 2: class 0 half right on 100 pixels
    metric = SegmentationMetric(2)
    metric.update(torch.tensor([0]), torch.tensor([0]))
    metric.update(torch.tensor([0] * 50 + [1] * 50), torch.tensor([0] * 100))
    iou0 = float(metric.compute()["per_class_IoU"][0])
    assert iou0 == pytest.approx(51 / 101)  # Σ intersections / Σ unions, not mean(1, 0.5)


def test_logits_are_argmaxed_and_ignore_only_pixels_give_nan() -> None:
    metric = SegmentationMetric(3)
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 2] = 1.0
    metric.update(logits, torch.full((1, 2, 2), 2))
    assert float(metric.compute()["mIoU"]) == 1.0
    empty = SegmentationMetric(3)
    empty.update(torch.zeros(4, dtype=torch.long), torch.full((4,), IGNORE))
    res = empty.compute()
    assert math.isnan(float(res["mIoU"])) and torch.isnan(res["per_class_IoU"]).all()


def test_out_of_range_values_raise_and_name_them() -> None:
    metric = SegmentationMetric(4)
    with pytest.raises(ValueError, match=r"\[-1, 4, 9\]"):
        metric.update(torch.zeros(5, dtype=torch.long), torch.tensor([0, 4, 9, -1, IGNORE]))
    with pytest.raises(ValueError, match="predicted values"):
        metric.update(torch.tensor([0, 6]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="differ in size"):
        metric.update(torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    assert int(metric.confmat.sum()) == 0  # nothing half-added


@pytest.mark.parametrize("protocol", ["mmseg", "detectron2"])
def test_states_sum_like_ddp(protocol: str) -> None:
    batches = _batches_predicting_absent_classes(seed=3) if protocol == "detectron2" else _batches(seed=3)
    whole = SegmentationMetric(K, protocol=protocol)
    for pred, target in batches:
        whole.update(pred, target)
    rank0, rank1 = SegmentationMetric(K, protocol=protocol), SegmentationMetric(K, protocol=protocol)
    for i, (pred, target) in enumerate(batches):
        (rank0 if i % 2 == 0 else rank1).update(pred, target)
    # what the DDP all-reduce does with dist_reduce_fx="sum"
    assert rank0._reductions["confmat"] is not None
    summed = rank0._reductions["confmat"](torch.stack([rank0.confmat, rank1.confmat]))
    torch.testing.assert_close(summed, whole.confmat)
    # and through torchmetrics' own merge, which applies the declared reduction
    rank0.merge_state(rank1)
    torch.testing.assert_close(rank0.confmat, whole.confmat)
    for key, value in whole.compute().items():
        torch.testing.assert_close(rank0.compute()[key], value, equal_nan=True)


def test_format_seg_table_shows_names_values_and_dashes() -> None:
    metric = SegmentationMetric(3)
    metric.update(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1, 1]))
    res = metric.compute()
    names = ["wall", "building", "sky"]
    table = format_seg_table(res, names)
    lines = table.splitlines()
    assert any(line.startswith("wall") and line.rstrip().endswith("50.00") for line in lines)
    assert any(line.startswith("building") and line.rstrip().endswith("66.67") for line in lines)
    assert any(line.startswith("sky") and line.rstrip().endswith("-") for line in lines)
    assert "mIoU: 58.33" in table
    # also accepts the name -> value dict the task stores
    as_dict = dict(res, per_class_IoU=dict(zip(names, res["per_class_IoU"].tolist())))
    assert format_seg_table(as_dict, names) == table
    with pytest.raises(ValueError):
        format_seg_table(res, names[:2])


def test_format_seg_table_reads_metrics_json_nulls() -> None:
    """metrics.json writes a never-seen class's NaN IoU as null; the table shows it as "-"."""
    metric = SegmentationMetric(3)
    metric.update(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1, 1]))
    res = metric.compute()
    names = ["wall", "building", "sky"]
    per_class = [None if math.isnan(v) else v for v in res["per_class_IoU"].tolist()]
    stored = json.loads(
        json.dumps({"mIoU": float(res["mIoU"]), "per_class_IoU": dict(zip(names, per_class))})
    )
    assert stored["per_class_IoU"]["sky"] is None
    table = format_seg_table(stored, names)
    assert any(line.startswith("sky") and line.rstrip().endswith("-") for line in table.splitlines())
    assert "mIoU: 58.33" in table


# -- detectron2's rule (open-vocabulary benchmarks) -------------------------------------------------


def _batches_predicting_absent_classes(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Ground truth in classes 0..4 (ignore mixed in); predictions also use 5, absent from the ground
    truth (the open-vocabulary case: most of ADE-847's names are absent from a split); 6 never occurs."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for pred, target in _batches(seed):
        pred = torch.where(torch.rand(pred.shape, generator=g) < 0.15, torch.full_like(pred, 5), pred)
        out.append((pred, target))
    return out


def test_detectron2_rule_on_the_two_class_example() -> None:
    """Two classes in the ground truth, one predicted right, one predicted as a class absent from the
    ground truth: detectron2 averages over the two ground-truth classes (0.5), MMSeg over three (1/3)."""
    pred, target = torch.tensor([0, 0, 2, 2]), torch.tensor([0, 0, 1, 1])
    ref = detectron2_sem_seg([pred.numpy()], [target.numpy()], 3, IGNORE)
    d2 = SegmentationMetric(3, protocol="detectron2")
    d2.update(pred, target)
    assert float(d2.compute()["mIoU"]) == pytest.approx(ref["mIoU"]) == pytest.approx(0.5)
    mm = SegmentationMetric(3)  # MMSeg's rule stays the default: closed-set numbers unchanged
    mm.update(pred, target)
    assert float(mm.compute()["mIoU"]) == pytest.approx(_numpy_reference([(pred, target)], 3)["mIoU"])
    assert float(mm.compute()["mIoU"]) == pytest.approx(1 / 3)


def test_detectron2_rule_matches_sem_seg_evaluator() -> None:
    batches = _batches_predicting_absent_classes()
    metric = SegmentationMetric(K, ignore_index=IGNORE, protocol="detectron2")
    for pred, target in batches:
        metric.update(pred, target)
    ref = detectron2_sem_seg([p.numpy() for p, _ in batches], [t.numpy() for _, t in batches], K, IGNORE)
    res = metric.compute()
    assert set(res) == {"mIoU", "fwIoU", "aAcc", "mAcc", "per_class_IoU"}
    for ours, theirs in (("mIoU", "mIoU"), ("fwIoU", "fwIoU"), ("mAcc", "mACC"), ("aAcc", "pACC")):
        assert float(res[ours]) == pytest.approx(ref[theirs], abs=1e-6), ours
    # class 5 is predicted but absent from the ground truth: no IoU (MMSeg would give it 0)
    np.testing.assert_allclose(res["per_class_IoU"].numpy(), ref["IoU"], atol=1e-6)
    assert math.isnan(float(res["per_class_IoU"][5]))
    mmseg = _numpy_reference(batches, K)
    assert mmseg["per_class_IoU"][5] == 0.0 and mmseg["mIoU"] < ref["mIoU"] - 0.05


def test_unknown_protocol_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"metric_protocol must be one of \['mmseg', 'detectron2'\].*'d2'"):
        SegmentationMetric(3, protocol="d2")


def test_format_seg_table_names_the_protocol_and_fwiou() -> None:
    metric = SegmentationMetric(3, protocol="detectron2")
    metric.update(torch.tensor([0, 0, 2, 2]), torch.tensor([0, 0, 1, 1]))
    res = dict(metric.compute(), metric_protocol="detectron2")
    table = format_seg_table(res, ["wall", "building", "sky"])
    assert "mIoU: 50.00" in table and "fwIoU: 50.00" in table and "(detectron2 protocol)" in table
