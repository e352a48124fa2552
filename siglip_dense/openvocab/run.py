"""Open-vocabulary entry points behind ``tools/predict.py classes=...`` and ``tools/eval.py zero_shot=true``.

predict: ``python tools/predict.py ckpt_path=SIGLIP_CKPT input=IMG output=DIR 'classes=[cat,sofa,window]'``
eval:    ``python tools/eval.py zero_shot=true ckpt_path=SIGLIP_CKPT data=ade20k data.root=DIR``
``ckpt_path`` is a SigLIP (2) image-text checkpoint (a transformers ``SiglipModel`` / ``Siglip2Model``
directory or a hub id in the local cache) or a trained CAT-Seg checkpoint (``.ckpt``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from siglip_dense.models.text import resolve_templates
from siglip_dense.openvocab.zeroshot import (
    METHODS,
    OpenVocabError,
    ZeroShotSegmenter,
    class_names,
    is_trained_checkpoint,
    load_model,
)

# what each metric protocol averages (siglip_dense.evaluation.seg_metrics), for the console line
PROTOCOL_RULES = {"mmseg": "classes with union > 0", "detectron2": "classes with ground-truth pixels"}
OPTION_KEYS = ("method", "templates", "slide", "short_side", "classes", "held_out")


def open_vocab_options(cfg: DictConfig | dict[str, Any] | None) -> dict[str, Any]:
    """The ``open_vocab`` config block as plain values; an unknown key is an error naming it."""
    opts = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg or {})
    known = [*OPTION_KEYS, *TEXT_TOWER_KEYS]
    unknown = sorted(set(opts) - set(known))
    if unknown:
        raise OpenVocabError(f"open_vocab: unknown keys {unknown}; known: {known}")
    if opts.get("method") is not None and opts["method"] not in METHODS:
        raise OpenVocabError(f"open_vocab.method must be one of {list(METHODS)}, got {opts['method']!r}")
    try:
        resolve_templates(opts.get("templates") or "none")
    except ValueError as err:
        raise OpenVocabError(f"open_vocab.templates: {err}") from None
    return opts


def _classes(value: Any) -> list[str]:
    """Hydra gives ``classes="a,b"`` as a string and ``classes=[a,b]`` as a list."""
    if isinstance(value, DictConfig):
        raise OpenVocabError(f"classes must be a comma-separated string or a list, got {value}")
    if not isinstance(value, str) and isinstance(value, Sequence) or OmegaConf.is_list(value):
        return class_names([str(v) for v in value])
    return class_names(str(value))


# where the text tower's files are when not next to the weights / not where training saw them
TEXT_TOWER_KEYS = ("tokenizer", "text_checkpoint")


def _model(ckpt_path: str, device: str, opts: dict[str, Any]) -> ZeroShotSegmenter:
    keys = (
        ("text_checkpoint",)
        if is_trained_checkpoint(ckpt_path)
        else ("method", "templates", "slide", "tokenizer")
    )
    kwargs = {k: opts[k] for k in keys if opts.get(k) is not None}
    return load_model(ckpt_path, device=device, **kwargs)


def run_open_vocab_predict(
    ckpt_path: str,
    source: str | Path,
    output: str | Path,
    classes: Any,
    device: str = "cpu",
    options: dict[str, Any] | None = None,
) -> list[Path]:
    """Each image ``<name>`` (file name incl. extension, as :func:`siglip_dense.predict.output_name`):
    ``<name>.png`` (uint8 index into ``classes``) and ``<name>_vis.png`` (overlay with a legend of the
    classes present); ``classes.json`` lists the names. ``ckpt_path``: a SigLIP (2) image-text
    checkpoint (training-free) or a trained CAT-Seg ``.ckpt``. Returns the files written."""
    from siglip_dense.data.io import read_image, write_label
    from siglip_dense.predict import list_images, output_name
    from siglip_dense.visualize import save_segmentation_overlay

    names = _classes(classes)
    if len(names) > 255:
        raise ValueError(f"classes: at most 255 names fit a uint8 label PNG, got {len(names)}")
    opts = open_vocab_options(options)
    model = _model(ckpt_path, device, opts)
    out_dir = Path(output)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "classes.json").write_text(json.dumps(names, ensure_ascii=False, indent=1))
    written: list[Path] = []
    if isinstance(model, ZeroShotSegmenter):
        class_names(names, model.text_encoder)  # before any file is written
    source = Path(source)
    for path in list_images(source, exclude=out_dir):
        image = np.ascontiguousarray(read_image(path))
        if isinstance(model, ZeroShotSegmenter):
            labels = model.predict([image], names, short_side=opts.get("short_side"))[0]
        else:  # a trained CAT-Seg head: its own eval protocol
            labels = np.asarray(model.predict(image, classes=names))
        name = output_name(path, source)
        raw = out_dir / f"{name}.png"
        raw.parent.mkdir(parents=True, exist_ok=True)
        write_label(raw, labels.astype(np.uint8))
        vis = save_segmentation_overlay(image, labels, names, out_dir / f"{name}_vis.png")
        written += [raw, vis]
        print(f"{path} -> {raw.name}, {vis.name}")
    return written


def _data_config(cfg: DictConfig) -> dict[str, Any]:
    """The chosen data group (``data=ade20k``...) with the eval overrides that are set (not null)."""
    data = OmegaConf.to_container(cfg.get("data") or {}, resolve=True)
    data.pop("datamodules", None)
    data = {k: v for k, v in data.items() if v is not None}
    if "_target_" not in data:
        raise ValueError(
            "zero_shot=true needs a segmentation data config: pass data=<name> (e.g. data=ade20k "
            "data.root=DIR, or data=toy_seg)"
        )
    return data


@torch.no_grad()
def run_zero_shot_eval(cfg: DictConfig) -> dict[str, Any]:
    """mIoU of the training-free model on the validation split, class names from the data (or
    ``open_vocab.classes``); each image resized to ``short_side``, sliding windows, logits back at the
    original size (the labels' size). Writes ``metrics.json`` to ``output_dir``."""
    from hydra.utils import instantiate

    from siglip_dense.evaluation.sliding_window import eval_resize_scale, resize_image

    opts = open_vocab_options(cfg.get("open_vocab"))
    if _is_trained_checkpoint(cfg.ckpt_path):
        return _eval_trained(cfg, opts)
    datamodule = instantiate(_data_config(cfg), _convert_="all")
    names = _classes(opts["classes"]) if opts.get("classes") else list(datamodule.class_names)
    if len(names) != datamodule.num_classes:
        raise ValueError(
            f"open_vocab.classes has {len(names)} names, the data at {datamodule.root} has "
            f"{datamodule.num_classes} classes"
        )
    device = str(cfg.get("device", "cpu") or "cpu")
    model = _model(cfg.ckpt_path, device, opts)
    datamodule.mean, datamodule.std = model.mean, model.std
    datamodule.setup("validate")
    metric = _metric(datamodule, len(names))
    side = int(opts.get("short_side") or min(model.backbone.img_size))
    dataset = datamodule.val_dataset
    for index in range(len(dataset)):  # (iterating would wrap around: __getitem__ takes any index)
        sample = dataset[index]
        image = sample["image"][None].to(device)
        h, w = image.shape[-2:]
        x = resize_image(image, eval_resize_scale(h, w, side, 4 * side))
        logits = F.interpolate(model.segment(x, names), size=(h, w), mode="bilinear", align_corners=False)
        metric.update(logits.argmax(1).cpu(), sample["mask"][None].long())
    return _write_metrics(cfg, metric, names, model.method, opts.get("held_out"))


def _metric(datamodule: Any, num_classes: int) -> Any:
    """The data's confusion-matrix metric: its ignore value and its benchmark's mIoU rule
    (``metric_protocol``: detectron2's for the open-vocabulary benchmark configs, mmseg's otherwise)."""
    from siglip_dense.evaluation.seg_metrics import SegmentationMetric, check_metric_protocol

    protocol = check_metric_protocol(getattr(datamodule, "metric_protocol", "mmseg"), "data.metric_protocol")
    return SegmentationMetric(
        num_classes, ignore_index=getattr(datamodule, "ignore_index", 255), protocol=protocol
    )


def _write_metrics(
    cfg: DictConfig, metric: Any, names: list[str], method: str, held_out: Any = None
) -> dict[str, Any]:
    """metrics.json (the segmentation keys, ``fwIoU`` under detectron2's rule, and ``metric_protocol``
    naming the rule; with ``open_vocab.held_out`` also mIoU_seen, mIoU_unseen and hIoU, see
    :func:`~siglip_dense.openvocab.heldout.seen_unseen_miou`) into ``output_dir``."""
    from siglip_dense.openvocab.heldout import seen_unseen_miou
    from siglip_dense.train import output_dir_of

    result = metric.compute()
    # NaN (no class in the protocol's mean) is null in metrics.json
    metrics: dict[str, Any] = {
        k: _or_null(result[k]) for k in ("mIoU", "aAcc", "mAcc", "fwIoU") if k in result
    }
    per_class = result["per_class_IoU"].tolist()
    metrics["per_class_IoU"] = {n: _or_null(v) for n, v in zip(names, per_class, strict=True)}
    metrics["metric_protocol"] = metric.protocol
    if held_out:
        split = seen_unseen_miou(metrics["per_class_IoU"], _classes(held_out))
        metrics |= {k: None if v != v else v for k, v in split.items()}
    out_dir = Path(cfg.output_dir) if cfg.get("output_dir") else output_dir_of(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False))
    print(
        f"zero-shot ({method}) mIoU {_fmt(metrics['mIoU'])} aAcc {_fmt(metrics['aAcc'])} "
        f"({metric.protocol} protocol: {PROTOCOL_RULES[metric.protocol]})"
    )
    if held_out:
        print("seen mIoU {mIoU_seen}, unseen mIoU {mIoU_unseen}, hIoU {hIoU}".format(**metrics))
    print(f"metrics -> {out_dir / 'metrics.json'}")
    return metrics


