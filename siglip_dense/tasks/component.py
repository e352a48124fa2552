"""What one task adds to the shared backbone: network (neck + head), loss and evaluator.

A :class:`TaskComponent` is a plain ``nn.Module`` (no Lightning inside). Its ``model`` is the task's
network (``Segmentor``, ``DepthModel``, a torchvision detector), whose backbone slot holds the
SigLIP backbone the :class:`~siglip_dense.tasks.module.DenseModule` owns (shared by all tasks of a
multi-task run). The component implements:

- training: :meth:`check_batch` (host-side, before the device transfer), :meth:`losses` from the
  network's outputs (a dict whose ``"loss"`` is the total), :meth:`training_losses` (own forward);
  tasks that can share one backbone pass with others (``shares_backbone_pass``) also
  :meth:`pad_input` / :meth:`decode`;
- evaluation: :meth:`on_eval_epoch_start`, :meth:`eval_step` (one loader batch; the inference
  protocol: slide / TTA / NaFlex), :meth:`eval_epoch_end` (metrics, keys without ``val/``),
  prediction files in the dataset's convention (``predictions_dir``), :meth:`finalize_predictions`;
- inference and results: :meth:`predict`, :meth:`write_outputs`, :meth:`summarize`,
  :meth:`save_visualization`; binding to other data (:meth:`bind_data`, :meth:`set_tta`);
- checkpoints: :meth:`meta` (its part of ``checkpoint["siglip_dense"]``), :meth:`load_meta`,
  :meth:`update_hparams`, :meth:`check_state_dict`.

Logging, optimisation, checkpoints and the trainer belong to the DenseModule: a component returns
values (losses, metrics) and the module logs them under ``train/`` / ``val/`` (single task) or
``train/<task>/`` / ``val/<task>/`` (multi-task).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from siglip_dense.models.backbone import SigLIP2Backbone


@dataclass
class EvalContext:
    """What an evaluator needs from the run at the end of an epoch.

    ``dataset``: the evaluation loader's dataset (detection reads its COCO ground truth);
    ``results_dir``: where whole-set result files go (None: none written).
    """

    is_global_zero: bool = True
    results_dir: Path | None = None
    dataset: Any = None


class TaskComponent(nn.Module):
    """Base class: one task's network + loss + evaluator over a backbone owned elsewhere."""

    # the task name stored in checkpoints (``siglip_dense.task`` / ``siglip_dense.tasks.<name>.task``)
    kind: str = "base"
    # where ``model`` holds the SigLIP backbone and the neck (layer decay, init_from filters, compile)
    backbone_path: str = "backbone"
    neck_path: str = "neck"
    # whether its images can join other tasks' in one backbone pass (fixed-size padded batches)
    shares_backbone_pass: bool = True
    # whether its validation metrics go to the progress bar
    log_prog_bar: bool = True

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        # the data config it was trained with (checkpoints; tools/predict.py's label convention)
        self.data_config: dict[str, Any] | None = None
        # set by tools/eval.py: write predictions in the dataset's own convention here
        self.predictions_dir: Path | None = None
        self.last_metrics: dict[str, Any] = {}

    # -- the shared backbone --------------------------------------------------------------------
    @property
    def backbone(self) -> SigLIP2Backbone:
        return self.model.get_submodule(self.backbone_path)

    def set_backbone(self, backbone: SigLIP2Backbone) -> None:
        """Make ``model`` use ``backbone`` (the module the DenseModule owns)."""
        parent, _, leaf = self.backbone_path.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, leaf, backbone)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def mean(self) -> tuple[float, ...]:
        return self.backbone.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.backbone.std

    def normalize_images(self, images: Sequence[Any]) -> list[torch.Tensor]:
        """H×W×3 uint8 (numpy or tensor) -> 1×3×H×W float on this device, backbone mean/std.

        Raises:
            ValueError: an image that is not H×W×3.
        """
        mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)
        out = []
        for img in images:
            t = torch.as_tensor(img, device=self.device)
            if t.ndim != 3 or t.shape[-1] != 3:
                raise ValueError(f"expected an H×W×3 RGB image, got shape {tuple(t.shape)}")
            t = t.permute(2, 0, 1)[None].float() / 255.0
            out.append((t - mean) / std)
        return out

    # -- training -------------------------------------------------------------------------------
    def check_batch(self, batch: Any) -> None:
        """Validate a training batch on the host, before it moves to the device (no GPU sync)."""

    def inputs(self, batch: dict[str, Any]) -> Any:
        """The network's input in a batch."""
        return batch["image"]

    def pad_input(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.pad_input(images)

    def decode(
        self, feats: dict[str, torch.Tensor], padded_size: Sequence[int], size: Sequence[int]
    ) -> dict[str, torch.Tensor]:
        """Backbone maps of a padded batch → the network's outputs at ``size`` (shared pass)."""
        return self.model.decode(feats, padded_size, size)

    def losses(self, batch: dict[str, Any], out: Any) -> dict[str, torch.Tensor]:
        """Losses from the network's outputs; ``"loss"`` is their total."""
        raise NotImplementedError(f"{type(self).__name__} has no losses()")

    def training_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Losses with the component's own backbone pass."""
        return self.losses(batch, self.model(self.inputs(batch)))

    def unused_parameter_reasons(self) -> list[str]:
        """Why some trainable parameters of ``model`` (besides the backbone) get no gradient."""
        return []

    # -- evaluation -----------------------------------------------------------------------------
    def on_eval_epoch_start(self) -> None:
        """Reset per-epoch state."""

    def eval_step(self, batch: dict[str, Any]) -> None:
        """Accumulate one evaluation batch (and write its predictions if ``predictions_dir``)."""
        raise NotImplementedError(f"{type(self).__name__} has no eval_step()")

    def metric_names(self) -> list[str] | None:
        """The metrics :meth:`eval_epoch_end` logs (``monitor=`` is checked against them before
        training); None: not declared, any name is accepted."""
        return None

    def eval_epoch_end(self, context: EvalContext) -> dict[str, float]:
        """The epoch's metrics to log (keys without ``val/``); sets ``last_metrics`` (metrics.json)."""
        raise NotImplementedError(f"{type(self).__name__} has no eval_epoch_end()")

    def bind_data(self, datamodule: Any) -> None:
        """Check the data fits the trained model (e.g. the class list) and adopt its conventions."""

    def set_tta(self, tta: str | dict[str, Any]) -> None:
        raise ValueError(f"{type(self).__name__} has no test-time augmentation; drop tta=")

    def finalize_predictions(self, out_dir: Path) -> None:
        """Write whole-set prediction files (rank 0, after evaluation); per-image files need nothing."""

    # -- inference and results --------------------------------------------------------------------
    def predict(self, images: Any) -> list[Any]:
        """One result per image (inputs as :func:`siglip_dense.predict.to_rgb_images` takes them),
        in the task's structure from :mod:`siglip_dense.predict`."""
        raise NotImplementedError(f"{type(self).__name__} has no predict()")

    def write_outputs(self, image: Any, prediction: Any, out_dir: Path, stem: str) -> list[Path]:
        """Raw output file(s) and a PNG visualisation for one image (tools/predict.py)."""
        raise NotImplementedError(f"{type(self).__name__} has no write_outputs()")

    def summarize(self, metrics: dict[str, Any]) -> str:
        """A readable summary of final metrics for the console."""
        return "\n".join(f"{k}: {v:.4f}" for k, v in metrics.items() if isinstance(v, float))

    def save_visualization(self, datamodule: Any, path: Path, num: int) -> Path | None:
        """A picture of predictions vs ground truth on validation samples; ``None`` if unsupported."""
        return None

    # -- checkpoints ------------------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        """This task's part of ``checkpoint["siglip_dense"]`` (classes, depth range, ...)."""
        return {}

    def load_meta(self, meta: dict[str, Any]) -> None:
        """Restore what the checkpoint says beyond the weights (the data config)."""
        self.data_config = meta.get("data")

    def update_hparams(self, hparams: dict[str, Any]) -> None:
        """Resolved settings (from the data) written back into the saved constructor arguments."""

    def check_state_dict(self, state: dict[str, Any], prefix: str) -> None:
        """Refuse a checkpoint whose weights (keys under ``prefix``) cannot fit this network."""

    def warn_once(self, message: str) -> None:
        warned: set[str] = self.__dict__.setdefault("_warned", set())
        if message not in warned:
            warned.add(message)
            warnings.warn(message, stacklevel=2)


def fill_in_keys(cfg: dict[str, Any], in_channels: int, keys: list[str]) -> dict[str, Any]:
    """A head config with ``in_channels`` defaulted and ``in_keys: null`` set to ``keys``."""
    cfg = dict(cfg)
    cfg.setdefault("in_channels", in_channels)
    if "in_keys" in cfg and cfg["in_keys"] is None:
        cfg["in_keys"] = keys
    return cfg


__all__ = ["EvalContext", "TaskComponent", "fill_in_keys"]
