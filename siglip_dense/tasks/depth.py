"""Monocular metric depth: DPT or the linear-bins probe on a SigLIP 2 backbone, SILog training,
NYUv2-protocol evaluation (per-image metrics at GT resolution, Eigen crop, valid range, clipping)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from siglip_dense.config_check import check_option_keys
from siglip_dense.evaluation.depth_metrics import DEPTH_METRIC_KEYS, DepthMetric, format_depth_table
from siglip_dense.models.backbone import SigLIP2Backbone
from siglip_dense.models.heads.depth import DepthModel
from siglip_dense.tasks.component import EvalContext, TaskComponent
from siglip_dense.tasks.module import DenseModule

if TYPE_CHECKING:
    from siglip_dense.predict import DepthPrediction

DEFAULT_LOSS = {"variance_focus": 0.85, "scale": 10.0, "eps": 1e-6, "grad_weight": 0.0, "grad_scales": 4}
DEFAULT_EVAL = {"short_side": None, "max_long_side": None, "flip": False}
OPTION_KEYS = {"eval": set(DEFAULT_EVAL), "loss": set(DEFAULT_LOSS)}


def silog_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor,
    variance_focus: float = 0.85,
    scale: float = 10.0,
    eps: float = 1e-6,
) -> torch.Tensor:
    """BTS / AdaBins scale-invariant log loss: ``scale · sqrt(mean(d²) − λ·mean(d)² + eps)``.

    ``d = log pred − log target`` over valid pixels of the whole batch, in float32 (bf16 logs lose the
    differences the loss is made of). ``eps`` inside the root keeps the gradient finite at d ≡ 0.
    """
    pred, target = pred.float(), target.float()
    d = torch.log(pred[valid].clamp_min(1e-6)) - torch.log(target[valid])
    if d.numel() == 0:
        return pred.sum() * 0.0
    value = (d**2).mean() - variance_focus * d.mean() ** 2
    return scale * torch.sqrt(value.clamp_min(0.0) + eps)


def gradient_loss(
    pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, scales: int = 4
) -> torch.Tensor:
    """Multi-scale gradient matching on log depth (MegaDepth / MiDaS): L1 of the x/y gradients of
    ``log pred − log target`` where both neighbours are valid, at ``scales`` dyadic subsamplings."""
    r = torch.where(
        valid, torch.log(pred.float().clamp_min(1e-6)) - torch.log(target.float().clamp_min(1e-6)), 0
    )
    m = valid.float()
    # scales without a valid neighbour pair are left out of the mean, decided on the device (no sync)
    total, count = pred.new_zeros((), dtype=torch.float32), pred.new_zeros((), dtype=torch.float32)
    for k in range(int(scales)):
        step = 2**k
        rs, ms = r[..., ::step, ::step], m[..., ::step, ::step]
        if rs.shape[-1] < 2 or rs.shape[-2] < 2:
            break
        mx = ms[..., :, 1:] * ms[..., :, :-1]
        my = ms[..., 1:, :] * ms[..., :-1, :]
        gx = (rs[..., :, 1:] - rs[..., :, :-1]).abs() * mx
        gy = (rs[..., 1:, :] - rs[..., :-1, :]).abs() * my
        n = mx.sum() + my.sum()
        total = total + (gx.sum() + gy.sum()) / n.clamp_min(1.0)  # 0 where n = 0
        count = count + (n > 0).float()
    return total / count.clamp_min(1.0)


class DepthComponent(TaskComponent):
    """SILog (+ optional gradient) training; NYUv2 / KITTI metrics, averaged over images, DDP-synced.

    ``model`` is a :class:`~siglip_dense.models.heads.depth.DepthModel` (backbone → (neck →) head).
    """

    kind = "depth"

    def __init__(
        self,
        model: DepthModel,
        min_depth: float | None = None,
        max_depth: float | None = None,
        eval_crop: str | None = None,
        loss: dict[str, Any] | None = None,
        eval: dict[str, Any] | None = None,  # noqa: A002 - the config key users write
    ) -> None:
        super().__init__(model)
        self.min_depth, self.max_depth, self.eval_crop = depth_range(min_depth, max_depth, eval_crop)
        for name, options in (("eval", eval), ("loss", loss)):
            check_option_keys(options, OPTION_KEYS[name], name, "DepthTask")
        self.loss_cfg = {**DEFAULT_LOSS, **(loss or {})}
        self.eval_cfg = {**DEFAULT_EVAL, **(eval or {})}
        self.val_metric = DepthMetric(self.min_depth, self.max_depth, self.eval_crop)

    @classmethod
    def build(
        cls,
        backbone: SigLIP2Backbone,
        head: dict[str, Any],
        neck: dict[str, Any] | None = None,
        min_depth: float | None = None,
        max_depth: float | None = None,
        eval_crop: str | None = None,
        loss: dict[str, Any] | None = None,
        eval: dict[str, Any] | None = None,  # noqa: A002
        out_keys: list[str] | None = None,
    ) -> DepthComponent:
        """Neck and head from their configs on ``backbone`` (whose maps ``out_keys`` this task reads)."""
        keys = list(out_keys) if out_keys is not None else list(backbone.out_keys)
        lo, hi, _ = depth_range(min_depth, max_depth, eval_crop)
        neck_module = None
        if neck:
            neck_cfg = dict(neck)
            if "in_keys" in neck_cfg and neck_cfg["in_keys"] is None:
                neck_cfg["in_keys"] = keys
            neck_module = instantiate(
                neck_cfg, in_channels=backbone.embed_dim, in_stride=backbone.patch_size, _convert_="all"
            )
        head_cfg = dict(head)
        if neck_module is not None:
            head_cfg.setdefault("in_channels", neck_module.out_channels)
            if head_cfg.get("in_keys") is None:
                head_cfg["in_keys"] = list(neck_module.strides)
        else:
            head_cfg.setdefault("in_channels", backbone.embed_dim)
            if head_cfg.get("in_keys") is None:
                head_cfg["in_keys"] = keys
        target = str(head_cfg.get("_target_", ""))
        if target.endswith("DPTHead"):
            if neck_module is not None:
                raise ValueError("DPTHead reassembles the backbone's block maps itself: use neck=none")
            head_cfg.setdefault("patch_size", backbone.patch_size)
        head_module = instantiate(head_cfg, min_depth=lo, max_depth=hi, _convert_="all")
        model = DepthModel(backbone, head_module, neck_module)
        return cls(model, min_depth, max_depth, eval_crop, loss, eval)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """B×3×H×W normalised images → B×1×H×W depth in metres."""
        return self.model(images)["depth"]

    # -- training -----------------------------------------------------------------------------------
    def valid_mask(self, target: torch.Tensor) -> torch.Tensor:
        return torch.isfinite(target) & (target > self.min_depth) & (target < self.max_depth)

    def compute_loss(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """``pred`` B×1×H×W, ``target`` B×H×W metres (0 = invalid)."""
        pred = pred[:, 0] if pred.ndim == 4 else pred
        valid = self.valid_mask(target)
        cfg = self.loss_cfg
        losses = {
            "loss_silog": silog_loss(
                pred, target, valid, float(cfg["variance_focus"]), float(cfg["scale"]), float(cfg["eps"])
            )
        }
        if float(cfg["grad_weight"]) > 0:
            losses["loss_grad"] = float(cfg["grad_weight"]) * gradient_loss(
                pred, target, valid, int(cfg["grad_scales"])
            )
        losses["loss"] = sum(losses.values())
        return losses

    def check_batch(self, batch: dict[str, Any]) -> None:
        """Warn (on the host, before the transfer) about a batch without any valid depth pixel."""
        if not self.valid_mask(batch["depth"].float()).any():
            names = [m.get("depth_path", "?") for m in batch.get("meta", [])][:4]
            self.warn_once(f"a training batch has no valid depth pixel (e.g. {names}): its loss is 0")

    def losses(self, batch: dict[str, Any], out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.compute_loss(out["depth"], batch["depth"].float())

    # -- evaluation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def infer(self, image: torch.Tensor) -> torch.Tensor:
        """Depth B×1×H×W at the input size, by the configured protocol (optional resize and flip)."""
        h, w = image.shape[-2:]
        x = image
        short, long_max = self.eval_cfg.get("short_side"), self.eval_cfg.get("max_long_side")
        if short or long_max:
            scale = min(
                float(short) / min(h, w) if short else math.inf,
                float(long_max) / max(h, w) if long_max else math.inf,
            )
            size = (max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5)))
            if size != (h, w):
                x = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        pred = self(x).float()
        if self.eval_cfg.get("flip"):
            pred = 0.5 * (pred + self(x.flip(-1)).float().flip(-1))
        if pred.shape[-2:] != (h, w):
            pred = F.interpolate(pred, size=(h, w), mode="bilinear", align_corners=False)
        return pred.clamp(self.min_depth, self.max_depth)

    @torch.no_grad()
    def predict_depth(self, image: torch.Tensor) -> torch.Tensor:
        """B×H×W depth in metres, clipped to the valid range (what metrics and pictures use)."""
        return self.infer(image)[:, 0]

    def eval_step(self, batch: dict[str, Any]) -> None:
        images, depths = batch["image"], batch["depth"]
        if isinstance(images, torch.Tensor):
            images, depths = list(images), list(depths)
        metas = batch.get("meta") or [{} for _ in images]
        for image, depth, meta in zip(images, depths, metas):
            pred = self.infer(image[None].to(self.device))
            self.val_metric.update(pred, depth[None].to(self.device))
            if self.predictions_dir is not None:
                self.write_prediction(pred, depth.shape[-2:], meta)

    def write_prediction(self, pred: torch.Tensor, gt_size: Any, meta: dict[str, Any]) -> Path:
        """``predictions/<stem>.npy``: float32 metres at ground-truth resolution (what metrics saw)."""
        import numpy as np

        if tuple(pred.shape[-2:]) != tuple(gt_size):
            pred = F.interpolate(pred, size=tuple(gt_size), mode="bilinear", align_corners=False)
        path = Path(self.predictions_dir) / f"{meta.get('stem', 'image')}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, pred[0, 0].float().cpu().numpy().astype(np.float32))
        return path

    @torch.no_grad()
    def predict(self, images: Any) -> list[DepthPrediction]:
        """One :class:`~siglip_dense.predict.DepthPrediction` per image (any input
        :func:`~siglip_dense.predict.to_rgb_images` accepts): H×W float32 metres at the image's size,
        clipped to ``[min_depth, max_depth]``."""
        from siglip_dense.predict import DepthPrediction, normalize, to_rgb_images

        out = []
        for rgb in to_rgb_images(images)[0]:
            x = normalize(rgb, self.mean, self.std, self.device)
            depth = self.predict_depth(x)[0].float().cpu().numpy().astype("float32")
            out.append(DepthPrediction(depth, float(self.min_depth), float(self.max_depth)))
        return out

    def write_outputs(self, image: Any, prediction: Any, out_dir: Path, stem: str) -> list[Path]:
        """tools/predict.py: ``<stem>.npy`` metres + ``<stem>_vis.png`` (colour map and scale bar)."""
        import numpy as np
        from PIL import Image

        from siglip_dense.visualize import colorize_depth, depth_scale_bar

        prediction = np.asarray(prediction, dtype=np.float32)
        raw = Path(out_dir) / f"{stem}.npy"
        raw.parent.mkdir(parents=True, exist_ok=True)
        np.save(raw, prediction)
        vmax = float(np.nanmax(prediction)) if np.size(prediction) else self.max_depth
        panel = np.concatenate([np.asarray(image), colorize_depth(prediction, 0.0, vmax)], axis=1)
        bar = depth_scale_bar(panel.shape[1], 0.0, vmax)
        canvas = Image.new("RGB", (panel.shape[1], panel.shape[0] + bar.height), (255, 255, 255))
        canvas.paste(Image.fromarray(panel), (0, 0))
        canvas.paste(bar, (0, panel.shape[0]))
        vis = Path(out_dir) / f"{stem}_vis.png"
        canvas.save(vis)
        return [raw, vis]

    def metric_names(self) -> list[str]:
        return list(DEPTH_METRIC_KEYS)

    def eval_epoch_end(self, context: EvalContext) -> dict[str, float]:
        metrics = self.val_metric.compute()
        num_images, num_empty = int(metrics.pop("num_images")), int(metrics.pop("num_empty"))
        self.val_metric.reset()
        if num_empty:
            self.warn_once(f"{num_empty} evaluation images had no valid depth pixel and were skipped")
        self.last_metrics = {k: float(metrics[k]) for k in DEPTH_METRIC_KEYS}
        self.last_metrics.update(num_images=num_images, num_empty=num_empty)
        return dict(metrics)

    # -- results ------------------------------------------------------------------------------------
    def summarize(self, metrics: dict[str, Any]) -> str:
        return format_depth_table(metrics)

    def save_visualization(self, datamodule: Any, path: Path, num: int) -> Path | None:
        from siglip_dense.visualize import save_depth_grid

        return save_depth_grid(self, datamodule, path, num)

    def meta(self) -> dict[str, Any]:
        # the protocol the weights were trained for travels with them (a reload must not fall back
        # to NYUv2 defaults for a KITTI model)
        return {"min_depth": self.min_depth, "max_depth": self.max_depth, "eval_crop": self.eval_crop}

    def update_hparams(self, hparams: dict[str, Any]) -> None:
        hparams.update(self.meta())


def depth_range(
    min_depth: float | None, max_depth: float | None, eval_crop: str | None
) -> tuple[float, float, str]:
    """The data decides the protocol (train.py passes datamodule.task_kwargs()); NYUv2 otherwise.

    Raises:
        ValueError: not ``0 < min_depth < max_depth``.
    """
    lo = float(min_depth) if min_depth is not None else 1e-3
    hi = float(max_depth) if max_depth is not None else 10.0
    if not 0 < lo < hi:
        raise ValueError(f"need 0 < min_depth < max_depth, got {lo}, {hi}")
    return lo, hi, str(eval_crop) if eval_crop is not None else "eigen"


class DepthTask(DenseModule):
    """Monocular depth as a one-task :class:`~siglip_dense.tasks.module.DenseModule`.

    The constructor arguments are the ``task`` config's keys (``configs/task/depth_*.yaml``).
    """

    task_name = "depth"
    component_class = DepthComponent

    @classmethod
    def option_keys(cls) -> dict[str, set[str]]:
        """The keys of the dict options (see ``config_check.option_keys_of``)."""
        return dict(OPTION_KEYS)

    def __init__(
        self,
        backbone: dict[str, Any],
        head: dict[str, Any],
        neck: dict[str, Any] | None = None,
        min_depth: float | None = None,
        max_depth: float | None = None,
        eval_crop: str | None = None,
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
        component = DepthComponent.build(
            self.build_backbone(backbone), head, neck, min_depth, max_depth, eval_crop, loss, eval
        )
        self.attach({self.task_name: component})
        self.finish_init(freeze_backbone, init_from, init_from_filter)


__all__ = ["DEFAULT_EVAL", "DEFAULT_LOSS", "DepthComponent", "DepthTask", "gradient_loss", "silog_loss"]
