"""Object detection / instance segmentation: torchvision detectors on a SigLIP 2 feature pyramid."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only

from siglip_dense.config_check import check_option_keys
from siglip_dense.evaluation.coco_eval import (
    STAT_NAMES,
    detections_to_coco,
    evaluate_coco,
    gather_results,
    resolve_evaluator,
    write_coco_results,
)
from siglip_dense.models.backbone import SigLIP2Backbone
from siglip_dense.models.heads.detection import build_detector
from siglip_dense.tasks.component import EvalContext, TaskComponent
from siglip_dense.tasks.module import DenseModule

if TYPE_CHECKING:
    from siglip_dense.predict import DetectionPrediction

METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


# what build_detector passes to the torchvision constructor itself (not settable from task.detector)
_BUILT_BY_US = {"backbone", "num_classes", "anchor_generator", "rpn_anchor_generator", "head", "rpn_head"}
_BUILT_BY_US |= {"box_roi_pool", "box_predictor", "mask_roi_pool", "mask_predictor", "mask_head"}
_BUILT_BY_US |= {"min_size", "max_size", "image_mean", "image_std", "size_divisible", "_skip_resize"}


def detector_option_keys() -> set[str]:
    """Keys ``task.detector`` may hold: ``kind``, :func:`build_detector`'s options and the torchvision
    constructors' keyword arguments that it forwards (score thresholds, sampler sizes).

    torchvision's detectors take ``**kwargs``, so without this check a misspelt key
    (``anchor_scal``) would be swallowed there and the default used silently.
    """
    from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet

    def named(fn: Any) -> set[str]:
        params = inspect.signature(fn).parameters.values()
        return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}

    keys = named(build_detector) - {"body", "neck", "num_classes", "image_size"}
    for cls in (FasterRCNN, MaskRCNN, RetinaNet, FCOS):
        keys |= named(cls.__init__) - {"self"}
    return (keys - _BUILT_BY_US) | {"kind"}


class DetectionComponent(TaskComponent):
    """Sum of the detector's losses for training; COCO AP (pycocotools / faster-coco-eval) for validation.

    ``model`` is the torchvision detector; its ``.backbone`` is a PyramidBackbone whose ``body`` is
    the SigLIP2Backbone, hence the paths used by layer decay and ``init_from`` filters. Its images
    (a list of any sizes: the detector resizes and batches them) take their own backbone pass.
    """

    kind = "detection"
    backbone_path = "backbone.body"
    neck_path = "backbone.neck"
    shares_backbone_pass = False
    log_prog_bar = False

    def __init__(
        self,
        model: torch.nn.Module,
        num_classes: int,
        class_names: list[str] | None = None,
        category_ids: list[int] | None = None,
        image_size: int | list[int] = 1024,
        evaluator: str = "pycocotools",
        save_results: bool = True,
        mask_threshold: float = 0.5,
        vis_score_threshold: float = 0.5,
    ) -> None:
        super().__init__(model)
        self.num_classes = int(num_classes)
        self.class_names = (
            list(class_names) if class_names else [f"class_{i}" for i in range(self.num_classes)]
        )
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for num_classes={self.num_classes}")
        # contiguous label i <-> original COCO category id (results and checkpoints use the original ids)
        self.category_ids = (
            [int(c) for c in category_ids] if category_ids else list(range(1, self.num_classes + 1))
        )
        if len(self.category_ids) != self.num_classes or len(set(self.category_ids)) != self.num_classes:
            raise ValueError(
                f"category_ids {self.category_ids} must be {self.num_classes} distinct ids (one per class)"
            )
        self.image_size = image_size_pair(image_size)
        self.evaluator = resolve_evaluator(evaluator)
        self.save_results = bool(save_results)
        self.mask_threshold = float(mask_threshold)
        self.vis_score_threshold = float(vis_score_threshold)
        self.has_masks = bool(self.model.has_masks)
        self.label_offset = int(self.model.label_offset)
        self._val_results: dict[int, list[dict[str, Any]]] = {}
        self.last_results: list[dict[str, Any]] = []

    @classmethod
    def build(
        cls,
        backbone: SigLIP2Backbone,
        neck: dict[str, Any],
        detector: dict[str, Any],
        num_classes: int,
        class_names: list[str] | None = None,
        category_ids: list[int] | None = None,
        image_size: int | list[int] = 1024,
        evaluator: str = "pycocotools",
        save_results: bool = True,
        mask_threshold: float = 0.5,
        vis_score_threshold: float = 0.5,
        out_keys: list[str] | None = None,
    ) -> DetectionComponent:
        """The pyramid neck and the torchvision detector on ``backbone`` (maps ``out_keys``)."""
        options = {k: v for k, v in detector.items() if k != "_target_"}
        check_option_keys(options, detector_option_keys(), "detector", "DetectionTask")
        if not neck or "_target_" not in neck:
            raise ValueError(
                "detection needs a neck that builds a pyramid (neck=simple_fpn_p6 or simple_fpn)"
            )
        neck_cfg = dict(neck)
        if "in_keys" in neck_cfg and neck_cfg["in_keys"] is None:
            neck_cfg["in_keys"] = list(out_keys) if out_keys is not None else list(backbone.out_keys)
        neck_module = instantiate(
            neck_cfg, in_channels=backbone.embed_dim, in_stride=backbone.patch_size, _convert_="all"
        )
        # null = the detector's default (one config file serves R-CNNs and single-stage detectors)
        cfg = {k: v for k, v in detector.items() if v is not None}
        if "kind" not in cfg:
            raise ValueError("detector config needs 'kind': faster_rcnn, mask_rcnn, retinanet or fcos")
        kind = cfg.pop("kind")
        cfg.pop("_target_", None)
        model = build_detector(
            kind, backbone, neck_module, int(num_classes), image_size=image_size_pair(image_size), **cfg
        )
        return cls(
            model,
            num_classes,
            class_names,
            category_ids,
            image_size,
            evaluator,
            save_results,
            mask_threshold,
            vis_score_threshold,
        )

    # -- training -----------------------------------------------------------------------------------
    def check_batch(self, batch: dict[str, Any]) -> None:
        """Labels in range and boxes with area, checked on the host before the device transfer."""
        targets = batch["target"]
        for t, meta in zip(targets, batch.get("meta", [{}] * len(targets))):
            labels = t["labels"].long()
            if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(
                    f"labels {labels.unique().tolist()} outside 0..{self.num_classes - 1} in "
                    f"{meta.get('path', '?')}: the data's categories do not match this model's"
                )
            boxes = t["boxes"].float()
            if len(boxes) and not bool((boxes[:, 2:] > boxes[:, :2]).all()):
                raise ValueError(f"degenerate (zero-size) box in the targets of {meta.get('path', '?')}")

    def to_model_targets(self, targets: list[dict[str, torch.Tensor]], batch: dict[str, Any]) -> list[dict]:
        """Contiguous labels 0..K-1 → the detector's (R-CNN: +1, 0 is background)."""
        out = []
        for t in targets:
            labels, boxes = t["labels"].long(), t["boxes"].float()
            mt = {"boxes": boxes.to(self.device), "labels": (labels + self.label_offset).to(self.device)}
            if self.has_masks:
                if "masks" not in t:
                    raise ValueError("Mask R-CNN needs instance masks: set data.with_masks=true")
                mt["masks"] = t["masks"].to(self.device)
            out.append(mt)
        return out

    def training_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The detector's losses (its own backbone pass) and their sum ``loss``."""
        images = [im.to(self.device) for im in batch["image"]]
        targets = self.to_model_targets(batch["target"], batch)
        losses = self.model(images, targets)
        return {**losses, "loss": sum(v.float() for v in losses.values())}

    # -- inference ----------------------------------------------------------------------------------
    @torch.no_grad()
    def detect(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Detections per normalised 3×H×W image in its own pixels, labels contiguous 0..K-1
        (masks N×1×H×W probabilities)."""
        was_training = self.model.training
        self.model.eval()
        outs = self.model([im.to(self.device) for im in images])
        self.model.train(was_training)
        for o in outs:
            o["labels"] = o["labels"] - self.label_offset
        return outs

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return self.detect(images)

    @torch.no_grad()
    def predict(self, images: Any, score_threshold: float | None = None) -> list[DetectionPrediction]:
        """One :class:`~siglip_dense.predict.DetectionPrediction` per image (any input
        :func:`~siglip_dense.predict.to_rgb_images` accepts), each image detected on its own.

        ``score_threshold`` (None: ``vis_score_threshold``, the task config's, 0.5 by default)
        replaces the detector's own score threshold for this call (torchvision keeps score > it,
        before NMS and the top-``detections_per_img`` cut), so 0 returns the detector's raw top
        detections. Boxes are xyxy in the image's pixels; category ids are the dataset's.

        Raises:
            ValueError: ``score_threshold`` outside [0, 1].
        """
        from siglip_dense.predict import DetectionPrediction, normalize, to_rgb_images

        thr = self.vis_score_threshold if score_threshold is None else float(score_threshold)
        if not 0.0 <= thr <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {thr}")
        ids = np.asarray(self.category_ids, dtype=np.int64)
        out = []
        with detector_score_threshold(self.model, thr):
            for rgb in to_rgb_images(images)[0]:
                o = self.detect([normalize(rgb, self.mean, self.std, self.device)[0]])[0]
                labels = o["labels"].cpu().numpy().astype(np.int64)
                masks = None
                if "masks" in o:
                    masks = (o["masks"][:, 0] > self.mask_threshold).cpu().numpy()
                out.append(
                    DetectionPrediction(
                        boxes=o["boxes"].float().cpu().numpy(),
                        scores=o["scores"].float().cpu().numpy(),
                        labels=labels,
                        category_ids=ids[labels],
                        category_names=[self.class_names[i] for i in labels],
                        masks=masks,
                        score_threshold=thr,
                    )
                )
        return out

    def write_outputs(self, image: Any, prediction: Any, out_dir: Path, stem: str) -> list[Path]:
        """tools/predict.py: ``<stem>.json`` (xyxy boxes in pixels, scores, labels, class names, COCO
        category ids, the threshold used) + ``<stem>_vis.png`` (boxes, masks, a legend of the classes)."""
        import json

        from PIL import Image

        from siglip_dense.visualize import draw_detections

        dets = [
            {
                "bbox_xyxy": [round(float(v), 2) for v in b],
                "score": float(sc),
                "label": int(lab),
                "class_name": str(name),
                "category_id": int(cid),
            }
            for b, sc, lab, name, cid in zip(
                prediction.boxes,
                prediction.scores,
                prediction.labels,
                prediction.category_names,
                prediction.category_ids,
            )
        ]
        raw = Path(out_dir) / f"{stem}.json"
        raw.parent.mkdir(parents=True, exist_ok=True)
        raw.write_text(
            json.dumps({"detections": dets, "score_threshold": prediction.score_threshold}, indent=1)
        )
        vis = Path(out_dir) / f"{stem}_vis.png"
        picture = draw_detections(
            np.asarray(image),
            prediction.boxes,
            prediction.labels,
            self.class_names,
            prediction.scores,
            prediction.masks,
            legend=True,
        )
        Image.fromarray(picture).save(vis)
        return [raw, vis]

    def finalize_predictions(self, out_dir: Path) -> None:
        self.save_predictions(out_dir)

    # -- evaluation ---------------------------------------------------------------------------------
    def on_eval_epoch_start(self) -> None:
        self._val_results = {}

    def eval_step(self, batch: dict[str, Any]) -> None:
        outs = self.detect(batch["image"])
        out_ids = self.result_category_ids
        for out, meta in zip(outs, batch["meta"]):
            h, w = meta["orig_size"]
            if tuple(out.get("masks", torch.empty(0, 1, h, w)).shape[-2:]) != (h, w):
                raise RuntimeError(f"masks of {meta['path']} are not at the original size {h}×{w}")
            if None in out_ids:  # an explicit category map left some model classes unmapped: drop them
                keep = torch.tensor([out_ids[int(i)] is not None for i in out["labels"]], dtype=torch.bool)
                out = {k: v[keep.to(v.device)] for k, v in out.items()}
            self._val_results[int(meta["image_id"])] = detections_to_coco(
                meta["image_id"],
                out["boxes"],
                out["scores"],
                out["labels"],
                [c if c is not None else -1 for c in out_ids],
                out.get("masks") if self.has_masks else None,
                self.mask_threshold,
            )

    # -- evaluating on other data: categories and protocol (tools/eval.py) -------------------------------
    @property
    def result_category_ids(self) -> list[int | None]:
        """Per contiguous label, the category id written to results (None: dropped); the model's own
        ids unless :meth:`set_category_map` mapped them onto another dataset's."""
        mapped = getattr(self, "_result_category_ids", None)
        return list(mapped) if mapped is not None else list(self.category_ids)

    def set_category_map(self, mapping: dict[Any, Any] | None) -> None:
        """Explicit ``{checkpoint category id: data category id}`` for data with other ids.

        Model classes left out of the mapping are not written to results (their detections are
        dropped, with a warning). Checked against the data by :meth:`bind_data`.
        """
        if mapping is None:
            self._category_mapping = None
            return
        try:
            pairs = {int(k): int(v) for k, v in dict(mapping).items()}
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"category_map must map checkpoint ids to data ids (integers), got {mapping!r}"
            ) from exc
        unknown = sorted(set(pairs) - set(self.category_ids))
        if unknown:
            raise ValueError(
                f"category_map keys {unknown} are not category ids of the checkpoint {self.category_ids}"
            )
        self._category_mapping = pairs

    def bind_data(self, datamodule: Any) -> None:
        """Refuse data whose categories (ids or names) differ from the checkpoint's, unless mapped.

        Results carry category ids through the checkpoint's label → id table, so a json with other
        ids, or the same ids naming other classes, would be scored against the wrong classes without
        any error. The check reads the categories of the json evaluated (``eval_category_map``), not
        the training json; a subset of the checkpoint's categories is a difference too (map the
        shared ids explicitly, e.g. ``category_map='{1: 1, 3: 3}'``).
        """
        cmap = getattr(datamodule, "eval_category_map", None) or getattr(datamodule, "category_map", None)
        if cmap is None:
            return
        data_ids = [int(c) for c in cmap.category_ids]
        source = getattr(datamodule, "val_ann", None) or getattr(datamodule, "root", "the data")
        mapping = getattr(self, "_category_mapping", None)
        if mapping is None:
            only_model = sorted(set(self.category_ids) - set(data_ids))
            only_data = sorted(set(data_ids) - set(self.category_ids))
            names = dict(zip(cmap.category_ids, cmap.names))
            renamed = [
                f"{c}: {n!r} in the checkpoint, {names[c]!r} in the data"
                for c, n in zip(self.category_ids, self.class_names)
                if c in names and names[c] != n
            ]
            if only_model or only_data or renamed:
                # suggest: same name first, else the same id, else the data id at the same position
                by_name = {n: c for c, n in names.items()}
                suggest = {
                    c: by_name.get(n, c if c in names else (data_ids[i] if i < len(data_ids) else None))
                    for i, (c, n) in enumerate(zip(self.category_ids, self.class_names))
                }
                example = ", ".join(f"{c}: {d}" for c, d in suggest.items() if d is not None)
                raise ValueError(
                    f"the checkpoint's categories differ from those of {source}: ids only in the checkpoint "
                    f"{only_model}, ids only in the data {only_data}, same id with another name "
                    f"{renamed or '[]'} (checkpoint {self.category_ids}, data {data_ids}). Map them "
                    f"explicitly (checkpoint id: data id), e.g. category_map='{{{example}}}'"
                )
            self._result_category_ids = None
            return
        bad = sorted({v for v in mapping.values()} - set(data_ids))
        if bad:
            raise ValueError(f"category_map values {bad} are not category ids of {source} ({data_ids})")
        self._result_category_ids = [mapping.get(c) for c in self.category_ids]
        dropped = [c for c in self.category_ids if c not in mapping]
        uncovered = sorted(set(data_ids) - set(mapping.values()))
        if dropped:
            self.warn_once(
                f"category_map leaves checkpoint categories {dropped} unmapped: their detections are dropped"
            )
        if uncovered:
            self.warn_once(
                f"no checkpoint category maps to data categories {uncovered}: they score as misses"
            )

    def set_test_protocol(self, name: str) -> None:
        """``vitdet`` (square pad to the training size) or ``long_side`` (pad to the divisibility)."""
        self.model.transform.set_test_protocol(name)

    def check_state_dict(self, state: dict[str, Any], prefix: str) -> None:
        """A checkpoint whose RPN head has another conv count than the rebuilt model: a named error.

        Checkpoints written before ``rpn_conv_depth`` existed have no such key and rebuild with
        torchvision's single conv, so they load as they were trained.
        """
        rpn = getattr(self.model, "rpn", None)
        if rpn is None:
            return
        head = f"{prefix}rpn.head.conv."
        depth = len({k[len(head) :].split(".")[0] for k in state if k.startswith(head)})
        built = len(rpn.head.conv)
        if depth and depth != built:
            raise ValueError(
                f"the checkpoint's RPN head has {depth} conv(s), the rebuilt model {built}: set "
                f"task.detector.rpn_conv_depth={depth} (ViTDet uses 2, torchvision and checkpoints "
                "written before the option 1)"
            )

    def metric_names(self) -> list[str]:
        iou_types = ("bbox", "segm") if self.has_masks else ("bbox",)
        return [f"{t}_{n}" for t in iou_types for n in STAT_NAMES]

    def eval_epoch_end(self, context: EvalContext) -> dict[str, float]:
        """COCO AP on rank 0 (broadcast to all ranks); ``coco_results.json`` into ``results_dir``."""
        results, image_ids = gather_results(self._val_results)
        self._val_results = {}
        metrics: dict[str, Any] | None = None
        if context.is_global_zero:
            iou_types = ("bbox", "segm") if self.has_masks else ("bbox",)
            metrics = evaluate_coco(
                ground_truth(context.dataset), results, iou_types, image_ids, self.evaluator
            )
            if self.save_results and context.results_dir is not None:
                write_coco_results(Path(context.results_dir) / "coco_results.json", results)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            box = [metrics]
            torch.distributed.broadcast_object_list(box, src=0)
            metrics = box[0]
        assert metrics is not None
        self.last_metrics = metrics
        self.last_results = results
        # undefined values (no ground truth of that size) are not logged; bbox_AP always is (monitor)
        loggable = {k: float(v) for k, v in metrics.items() if v is not None}
        loggable.setdefault("bbox_AP", 0.0)
        return loggable

    @rank_zero_only
    def save_predictions(self, out_dir: str | Path) -> Path:
        """``coco_results.json`` of the last evaluation (COCO results format) into ``out_dir``."""
        return write_coco_results(Path(out_dir) / "coco_results.json", self.last_results)

    # -- reporting ----------------------------------------------------------------------------------
    def summarize(self, metrics: dict[str, Any]) -> str:
        """One line per IoU type; undefined values print as ``null``, as metrics.json writes them."""
        lines = []
        for prefix in ("bbox", "segm"):
            if not any(f"{prefix}_{k}" in metrics for k in METRIC_KEYS):
                continue
            vals = [metrics.get(f"{prefix}_{k}") for k in METRIC_KEYS]
            cells = "  ".join(
                f"{k} {' null' if v is None else f'{100 * v:5.1f}'}" for k, v in zip(METRIC_KEYS, vals)
            )
            lines.append(f"{prefix}: {cells}")
        return "\n".join(lines)

    def save_visualization(self, datamodule: Any, path: Path, num: int) -> Path | None:
        from siglip_dense.visualize import save_detection_grid

        return save_detection_grid(self, datamodule, path, num)

    def meta(self) -> dict[str, Any]:
        return {
            "class_names": list(self.class_names),
            "num_classes": self.num_classes,
            "category_ids": list(self.category_ids),
            "label_to_category_id": {str(i): c for i, c in enumerate(self.category_ids)},
            "detector": self.model.kind,
        }


