"""COCO box / mask evaluation: predictions → COCO results, gathered across ranks, scored once.

pycocotools is the reference; faster-coco-eval (same numbers, several times faster) is used when
selected or, with ``auto``, when installed. Results follow the COCO results format exactly (original
category ids, ``[x, y, w, h]`` in original image pixels, RLE masks with utf-8 ``counts``), so the
written ``coco_results.json`` can be re-scored by any COCO tool.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

EVALUATORS = ("pycocotools", "faster_coco_eval", "auto")
IOU_TYPES = ("bbox", "segm")
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def faster_coco_eval_available() -> bool:
    try:
        import faster_coco_eval  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_evaluator(name: str) -> str:
    """``auto`` → faster-coco-eval when installed, else pycocotools; unknown names are an error."""
    if name not in EVALUATORS:
        raise ValueError(f"evaluator must be one of {EVALUATORS}, got {name!r}")
    if name == "auto":
        return "faster_coco_eval" if faster_coco_eval_available() else "pycocotools"
    if name == "faster_coco_eval" and not faster_coco_eval_available():
        raise ImportError("evaluator=faster_coco_eval but faster-coco-eval is not installed (pip install it)")
    return name


# ---------------------------------------------------------------------------------------------
# predictions → COCO results
# ---------------------------------------------------------------------------------------------
def encode_masks(masks: np.ndarray) -> list[dict[str, Any]]:
    """N×H×W binary masks → RLEs with utf-8 ``counts`` (JSON-serialisable, as COCO expects)."""
    from pycocotools import mask as mask_utils

    if len(masks) == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("utf-8")
    return list(rles)


def detections_to_coco(
    image_id: int,
    boxes: torch.Tensor | np.ndarray,
    scores: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    category_ids: Sequence[int],
    masks: torch.Tensor | np.ndarray | None = None,
    mask_threshold: float = 0.5,
) -> list[dict[str, Any]]:
    """One image's detections (xyxy in ORIGINAL pixels, contiguous labels 0..K-1) → COCO results.

    ``masks`` are N×H×W (or N×1×H×W) probabilities or binaries at the original image size.
    """
    boxes = torch.as_tensor(boxes).detach().float().cpu().reshape(-1, 4)
    scores = torch.as_tensor(scores).detach().float().cpu().reshape(-1)
    labels = torch.as_tensor(labels).detach().long().cpu().reshape(-1)
    if not len(boxes) == len(scores) == len(labels):
        raise ValueError(
            f"{len(boxes)} boxes, {len(scores)} scores, {len(labels)} labels for image {image_id}"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= len(category_ids)):
        raise ValueError(f"predicted labels {labels.unique().tolist()} outside 0..{len(category_ids) - 1}")
    xywh = boxes.clone()
    xywh[:, 2:] -= xywh[:, :2]
    rles: list[dict[str, Any]] | None = None
    if masks is not None:
        m = torch.as_tensor(masks).detach().cpu()
        if m.ndim == 4:
            m = m[:, 0]
        binary = (m > mask_threshold) if m.is_floating_point() else m.bool()
        rles = encode_masks(binary.numpy())
    out = []
    for i in range(len(boxes)):
        res = {
            "image_id": int(image_id),
            "category_id": int(category_ids[int(labels[i])]),
            "bbox": [round(float(v), 3) for v in xywh[i].tolist()],
            "score": float(scores[i]),
        }
        if rles is not None:
            res["segmentation"] = rles[i]
        out.append(res)
    return out


def write_coco_results(path: str | Path, results: list[dict[str, Any]]) -> Path:
    """The COCO results file (a JSON list), readable by ``COCO.loadRes``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results))
    return path


