"""Semantic segmentation: linear probe or UPerNet on a SigLIP 2 backbone."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from hydra.utils import get_class, instantiate

from siglip_dense.config_check import check_option_keys
from siglip_dense.evaluation.deferred import eval_checks_deferred
from siglip_dense.evaluation.naflex import check_naflex_eval, naflex_inference
from siglip_dense.evaluation.seg_metrics import SegmentationMetric, check_metric_protocol, format_seg_table
from siglip_dense.evaluation.sliding_window import (
    check_window_coverage,
    inference_with_tta,
    round_crop_to_patch,
)
from siglip_dense.models.backbone import SigLIP2Backbone
from siglip_dense.models.segmentor import Segmentor
from siglip_dense.tasks.component import EvalContext, TaskComponent, fill_in_keys
from siglip_dense.tasks.module import DenseModule

if TYPE_CHECKING:
    from siglip_dense.predict import SegmentationPrediction

DEFAULT_EVAL = {
    "mode": "slide",
    "short_side": 512,
    "max_long_side": 2048,
    "crop_size": [512, 512],
    "stride": [341, 341],
    "scales": [1.0],
    "flip": False,
    "max_num_patches": 1024,  # mode=naflex: each image's patch budget (siglip_dense.evaluation.naflex)
}

TTA_PRESETS: dict[str, dict[str, Any]] = {
    "none": {"scales": [1.0], "flip": False},
    "flip": {"scales": [1.0], "flip": True},
    "ms_flip": {"scales": [0.5, 0.75, 1.0, 1.25, 1.5, 1.75], "flip": True},
}


def _needs_class_names(head: dict[str, Any]) -> bool:
    return (
        bool(getattr(get_class(head["_target_"]), "needs_class_names", False))
        if "_target_" in head
        else False
    )


class SegmentationComponent(TaskComponent):
    """Cross-entropy (ignore 255) training; dataset-level mIoU with the ADE20K test protocol.

    ``model`` is a :class:`~siglip_dense.models.segmentor.Segmentor` (backbone → neck → head, aux head).
    ``metric_protocol`` (``mmseg`` | ``detectron2``, see :mod:`siglip_dense.evaluation.seg_metrics`):
    which classes enter mIoU; the data decides it (``task_kwargs`` in training, :meth:`bind_data` when
    evaluating on other data).
    """

    kind = "segmentation"

    def __init__(
        self,
        model: Segmentor,
        num_classes: int,
        class_names: list[str] | None = None,
        aux_weight: float = 0.4,
        ignore_index: int = 255,
        eval: dict[str, Any] | None = None,  # noqa: A002 - the config key users write
        metric_protocol: str = "mmseg",
    ) -> None:
        super().__init__(model)
        check_option_keys(eval, DEFAULT_EVAL, "eval", "SegmentationTask")
        self.num_classes = int(num_classes)
        self.class_names = list(class_names) if class_names else [f"class_{i}" for i in range(num_classes)]
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for num_classes={self.num_classes}")
        self.ignore_index = int(ignore_index)
        self.aux_weight = float(aux_weight)
        self.eval_cfg = {**DEFAULT_EVAL, **(eval or {})}
        self.eval_cfg["crop_size"] = list(
            round_crop_to_patch(tuple(self.eval_cfg["crop_size"]), self.backbone.patch_size)
        )
        if self.eval_cfg["mode"] == "slide" and not eval_checks_deferred():  # else checked at inference
            check_window_coverage(self.eval_cfg["crop_size"], self.eval_cfg["stride"])
        check_naflex_eval(self.eval_cfg, self.backbone.window_size)
        self.val_metric = SegmentationMetric(
            self.num_classes,
            ignore_index=self.ignore_index,
            protocol=check_metric_protocol(metric_protocol, "data.metric_protocol (or task.metric_protocol)"),
        )
        # added to class indices when predictions are written (1 for reduce_zero_label datasets)
        self.label_offset = 0

    @classmethod
    def build(
        cls,
        backbone: SigLIP2Backbone,
        head: dict[str, Any],
        num_classes: int,
        class_names: list[str] | None = None,
        neck: dict[str, Any] | None = None,
        aux_head: dict[str, Any] | None = None,
        aux_weight: float = 0.4,
        ignore_index: int = 255,
        eval: dict[str, Any] | None = None,  # noqa: A002
        out_keys: list[str] | None = None,
        metric_protocol: str = "mmseg",
    ) -> SegmentationComponent:
        """Neck and heads from their configs on ``backbone`` (whose maps ``out_keys`` this task reads)."""
        keys = list(out_keys) if out_keys is not None else list(backbone.out_keys)
        neck_module = None
        if neck:
            neck_cfg = dict(neck)
            if "in_keys" in neck_cfg and neck_cfg["in_keys"] is None:
                neck_cfg["in_keys"] = keys
            neck_module = instantiate(
                neck_cfg, in_channels=backbone.embed_dim, in_stride=backbone.patch_size, _convert_="all"
            )
        if neck_module is not None:
            feat_channels, feat_keys = neck_module.out_channels, list(neck_module.strides)
        else:
            feat_channels, feat_keys = backbone.embed_dim, keys
        # open-vocabulary heads (models/heads/catseg.py) embed the data's class names
        names = {"class_names": list(class_names or [])} if _needs_class_names(head) else {}
        head_module = instantiate(
            fill_in_keys(head, feat_channels, feat_keys),
            num_classes=int(num_classes),
            _convert_="all",
            **names,
        )
        aux = None
        if aux_head:
            aux = instantiate(
                fill_in_keys(aux_head, feat_channels, feat_keys),
                num_classes=int(num_classes),
                _convert_="all",
            )
        model = Segmentor(backbone, neck_module, head_module, aux)
        return cls(model, num_classes, class_names, aux_weight, ignore_index, eval, metric_protocol)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)["logits"]

    # -- training -----------------------------------------------------------------------------------
    def compute_loss(self, out: dict[str, torch.Tensor], target: torch.Tensor) -> dict[str, torch.Tensor]:
        losses = {"loss_ce": F.cross_entropy(out["logits"].float(), target, ignore_index=self.ignore_index)}
        if "aux_logits" in out and self.aux_weight > 0:
            aux = F.cross_entropy(out["aux_logits"].float(), target, ignore_index=self.ignore_index)
            losses["loss_aux"] = self.aux_weight * aux
        losses["loss"] = sum(losses.values())
        return losses

    def losses(self, batch: dict[str, Any], out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.compute_loss(out, batch["mask"].long())

    def check_batch(self, batch: dict[str, Any]) -> None:
        self.check_labels(batch["mask"], batch)

    def check_labels(self, target: torch.Tensor, batch: dict[str, Any]) -> None:
        bad = (target != self.ignore_index) & ((target < 0) | (target >= self.num_classes))
        if bad.any():
            values = sorted(set(target[bad].unique().tolist()))[:10]
            names = [m.get("path", "?") for m in batch.get("meta", [])][:4]
            raise ValueError(
                f"label values {values} are outside 0..{self.num_classes - 1} (and not ignore "
                f"{self.ignore_index}) in batch from {names}: wrong num_classes or reduce_zero_label?"
            )

    # -- evaluation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def infer(self, image: torch.Tensor) -> torch.Tensor:
        """Logits at the original size for one normalised image batch, by the configured protocol."""
        cfg = self.eval_cfg
        if cfg["mode"] == "naflex":
            return torch.stack(self.infer_naflex(list(image)))
        return inference_with_tta(
            self.forward,
            image,
            self.num_classes,
            short_side=cfg["short_side"],
            max_long_side=cfg["max_long_side"],
            crop_size=tuple(cfg["crop_size"]),
            stride=tuple(cfg["stride"]),
            scales=tuple(cfg["scales"]),
            flip=cfg["flip"],
            mode=cfg["mode"],
        )

    @torch.no_grad()
    def infer_naflex(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """K×H×W logits per C×H×W image: one NaFlex batch at native aspect ratios (eval.mode=naflex)."""
        # set_tta may have changed it since __init__
        check_naflex_eval(self.eval_cfg, self.backbone.window_size)
        return naflex_inference(
            lambda x, grid: self.model(x, grid_sizes=grid)["logits"],
            [x.to(self.device) for x in images],
            self.backbone.patch_size,
            int(self.eval_cfg["max_num_patches"]),
            flip=bool(self.eval_cfg["flip"]),
        )

    def eval_step(self, batch: dict[str, Any]) -> None:
        images, masks = batch["image"], batch["mask"]
        if isinstance(images, torch.Tensor):
            images, masks = list(images), list(masks)
        metas = batch.get("meta") or [{} for _ in images]
        naflex = self.infer_naflex(images) if self.eval_cfg["mode"] == "naflex" else None
        for n, (image, mask, meta) in enumerate(zip(images, masks, metas)):
            if naflex is not None:
                pred = naflex[n].argmax(0)[None]
            else:
                pred = self.infer(image[None].to(self.device)).argmax(1)
            self.val_metric.update(pred, mask[None].to(self.device).long())
            if self.predictions_dir is not None:
                self.write_prediction(pred[0], meta)

    def write_prediction(self, pred: torch.Tensor, meta: dict[str, Any]) -> Path:
        """``predictions/<stem>.png``, uint8 in the dataset's values (ADE20K: class index + 1)."""
        from siglip_dense.data.io import write_label

        values = pred.cpu().numpy().astype("int64") + self.label_offset
        if values.max(initial=0) > 255:
            raise ValueError(f"{self.num_classes} classes do not fit a uint8 PNG")
        path = Path(self.predictions_dir) / f"{meta.get('stem', 'image')}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_label(path, values.astype("uint8"))
        return path

    @torch.no_grad()
    def predict(self, images: Any) -> list[SegmentationPrediction]:
        """One :class:`~siglip_dense.predict.SegmentationPrediction` per image (any input
        :func:`~siglip_dense.predict.to_rgb_images` accepts), by the eval protocol (slide / whole /
        NaFlex, TTA): H×W int64 class indices at the image's size, and the class names."""
        from siglip_dense.predict import SegmentationPrediction, normalize, to_rgb_images

        out = []
        for rgb in to_rgb_images(images)[0]:
            x = normalize(rgb, self.mean, self.std, self.device)
            labels = self.predict_labels(x)[0].cpu().numpy().astype("int64")
            out.append(SegmentationPrediction(labels, list(self.class_names)))
        return out

    @property
    def metric_protocol(self) -> str:
        return self.val_metric.protocol

    def metric_names(self) -> list[str]:
        # SegmentationMetric.compute() without per_class_IoU
        return ["mIoU", "aAcc", "mAcc", *(["fwIoU"] if self.metric_protocol == "detectron2" else [])]

    def eval_epoch_end(self, context: EvalContext) -> dict[str, float]:
        metrics = self.val_metric.compute()
        self.val_metric.reset()
        per_class = metrics.pop("per_class_IoU")
        self.last_metrics = {k: float(v) for k, v in metrics.items()}
        # classes outside the protocol's mean (no union / no ground truth) have no IoU: null in metrics.json
        self.last_metrics["per_class_IoU"] = {
            name: (None if math.isnan(v) else v) for name, v in zip(self.class_names, per_class.tolist())
        }
        self.last_metrics["metric_protocol"] = self.metric_protocol
        return dict(metrics)

    @torch.no_grad()
    def predict_labels(self, image: torch.Tensor) -> torch.Tensor:
        return self.infer(image).argmax(1)

    def write_outputs(self, image: Any, prediction: Any, out_dir: Path, stem: str) -> list[Path]:
        """tools/predict.py: ``<stem>.png`` label values (dataset convention: ADE20K index + 1) and
        ``<stem>_vis.png`` (overlay with a legend of the classes present)."""
        import numpy as np

        from siglip_dense.data.io import write_label
        from siglip_dense.visualize import save_segmentation_overlay

        labels = np.asarray(prediction)
        offset = int(bool((self.data_config or {}).get("reduce_zero_label", False)))
        raw = Path(out_dir) / f"{stem}.png"
        raw.parent.mkdir(parents=True, exist_ok=True)
        write_label(raw, (labels + offset).astype("uint8"))
        vis = save_segmentation_overlay(image, labels, self.class_names, Path(out_dir) / f"{stem}_vis.png")
        return [raw, vis]

    def bind_data(self, datamodule: Any) -> None:
        names = list(getattr(datamodule, "class_names", []) or [])
        if names and len(names) != self.num_classes:
            raise ValueError(
                f"the model predicts {self.num_classes} classes ({self.class_names[:3]}...) but the data "
                f"at {getattr(datamodule, 'root', '?')} has {len(names)} ({names[:3]}...)"
            )
        self.label_offset = int(bool(getattr(datamodule, "reduce_zero_label", False)))
        protocol = getattr(datamodule, "metric_protocol", None)
        if protocol is not None:  # the evaluated benchmark's rule, not the training data's
            self.val_metric.protocol = check_metric_protocol(protocol, "data.metric_protocol")

    def set_tta(self, tta: str | dict[str, Any]) -> None:
        """``ms_flip`` = mmseg's aug test (scales 0.5-1.75, flip); a dict overrides eval keys."""
        if isinstance(tta, str):
            if tta not in TTA_PRESETS:
                raise ValueError(f"unknown tta preset {tta!r}; known: {sorted(TTA_PRESETS)}")
            tta = TTA_PRESETS[tta]
        unknown = set(tta) - set(DEFAULT_EVAL)
        if unknown:
            raise ValueError(f"unknown tta keys {sorted(unknown)}; known: {sorted(DEFAULT_EVAL)}")
        cfg = {**self.eval_cfg, **tta}
        if cfg["mode"] == "slide":
            check_window_coverage(cfg["crop_size"], cfg["stride"], setting="tta")
        self.eval_cfg = cfg

    def summarize(self, metrics: dict[str, Any]) -> str:
        return format_seg_table(metrics, self.class_names)

    def save_visualization(self, datamodule: Any, path: Path, num: int) -> Path | None:
        from siglip_dense.visualize import save_segmentation_grid

        return save_segmentation_grid(self, datamodule, path, num)

    def unused_parameter_reasons(self) -> list[str]:
        reasons = []
        aux = self.model.aux_head
        if aux is not None and self.aux_weight <= 0 and any(p.requires_grad for p in aux.parameters()):
            reasons.append("the auxiliary head has aux_weight=0")
        return reasons

    def meta(self) -> dict[str, Any]:
        return {"class_names": list(self.class_names), "num_classes": self.num_classes}