def _or_null(value: Any) -> float | None:
    value = float(value)
    return None if value != value else value


def _fmt(value: float | None) -> str:
    return "null" if value is None else f"{value:.4f}"


def _is_trained_checkpoint(path: str | Path) -> bool:
    """A siglip-dense Lightning checkpoint (a file) rather than a SigLIP image-text checkpoint (a dir/hub id)."""
    return is_trained_checkpoint(path)


@torch.no_grad()
def _eval_trained(cfg: DictConfig, opts: dict[str, Any]) -> dict[str, Any]:
    """A trained open-vocabulary model (CAT-Seg head) on the data's class names or ``open_vocab.classes``:
    the task's own eval protocol (short side, sliding windows), the head switched to those names."""
    from hydra.utils import instantiate

    from siglip_dense.checkpoints import load_task
    from siglip_dense.evaluate import eval_data_config
    from siglip_dense.evaluation.sliding_window import eval_resize_scale, resize_image, slide_inference

    device = str(cfg.get("device", "cpu") or "cpu")
    task = load_task(cfg.ckpt_path, map_location=device).to(device).eval()
    head = getattr(getattr(task, "model", None), "head", None)
    if not hasattr(head, "set_classes"):
        raise ValueError(
            f"{cfg.ckpt_path}: its head is not open-vocabulary (no set_classes); zero_shot=true "
            "needs a CAT-Seg head checkpoint or a SigLIP image-text checkpoint"
        )
    datamodule = instantiate(eval_data_config(cfg, task), _convert_="all")
    names = _classes(opts["classes"]) if opts.get("classes") else list(datamodule.class_names)
    if len(names) != datamodule.num_classes:
        raise ValueError(
            f"open_vocab.classes has {len(names)} names, the data has {datamodule.num_classes} classes"
        )
    if opts.get("text_checkpoint"):
        head.text_checkpoint, head._text = str(opts["text_checkpoint"]), []
    head.set_classes(names)
    datamodule.mean, datamodule.std = tuple(task.mean), tuple(task.std)
    datamodule.setup("validate")
    ev = task.eval_cfg
    metric = _metric(datamodule, len(names))
    dataset = datamodule.val_dataset
    for index in range(len(dataset)):
        sample = dataset[index]
        image = sample["image"][None].to(device)
        h, w = image.shape[-2:]
        x = resize_image(image, eval_resize_scale(h, w, ev["short_side"], ev["max_long_side"]))
        logits = slide_inference(
            lambda t: task.model(t)["logits"], x, len(names), ev["crop_size"], ev["stride"]
        )
        logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        metric.update(logits.argmax(1).cpu(), sample["mask"][None].long())
    return _write_metrics(cfg, metric, names, "trained head", opts.get("held_out"))