# ---------------------------------------------------------------------------------------------
# DDP: gather every rank's results, de-duplicate by image id
# ---------------------------------------------------------------------------------------------
def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def gather_results(per_image: dict[int, list[dict[str, Any]]]) -> tuple[list[dict[str, Any]], list[int]]:
    """All ranks' results (image id → that image's results) merged; an image counts once.

    A distributed sampler pads with repeated samples: the first rank that evaluated an image owns it,
    copies from other ranks are dropped (a repeated image must not double its detections). Images
    with no detections still count (they are in the returned ids and score as misses).
    """
    parts = [per_image]
    if _dist_ready() and torch.distributed.get_world_size() > 1:
        gathered: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, per_image)
        parts = gathered
    return dedup_results(parts)


def dedup_results(
    parts: Sequence[dict[int, list[dict[str, Any]]]],
) -> tuple[list[dict[str, Any]], list[int]]:
    """Merge per-rank {image id: results}; each image keeps the results of the first part that had it."""
    merged: dict[int, list[dict[str, Any]]] = {}
    for part in parts:
        for img, res in part.items():
            merged.setdefault(int(img), list(res))
    ids = sorted(merged)
    return [r for i in ids for r in merged[i]], ids


# ---------------------------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------------------------
def _quiet() -> contextlib.AbstractContextManager:
    return contextlib.redirect_stdout(io.StringIO())


def load_gt(gt: Any) -> Any:
    """A pycocotools ``COCO`` from a path, a dict or an existing ``COCO`` (not copied)."""
    from pycocotools.coco import COCO

    if isinstance(gt, COCO):
        return gt
    if isinstance(gt, (str, Path)):
        with _quiet():
            return COCO(str(gt))
    if isinstance(gt, dict):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        with _quiet():
            coco.createIndex()
        return coco
    raise TypeError(f"ground truth must be a path, dict or pycocotools COCO, got {type(gt).__name__}")


def _stats_to_metrics(prefix: str, stats: Sequence[float]) -> dict[str, float | None]:
    """COCOeval stats[0:6] → ``{prefix}_AP`` ... as fractions; -1 (no ground truth in range) → None."""
    return {f"{prefix}_{n}": (None if float(s) < 0 else float(s)) for n, s in zip(STAT_NAMES, stats[:6])}


def check_gt_for_eval(coco_gt: Any, iou_types: Sequence[str], source: str = "ground truth") -> None:
    """The fields ``COCOeval`` reads from every ground-truth annotation, present.

    pycocotools fails with a bare ``KeyError('iscrowd')`` otherwise. Load jsons with
    :func:`siglip_dense.data.coco.load_coco_json`, which fills ``area``/``iscrowd`` by COCO's rules.

    Raises:
        ValueError: naming the missing key and the first annotation ids that lack it.
    """
    anns = list(coco_gt.dataset.get("annotations", []))
    for key in ("area", "iscrowd", "bbox"):
        bad = [a.get("id") for a in anns if key not in a]
        if bad:
            raise ValueError(
                f"{source}: {len(bad)} annotation(s) lack '{key}' that COCO evaluation needs "
                f"(ids {bad[:10]}): load it with siglip_dense.data.coco.load_coco_json, which fills it "
                "by COCO's rule"
            )


def segm_ground_truth(coco_gt: Any) -> Any:
    """The ground truth for mask AP: annotations without a segmentation left out (counted warning).

    pycocotools' segm evaluation crashes on them (``KeyError`` / ``IndexError``), so no anchor
    scores them; box AP keeps them (a box-only or zero-size annotation is an unmatched box).
    """
    anns = coco_gt.dataset.get("annotations", [])
    bad = [a.get("id") for a in anns if not a.get("segmentation")]
    if not bad:
        return coco_gt
    warnings.warn(
        f"segm AP leaves out {len(bad)} ground-truth annotation(s) without a segmentation (ids "
        f"{bad[:10]}{' ...' if len(bad) > 10 else ''}); bbox AP scores them",
        stacklevel=3,
    )
    return load_gt({**coco_gt.dataset, "annotations": [a for a in anns if a.get("segmentation")]})