class SegmentationTask(DenseModule):
    """Semantic segmentation as a one-task :class:`~siglip_dense.tasks.module.DenseModule`.

    The constructor arguments are the ``task`` config's keys (``configs/task/seg_*.yaml``).
    """

    task_name = "segmentation"
    component_class = SegmentationComponent

    @classmethod
    def option_keys(cls) -> dict[str, set[str]]:
        """The keys of the dict options (see ``config_check.option_keys_of``)."""
        return {"eval": set(DEFAULT_EVAL)}

    def __init__(
        self,
        backbone: dict[str, Any],
        head: dict[str, Any],
        num_classes: int,
        class_names: list[str] | None = None,
        neck: dict[str, Any] | None = None,
        aux_head: dict[str, Any] | None = None,
        aux_weight: float = 0.4,
        ignore_index: int = 255,
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        layer_decay: float = 1.0,
        freeze_backbone: bool = False,
        eval: dict[str, Any] | None = None,  # noqa: A002 - the config key users write
        init_from: str | None = None,
        init_from_filter: str = "all",
        metric_protocol: str = "mmseg",
    ) -> None:
        super().__init__(backbone, optimizer, scheduler, layer_decay, freeze_backbone)
        self.save_hyperparameters()
        component = SegmentationComponent.build(
            self.build_backbone(backbone),
            head,
            num_classes,
            class_names,
            neck,
            aux_head,
            aux_weight,
            ignore_index,
            eval,
            metric_protocol=metric_protocol,
        )
        self.attach({self.task_name: component})
        self.finish_init(freeze_backbone, init_from, init_from_filter)


__all__ = ["DEFAULT_EVAL", "TTA_PRESETS", "SegmentationComponent", "SegmentationTask"]