@contextlib.contextmanager
def detector_score_threshold(model: torch.nn.Module, threshold: float) -> Iterator[None]:
    """Set a torchvision detector's score threshold for the ``with`` block, then restore it.

    R-CNNs hold it in ``roi_heads.score_thresh`` (``box_score_thresh``), RetinaNet and FCOS in
    ``score_thresh``; both keep detections with score > threshold.
    """
    owner = getattr(model, "roi_heads", None)
    if owner is None or not hasattr(owner, "score_thresh"):
        owner = model
    if not hasattr(owner, "score_thresh"):
        raise AttributeError(f"{type(model).__name__} has no score threshold to set")
    before = owner.score_thresh
    owner.score_thresh = float(threshold)
    try:
        yield
    finally:
        owner.score_thresh = before


def image_size_pair(image_size: int | list[int]) -> list[int]:
    return [int(image_size)] * 2 if isinstance(image_size, int) else [int(s) for s in image_size]


def ground_truth(dataset: Any) -> Any:
    """The evaluation split's pycocotools COCO (the dataset keeps it; any COCO json works).

    Raises:
        RuntimeError: the evaluation data is not a COCO dataset.
    """
    coco = getattr(dataset, "coco", None)
    if coco is None:
        raise RuntimeError("detection evaluation needs a COCO dataset (with .coco) behind the val loader")
    return coco


