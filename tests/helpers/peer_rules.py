"""Peers' rules re-typed from their code, as independent references for the tests.

- detectron2 ``SemSegEvaluator.process`` / ``evaluate`` (detectron2/evaluation/sem_seg_evaluation.py):
  confusion matrix indexed [pred, gt] with the ignore label folded into an extra class, metrics over
  classes with ground-truth pixels (``pos_gt > 0``).
- CAT-Seg ``CATSegPredictor.class_embeddings`` (cat_seg/modeling/transformer/cat_seg_predictor.py):
  a name holding ", " is split into synonyms; each synonym in each template; unit embeddings averaged
  over the synonyms per template, then normalised again.
- big_vision ``_canonicalize`` (big_vision/evaluators/proj/image_text/prompt_engineering.py) and the
  ``tokenize`` op's ``eos="sticky"`` truncation / padding (big_vision/pp/ops_text.py).
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Sequence

import numpy as np
import torch


def detectron2_sem_seg(
    preds: Sequence[np.ndarray], gts: Sequence[np.ndarray], num_classes: int, ignore_label: int
) -> dict[str, object]:
    """detectron2's mIoU / fwIoU / mACC / pACC (fractions, not percent) and per-class IoU / ACC."""
    conf = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
    for pred, gt in zip(preds, gts, strict=True):
        pred = np.array(pred, dtype=int)
        gt = np.array(gt, dtype=int)
        gt[gt == ignore_label] = num_classes
        conf += np.bincount(
            (num_classes + 1) * pred.reshape(-1) + gt.reshape(-1), minlength=conf.size
        ).reshape(conf.shape)
    acc = np.full(num_classes, np.nan, dtype=float)
    iou = np.full(num_classes, np.nan, dtype=float)
    tp = conf.diagonal()[:-1].astype(float)
    pos_gt = np.sum(conf[:-1, :-1], axis=0).astype(float)
    class_weights = pos_gt / np.sum(pos_gt)
    pos_pred = np.sum(conf[:-1, :-1], axis=1).astype(float)
    acc_valid = pos_gt > 0
    acc[acc_valid] = tp[acc_valid] / pos_gt[acc_valid]
    union = pos_gt + pos_pred - tp
    iou_valid = np.logical_and(acc_valid, union > 0)
    iou[iou_valid] = tp[iou_valid] / union[iou_valid]
    return {
        "mIoU": np.sum(iou[iou_valid]) / np.sum(iou_valid),
        "fwIoU": np.sum(iou[iou_valid] * class_weights[iou_valid]),
        "mACC": np.sum(acc[acc_valid]) / np.sum(acc_valid),
        "pACC": np.sum(tp) / np.sum(pos_gt),
        "IoU": iou,
        "ACC": acc,
    }


def catseg_class_embeddings(
    classnames: Sequence[str], templates: Sequence[str], encode_text: Callable[[list[str]], torch.Tensor]
) -> torch.Tensor:
    """K×P×D: CAT-Seg's per-template class embeddings (``encode_text``: texts -> N×D, unnormalised)."""
    out = []
    for classname in classnames:
        if ", " in classname:
            splits = classname.split(", ")
            texts = [template.format(s) for template in templates for s in splits]
        else:
            texts = [template.format(classname) for template in templates]
        emb = encode_text(texts)
        emb = emb / emb.norm(dim=-1, keepdim=True)
        if len(templates) != emb.shape[0]:
            emb = emb.reshape(len(templates), -1, emb.shape[-1]).mean(dim=1)
            emb = emb / emb.norm(dim=-1, keepdim=True)
        out.append(emb)
    return torch.stack(out)


def big_vision_canonicalize(text: str, *, keep_punctuation_exact_string: str | None = None) -> str:
    """big_vision's text canonicalisation: "_" -> " ", punctuation removed (but the exact kept string),
    lower-cased, whitespace collapsed and stripped."""
    text = text.replace("_", " ")
    if keep_punctuation_exact_string:
        text = keep_punctuation_exact_string.join(
            part.translate(str.maketrans("", "", string.punctuation))
            for part in text.split(keep_punctuation_exact_string)
        )
    else:
        text = text.translate(str.maketrans("", "", string.punctuation))
    text = text.lower()
    text = re.sub(r"\s+", " ", text)
    return text.strip()


def big_vision_sticky_eos(pieces: Sequence[int], max_len: int, eos: int, pad: int) -> list[int]:
    """big_vision's ``tokenize(force_eos=True)``: the text's tokens + EOS, cut to ``max_len`` keeping
    the final EOS when too long, else padded with ``pad``."""
    tokens = [*pieces, eos]
    if len(tokens) >= max_len:
        return [*tokens[: max_len - 1], tokens[-1]]
    return tokens + [pad] * (max_len - len(tokens))
