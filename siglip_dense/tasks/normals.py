"""Surface normals: linear probe or DPT on a SigLIP 2 backbone, angular loss, NYUv2 normal metrics.

Loss (on valid pixels only, those whose ground-truth vector has norm ≥ ``min_norm``):

- ``angular`` (default): the angle itself, ``arccos(clamp(cos, −1 + ε, 1 − ε))`` in radians — the
  "AL" loss of Bae et al., *Estimating and Exploiting the Aleatoric Uncertainty in Surface Normal
  Estimation* (ICCV 2021, §3.3), used by the Probe3D probes (El Banani et al., CVPR 2024). The clamp
  keeps the gradient finite at 0° and 180° (d arccos/dx = −1/sqrt(1 − x²)).
- ``cosine``: ``1 − cos`` (the dot-product loss of Eigen & Fergus, ICCV 2015, up to a constant).

Predictions are unit vectors (L2-normalised per pixel by the model); the cosine is their dot product
with the (unit) ground truth. Evaluation runs at ground-truth resolution, whole image, optional
horizontal-flip TTA that mirrors the flipped prediction's x component back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from siglip_dense.config_check import check_option_keys
from siglip_dense.data.normals import encode_normals
from siglip_dense.evaluation.normal_metrics import NORMAL_METRIC_KEYS, NormalMetric, format_normal_table
from siglip_dense.models.backbone import SigLIP2Backbone
from siglip_dense.models.heads.normals import NormalsModel, normalize_normals
from siglip_dense.predict import NormalsPrediction
from siglip_dense.tasks.component import EvalContext, TaskComponent
from siglip_dense.tasks.module import DenseModule

LOSS_TYPES = ("angular", "cosine")
DEFAULT_LOSS = {"type": "angular", "eps": 1e-6}
DEFAULT_EVAL = {"flip": False}
# tools/eval.py tta=<preset> (the segmentation task's names; normals have no multi-scale preset)
TTA_PRESETS: dict[str, dict[str, Any]] = {"none": {"flip": False}, "flip": {"flip": True}}
OPTION_KEYS = {"eval": set(DEFAULT_EVAL), "loss": set(DEFAULT_LOSS)}


def valid_mask(target: torch.Tensor, min_norm: float = 0.5) -> torch.Tensor:
    """B×H×W: ground-truth vectors (B×3×H×W) with finite norm ≥ ``min_norm``."""
    norm = torch.linalg.vector_norm(target.float(), dim=1)
    return torch.isfinite(norm) & (norm >= min_norm)


def normal_loss(
    pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, kind: str = "angular", eps: float = 1e-6
) -> torch.Tensor:
    """Mean angular (radians) or ``1 − cos`` loss over the valid pixels of a B×3×H×W batch, float32.

    Raises:
        ValueError: an unknown ``kind``.
    """
    if kind not in LOSS_TYPES:
        raise ValueError(f"unknown normals loss {kind!r}: use one of {LOSS_TYPES}")
    cos = (F.normalize(pred.float(), dim=1) * F.normalize(target.float(), dim=1)).sum(dim=1)[valid]
    if cos.numel() == 0:
        return pred.sum() * 0.0
    if kind == "cosine":
        return (1.0 - cos).mean()
    return torch.acos(cos.clamp(-1.0 + eps, 1.0 - eps)).mean()


def flip_normals(normals: torch.Tensor) -> torch.Tensor:
    """Horizontal flip of a …×3×H×W normal map: pixels mirrored and the x component negated."""
    out = normals.flip(-1).clone()
    out[..., 0, :, :] = -out[..., 0, :, :]
    return out


def normals_to_rgb(normals: np.ndarray) -> np.ndarray:
    """H×W×3 normals → uint8 RGB for pictures: the dataset's own encoding (invalid = grey)."""
    return encode_normals(normals)