class DetectionTask(DenseModule):
    """Detection / instance segmentation as a one-task :class:`~siglip_dense.tasks.module.DenseModule`.

    The constructor arguments are the ``task`` config's keys (``configs/task/det_*.yaml``).
    """

    task_name = "detection"
    component_class = DetectionComponent

    @classmethod
    def option_keys(cls) -> dict[str, set[str]]:
        """The keys of the dict options (see ``config_check.option_keys_of``)."""
        return {"detector": detector_option_keys()}

    def __init__(
        self,
        backbone: dict[str, Any],
        neck: dict[str, Any],
        detector: dict[str, Any],
        num_classes: int,
        class_names: list[str] | None = None,
        category_ids: list[int] | None = None,
        image_size: int | list[int] = 1024,
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        layer_decay: float = 1.0,
        freeze_backbone: bool = False,
        evaluator: str = "pycocotools",
        save_results: bool = True,
        mask_threshold: float = 0.5,
        vis_score_threshold: float = 0.5,
        init_from: str | None = None,
        init_from_filter: str = "all",
    ) -> None:
        super().__init__(backbone, optimizer, scheduler, layer_decay, freeze_backbone)
        self.save_hyperparameters()
        component = DetectionComponent.build(
            self.build_backbone(backbone),
            neck,
            detector,
            num_classes,
            class_names,
            category_ids,
            image_size,
            evaluator,
            save_results,
            mask_threshold,
            vis_score_threshold,
        )
        self.attach({self.task_name: component})
        self.finish_init(freeze_backbone, init_from, init_from_filter)

    # evaluation on other data (tools/eval.py): the detection options
    def set_category_map(self, mapping: dict[Any, Any] | None) -> None:
        self.components[self.task_name].set_category_map(mapping)

    def set_test_protocol(self, name: str) -> None:
        self.components[self.task_name].set_test_protocol(name)


__all__ = ["DetectionComponent", "DetectionTask", "detector_option_keys", "detector_score_threshold"]