def evaluate_coco(
    gt: Any,
    results: list[dict[str, Any]],
    iou_types: Sequence[str] = ("bbox",),
    image_ids: Iterable[int] | None = None,
    evaluator: str = "pycocotools",
    verbose: bool = False,
) -> dict[str, float | None]:
    """COCO AP metrics (``bbox_AP``, ``bbox_AP50`` ... ``segm_APl``) for ``results`` against ``gt``.

    ``image_ids`` restricts scoring to the images that were predicted (``limit_val_batches``, DDP
    shards); ``None`` scores every ground-truth image. The key set never depends on the detections:
    every ``{iou_type}_{AP,AP50,AP75,APs,APm,APl}`` is present, as a fraction, or ``None`` where COCO
    leaves it undefined (its -1: no ground truth in that area range, or no image scored). Empty
    results are scored as COCOeval scores a detector that found nothing (0 where ground truth exists).
    """
    evaluator = resolve_evaluator(evaluator)
    coco_gt = load_gt(gt)
    ids = sorted(int(i) for i in image_ids) if image_ids is not None else sorted(coco_gt.getImgIds())
    unknown = {int(r["image_id"]) for r in results} - set(coco_gt.getImgIds())
    if unknown:
        raise ValueError(f"results name image ids absent from the ground truth: {sorted(unknown)[:10]}")
    metrics: dict[str, float | None] = {}
    for iou_type in iou_types:
        if iou_type not in IOU_TYPES:
            raise ValueError(f"iou type must be one of {IOU_TYPES}, got {iou_type!r}")
    check_gt_for_eval(coco_gt, iou_types)
    for iou_type in iou_types:
        if iou_type == "segm" and results and "segmentation" not in results[0]:
            raise ValueError("segm evaluation needs results with a 'segmentation' RLE")
        if not ids:
            metrics.update({f"{iou_type}_{n}": None for n in STAT_NAMES})
            continue
        gt_used = segm_ground_truth(coco_gt) if iou_type == "segm" else coco_gt
        stats = _run_eval(gt_used, results, iou_type, ids, evaluator, verbose)
        metrics.update(_stats_to_metrics(iou_type, stats))
    return metrics


def _empty_results(dataset: dict[str, Any]) -> dict[str, Any]:
    """A detections 'dataset' with no detections (``loadRes`` cannot load an empty list)."""
    return {
        "images": list(dataset.get("images", [])),
        "categories": list(dataset.get("categories", [])),
        "annotations": [],
    }


def _run_eval(
    coco_gt: Any, results: list[dict[str, Any]], iou_type: str, ids: list[int], evaluator: str, verbose: bool
) -> list[float]:
    results = copy.deepcopy(results)  # loadRes adds area/id fields (and drops segm for bbox)
    if iou_type == "bbox":
        for r in results:
            r.pop("segmentation", None)
    out = contextlib.nullcontext() if verbose else _quiet()
    with out:
        if evaluator == "pycocotools":
            from pycocotools.cocoeval import COCOeval

            if results:
                coco_dt = coco_gt.loadRes(results)
            else:
                coco_dt = load_gt(_empty_results(coco_gt.dataset))
            ev = COCOeval(coco_gt, coco_dt, iou_type)
        else:
            from faster_coco_eval import COCO as FCOCO
            from faster_coco_eval import COCOeval_faster

            fgt = FCOCO(copy.deepcopy(coco_gt.dataset))
            fdt = fgt.loadRes(results) if results else FCOCO(_empty_results(coco_gt.dataset))
            ev = COCOeval_faster(fgt, fdt, iou_type, print_function=print)
        ev.params.imgIds = ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(s) for s in ev.stats]


__all__ = [
    "EVALUATORS",
    "check_gt_for_eval",
    "dedup_results",
    "detections_to_coco",
    "encode_masks",
    "evaluate_coco",
    "gather_results",
    "load_gt",
    "resolve_evaluator",
    "segm_ground_truth",
    "write_coco_results",
]