class NormalsComponent(TaskComponent):
    """Angular-loss training and NYUv2 normal metrics (pooled over pixels, exact across DDP ranks).

    ``model`` is a :class:`~siglip_dense.models.heads.normals.NormalsModel`.
    """

    kind = "normals"

    def __init__(
        self,
        model: NormalsModel,
        min_norm: float | None = None,
        loss: dict[str, Any] | None = None,
        eval: dict[str, Any] | None = None,  # noqa: A002 - the config key users write
    ) -> None:
        super().__init__(model)
        for name, options in (("eval", eval), ("loss", loss)):
            check_option_keys(options, OPTION_KEYS[name], name, "NormalsTask")
        self.min_norm = float(min_norm) if min_norm is not None else 0.5
        self.loss_cfg = {**DEFAULT_LOSS, **(loss or {})}
        if self.loss_cfg["type"] not in LOSS_TYPES:
            raise ValueError(f"task.loss.type={self.loss_cfg['type']!r}: use one of {LOSS_TYPES}")
        self.eval_cfg = {**DEFAULT_EVAL, **(eval or {})}
        self.val_metric = NormalMetric(self.min_norm)

    @classmethod
    def build(
        cls,
        backbone: SigLIP2Backbone,
        head: dict[str, Any],
        neck: dict[str, Any] | None = None,
        min_norm: float | None = None,
        loss: dict[str, Any] | None = None,
        eval: dict[str, Any] | None = None,  # noqa: A002
        out_keys: list[str] | None = None,
    ) -> NormalsComponent:
        """Neck and head from their configs on ``backbone`` (whose maps ``out_keys`` this task reads)."""
        keys = list(out_keys) if out_keys is not None else list(backbone.out_keys)
        neck_module = None
        if neck:
            neck_cfg = dict(neck)
            if "in_keys" in neck_cfg and neck_cfg["in_keys"] is None:
                neck_cfg["in_keys"] = keys
            neck_module = instantiate(
                neck_cfg, in_channels=backbone.embed_dim, in_stride=backbone.patch_size, _convert_="all"
            )
        head_cfg = dict(head)
        head_cfg.setdefault("in_channels", neck_module.out_channels if neck_module else backbone.embed_dim)
        if head_cfg.get("in_keys") is None:
            head_cfg["in_keys"] = list(neck_module.strides) if neck_module else keys
        if str(head_cfg.get("_target_", "")).endswith("DPTNormalsHead"):
            if neck_module is not None:
                raise ValueError("DPTNormalsHead reassembles the backbone's block maps itself: use neck=none")
            head_cfg.setdefault("patch_size", backbone.patch_size)
        model = NormalsModel(backbone, instantiate(head_cfg, _convert_="all"), neck_module)
        return cls(model, min_norm, loss, eval)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """B×3×H×W normalised images → B×3×H×W unit normals."""
        return self.model(images)["normals"]

    # -- training -----------------------------------------------------------------------------------
    def compute_loss(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """``pred`` and ``target`` B×3×H×W (target 0 = invalid)."""
        valid = valid_mask(target, self.min_norm)
        loss = normal_loss(pred, target, valid, str(self.loss_cfg["type"]), float(self.loss_cfg["eps"]))
        return {"loss_normal": loss, "loss": loss}

    def check_batch(self, batch: dict[str, Any]) -> None:
        """Warn (on the host) about a training batch without any valid normal."""
        if not valid_mask(batch["normals"], self.min_norm).any():
            names = [m.get("normals_path", "?") for m in batch.get("meta", [])][:4]
            self.warn_once(f"a training batch has no valid normal (e.g. {names}): its loss is 0")

    def losses(self, batch: dict[str, Any], out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.compute_loss(out["normals"], batch["normals"])

    # -- evaluation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def infer(self, image: torch.Tensor) -> torch.Tensor:
        """Unit normals B×3×H×W at the input size (with ``eval.flip``: averaged with the mirrored flip)."""
        pred = self(image).float()
        if self.eval_cfg.get("flip"):
            pred = normalize_normals(pred + flip_normals(self(image.flip(-1)).float()))
        return pred

    def eval_step(self, batch: dict[str, Any]) -> None:
        images, targets = batch["image"], batch["normals"]
        if isinstance(images, torch.Tensor):
            images, targets = list(images), list(targets)
        metas = batch.get("meta") or [{} for _ in images]
        for image, target, meta in zip(images, targets, metas):
            pred = self.infer(image[None].to(self.device))
            target = target[None].to(self.device)
            if pred.shape[-2:] != target.shape[-2:]:
                pred = normalize_normals(F.interpolate(pred, size=target.shape[-2:], mode="bilinear"))
            self.val_metric.update(pred, target)
            if self.predictions_dir is not None:
                self.write_prediction(pred, meta)

    def write_prediction(self, pred: torch.Tensor, meta: dict[str, Any]) -> Path:
        """``predictions/<stem>.npy``: float32 H×W×3 unit normals at ground-truth resolution."""
        path = Path(self.predictions_dir) / f"{meta.get('stem', 'image')}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, pred[0].permute(1, 2, 0).float().cpu().numpy().astype(np.float32))
        return path

    def metric_names(self) -> list[str]:
        return list(NORMAL_METRIC_KEYS)

    def set_tta(self, tta: str | dict[str, Any]) -> None:
        """``tta=none|flip`` (presets, as the segmentation task names them) or a dict of eval keys
        (``{flip: true}``).

        Raises:
            ValueError: an unknown preset or key (the message lists the known ones).
        """
        if isinstance(tta, str):
            if tta not in TTA_PRESETS:
                raise ValueError(f"unknown normals tta preset {tta!r}; known: {sorted(TTA_PRESETS)}")
            tta = TTA_PRESETS[tta]
        unknown = set(tta) - set(DEFAULT_EVAL)
        if unknown:
            raise ValueError(f"unknown normals tta keys {sorted(unknown)}; known: {sorted(DEFAULT_EVAL)}")
        self.eval_cfg = {**self.eval_cfg, **{k: bool(v) for k, v in tta.items()}}

    def eval_epoch_end(self, context: EvalContext) -> dict[str, float]:
        metrics = self.val_metric.compute()
        num_images, num_empty = int(metrics.pop("num_images")), int(metrics.pop("num_empty"))
        self.val_metric.reset()
        if num_empty:
            self.warn_once(f"{num_empty} evaluation images had no valid normal and were skipped")
        self.last_metrics = {k: float(metrics[k]) for k in NORMAL_METRIC_KEYS}
        self.last_metrics.update(num_images=num_images, num_empty=num_empty)
        return {k: float(v) for k, v in metrics.items()}

    # -- inference and results ------------------------------------------------------------------------
    def _normalized(self, image: Any) -> torch.Tensor:
        """An RGB image, H×W×3 uint8 (numpy / tensor) or 3×H×W float in [0, 1] → 1×3×H×W normalised.

        Raises:
            ValueError: any other shape.
        """
        t = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image)
        if t.ndim == 3 and t.shape[-1] == 3 and t.shape[0] != 3:
            t = t.permute(2, 0, 1)
        if t.ndim != 3 or t.shape[0] != 3:
            raise ValueError(f"expected an RGB image (H×W×3 or 3×H×W), got shape {tuple(t.shape)}")
        t = t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return ((t - mean) / std)[None].to(self.device)

    @torch.no_grad()
    def predict(self, images: list[Any]) -> list[NormalsPrediction]:
        """One :class:`~siglip_dense.predict.NormalsPrediction` (H×W×3 float32 unit normals, camera
        frame of the training data) per RGB image (H×W×3 uint8, or 3×H×W float in [0, 1] as
        ``siglip_dense.predict.to_rgb_images`` gives them)."""
        return [
            NormalsPrediction(self.infer(self._normalized(x))[0].permute(1, 2, 0).float().cpu().numpy())
            for x in images
        ]

    def write_outputs(self, image: Any, prediction: Any, out_dir: Path, stem: str) -> list[Path]:
        """tools/predict.py: ``<stem>.npy`` (H×W×3 unit normals) + ``<stem>_vis.png`` (image | normals as RGB)."""
        from PIL import Image

        out_dir.mkdir(parents=True, exist_ok=True)
        raw = out_dir / f"{stem}.npy"
        np.save(raw, np.asarray(prediction, dtype=np.float32))
        vis = out_dir / f"{stem}_vis.png"
        normals = np.asarray(prediction, dtype=np.float32)
        Image.fromarray(np.concatenate([np.asarray(image), normals_to_rgb(normals)], axis=1)).save(vis)
        return [raw, vis]

    def summarize(self, metrics: dict[str, Any]) -> str:
        return format_normal_table(metrics)

    def save_visualization(self, datamodule: Any, path: Path, num: int) -> Path | None:
        """Rows of [image | ground truth | prediction], normals coloured as RGB (invalid: grey)."""
        from PIL import Image

        from siglip_dense.visualize import denormalize

        ds = getattr(datamodule, "val_dataset", None)
        if ds is None:
            datamodule.setup("validate")
            ds = datamodule.val_dataset
        self.eval()
        rows = []
        for i in range(min(num, len(ds))):
            sample = ds[i]
            pred = self.infer(sample["image"][None].to(self.device))[0].permute(1, 2, 0).cpu().numpy()
            gt = sample["normals"].permute(1, 2, 0).cpu().numpy()
            rgb = denormalize(sample["image"], self.mean, self.std)
            rows.append(np.concatenate([rgb, normals_to_rgb(gt), normals_to_rgb(pred)], axis=1))
        if not rows:
            return None
        width = max(r.shape[1] for r in rows)
        rows = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0))) for r in rows]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.concatenate(rows, axis=0)).save(path)
        return path

    # -- checkpoints --------------------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        return {"min_norm": self.min_norm}

    def update_hparams(self, hparams: dict[str, Any]) -> None:
        hparams.update(self.meta())


class NormalsTask(DenseModule):
    """Surface normals as a one-task :class:`~siglip_dense.tasks.module.DenseModule`.

    The constructor arguments are the ``task`` config's keys (``configs/task/normals_*.yaml``).
    """

    task_name = "normals"
    component_class = NormalsComponent

    @classmethod
    def option_keys(cls) -> dict[str, set[str]]:
        """The keys of the dict options (see ``config_check.option_keys_of``)."""
        return dict(OPTION_KEYS)

    def __init__(
        self,
        backbone: dict[str, Any],
        head: dict[str, Any],
        neck: dict[str, Any] | None = None,
        min_norm: float | None = None,
        loss: dict[str, Any] | None = None,
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        layer_decay: float = 1.0,
        freeze_backbone: bool = False,
        eval: dict[str, Any] | None = None,  # noqa: A002 - the config key users write
        init_from: str | None = None,
        init_from_filter: str = "all",
    ) -> None:
        super().__init__(backbone, optimizer, scheduler, layer_decay, freeze_backbone)
        self.save_hyperparameters()
        component = NormalsComponent.build(self.build_backbone(backbone), head, neck, min_norm, loss, eval)
        self.attach({self.task_name: component})
        self.finish_init(freeze_backbone, init_from, init_from_filter)


__all__ = [
    "NormalsComponent",
    "NormalsTask",
    "flip_normals",
    "normal_loss",
    "normals_to_rgb",
    "valid_mask",
]
