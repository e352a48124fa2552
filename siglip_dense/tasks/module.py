"""DenseModule: the one LightningModule, over a backbone and a dict of task components.

Design::

    DenseModule (LightningModule: optimisation, schedules, init_from, checkpoints, logging)
      backbone (SigLIP2Backbone, owned once) ─► {task name: TaskComponent}
      TaskComponent (plain nn.Module, siglip_dense.tasks.component) = network (neck + head, whose
        backbone slot IS the shared backbone) + loss + evaluator (metric, inference protocol,
        prediction writer, picture, checkpoint meta)

Single-task is the one-entry case (``SegmentationTask``, ``DepthTask``, ``DetectionTask`` are thin
subclasses that build their component from the config's arguments); multi-task (``MultiTask``) has
several entries sharing the backbone. A multi-task training batch is ``{task: batch}``: tasks whose
padded images have the same size run ONE backbone pass (their maps split back per task); other
tasks (detection, whose torchvision detector resizes and batches images itself, or a task with
another crop size) run their own pass through the same backbone module. The loss is
``Σ loss_weights[t] · loss_t``; evaluation has one loader per task, each task's metrics are logged
as ``val/<task>/<metric>`` (single task: ``val/<metric>``).

State-dict layout (unchanged from the per-task LightningModules, so older checkpoints load as
they are): single task ``model.*`` = the component's network (``model.backbone.*`` the backbone;
detection ``model.backbone.body.*``); multi-task ``model.backbone.*`` (once) and
``model.tasks.<task>.model.*`` (each network, its backbone alias left out).

To add a task: subclass :class:`~siglip_dense.tasks.component.TaskComponent` (network builder,
``losses``, ``eval_step`` / ``eval_epoch_end``, ``meta``) and a thin ``DenseModule`` subclass whose
``__init__`` takes the config's arguments, calls :meth:`DenseModule.attach` with the component and
names ``component_class`` (so ``MultiTask`` can build it from the same config). A new head for an
existing task is only a config (``task.head._target_``).
"""

from __future__ import annotations

import copy
import inspect
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from siglip_dense.checkpoints import check_same_backbone, read_meta
from siglip_dense.legacy import upgrade_config
from siglip_dense.models.backbone import SigLIP2Backbone
from siglip_dense.models.compile_options import compile_kwargs
from siglip_dense.tasks.component import EvalContext, TaskComponent
from siglip_dense.tasks.init_from import filter_prefixes, init_from_checkpoint, split_components
from siglip_dense.tasks.optim import param_groups_layer_decay
from siglip_dense.tasks.rng import (
    checkpoint_is_mid_epoch,
    gather_rng_states,
    rng_states_for_rank,
    set_rng_states,
)


class MultiTaskModel(nn.Module):
    """``backbone`` + ``tasks`` (a ModuleDict of components whose networks share it).

    The backbone appears in the module tree once per task too (``tasks.<t>.model.backbone``, the
    same object); ``state_dict`` keeps only ``backbone.*`` and loading fills the aliases back in.
    """

    def __init__(self, backbone: SigLIP2Backbone, tasks: dict[str, TaskComponent]) -> None:
        super().__init__()
        self.backbone = backbone
        self.tasks = nn.ModuleDict(tasks)
        for component in tasks.values():
            component.set_backbone(backbone)
        self.register_state_dict_post_hook(_drop_backbone_aliases)
        self.register_load_state_dict_pre_hook(_fill_backbone_aliases)

    def alias_prefixes(self, prefix: str = "") -> list[str]:
        return [f"{prefix}tasks.{name}.model.{c.backbone_path}." for name, c in self.tasks.items()]


def _drop_backbone_aliases(
    module: MultiTaskModel, state_dict: dict[str, Any], prefix: str, _meta: Any
) -> None:
    aliases = tuple(module.alias_prefixes(prefix))
    for key in [k for k in state_dict if k.startswith(aliases)]:
        del state_dict[key]


def _fill_backbone_aliases(module: MultiTaskModel, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    shared = f"{prefix}backbone."
    for key in [k for k in state_dict if k.startswith(shared)]:
        for alias in module.alias_prefixes(prefix):
            state_dict.setdefault(alias + key[len(shared) :], state_dict[key])


def component_parts(
    component: TaskComponent, root: str, filter_name: str, with_backbone: bool = True
) -> dict[str, nn.Module]:
    """The parts of ``component.model`` (key prefix under ``root`` → module) ``init_from_filter`` selects.

    ``all``: the backbone, the neck and every other part (heads, RPN, RoI heads) separately, so that
    each is found in the source under its own prefix (another task's or a multi-task checkpoint).
    """
    bb_prefix, neck_prefix = f"{root}{component.backbone_path}.", f"{root}{component.neck_path}."
    prefixes = filter_prefixes(filter_name, bb_prefix, neck_prefix)
    if prefixes == ("",):
        parts = component_parts(component, root, "backbone+neck")
        parts.update(split_components(component.model, root, set(parts)))
    else:
        parts = {}
        for prefix in prefixes:
            try:
                module = component.model.get_submodule(prefix[len(root) :].rstrip("."))
            except AttributeError:
                continue  # no neck here (neck=none)
            if module is not None:
                parts[prefix] = module
    if not with_backbone:
        parts.pop(bb_prefix, None)
    return parts


class DenseModule(L.LightningModule):
    """The LightningModule of every run: shared backbone + named task components.

    Subclasses build the components from plain-dict configs (what Hydra composes) and call
    :meth:`attach` then :meth:`finish_init`; hyper-parameters are those plain dicts, so a checkpoint
    rebuilds the exact model with ``load_from_checkpoint`` (``weights_only=True``), without Hydra
    and without the original pretrained weight file.
    """

    task_name: str = "base"
    # set by subclasses: the component a config with this class as ``_target_`` builds
    component_class: type[TaskComponent] | None = None

    def __init__(
        self,
        backbone: dict[str, Any],
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        layer_decay: float = 1.0,
        freeze_backbone: bool = False,
    ) -> None:
        super().__init__()
        self.optimizer_cfg = dict(optimizer or {"_target_": "torch.optim.AdamW", "lr": 1e-4})
        self.scheduler_cfg = dict(scheduler or {})
        self.layer_decay = float(layer_decay)
        self.backbone_cfg = dict(backbone)
        self._data_config: dict[str, Any] | None = None
        # set by tools/eval.py: write predictions in the dataset's own convention here
        self.predictions_dir: Path | None = None
        self.last_metrics: dict[str, Any] = {}
        self.multitask = False
        self.loss_weights: dict[str, float] = {}
        self._loader_order: list[str] = []

    def __getattr__(self, name: str) -> Any:
        """A single-task module exposes its component's attributes (``task.num_classes``,
        ``task.infer``, ``task.detect``): the public API of the former per-task modules."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            components = self.__dict__.get("_components")
            if components and not name.startswith("_"):
                return getattr(next(iter(components.values())), name)
            raise

    # -- construction -----------------------------------------------------------------------------
    @staticmethod
    def build_backbone(cfg: dict[str, Any]) -> SigLIP2Backbone:
        cfg = {k: v for k, v in cfg.items() if k not in ("mean", "std")}
        return instantiate(cfg, _convert_="all")

    def attach(
        self,
        components: dict[str, TaskComponent],
        multitask: bool = False,
        loss_weights: dict[str, float] | None = None,
        backbone: SigLIP2Backbone | None = None,
        feature_keys: dict[str, list[str]] | None = None,
    ) -> None:
        """Own ``components``: one (its network is ``self.model``) or several sharing ``backbone``."""
        names = list(components)
        self.multitask = bool(multitask)
        self.loss_weights = {n: float((loss_weights or {}).get(n, 1.0)) for n in names}
        self._loader_order = names
        if self.multitask:
            if backbone is None:
                raise ValueError("a multi-task module needs the shared backbone")
            self.model = MultiTaskModel(backbone, components)
            self.backbone_prefix, self.neck_prefix = "backbone.", "neck."
            self._feature_keys = dict(feature_keys or {})
        else:
            if len(components) != 1:
                raise ValueError(f"a single-task module has one component, got {names}")
            component = components[names[0]]
            self.model = component.model
            # the component's metric states (not its network: that is ``self.model``) move with us
            self.task_metrics = nn.ModuleDict(
                {n: m for n, m in component.named_children() if n != "model" and m is not None}
            )
            self.__dict__["_components"] = {names[0]: component}
            self.backbone_prefix = f"{component.backbone_path}."
            self.neck_prefix = f"{component.neck_path}."

    def finish_init(self, freeze_backbone: bool, init_from: str | None, init_from_filter: str) -> None:
        """Call at the end of a subclass __init__, once the components are attached."""
        # original shapes, before any strategy wraps or flattens parameters (optimizer groups use them)
        self.param_shapes = {n: tuple(p.shape) for n, p in self.model.named_parameters()}
        if freeze_backbone:
            self.backbone.freeze(None)
        if init_from:
            self.check_init_source(init_from)
            report = init_from_checkpoint(
                self,
                init_from,
                init_from_filter,
                self.init_components(init_from_filter),
                resample=self.backbone.init_pos_resampler(init_from),
                complete=(f"model.{self.backbone_prefix}",),  # a partly random backbone: an error
                allow_incomplete=not self.backbone_cfg.get("strict", True),
            )
            print(report)
            self.init_report = report

    @property
    def components(self) -> dict[str, TaskComponent]:
        """``{task name: component}`` in loader order."""
        if self.multitask:
            return dict(self.model.tasks.items())
        return dict(self.__dict__["_components"])

    @property
    def task_names(self) -> list[str]:
        return list(self.components)

    @property
    def backbone(self) -> SigLIP2Backbone:
        if self.multitask:
            return self.model.backbone
        return next(iter(self.components.values())).backbone

    @property
    def mean(self) -> tuple[float, ...]:
        return self.backbone.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.backbone.std

    @property
    def data_config(self) -> dict[str, Any] | None:
        return self._data_config

    @data_config.setter
    def data_config(self, value: dict[str, Any] | None) -> None:
        """The run's data config; in a multi-task run each task gets its member (``datamodules.<task>``)."""
        self._data_config = value
        if "_components" not in self.__dict__ and "model" not in self._modules:
            return
        if not self.multitask:
            for component in self.components.values():
                component.data_config = value
            return
        members = (value or {}).get("datamodules") or {} if isinstance(value, dict) else {}
        for name, component in self.components.items():
            component.data_config = copy.deepcopy(members.get(name))

    def init_components(self, filter_name: str) -> dict[str, nn.Module]:
        """This model's parts ``init_from_filter`` selects, by their key prefix in this module."""
        if not self.multitask:
            (component,) = self.components.values()
            return component_parts(component, "model.", filter_name)
        filter_prefixes(filter_name)  # a named error for an unknown filter
        out: dict[str, nn.Module] = {"model.backbone.": self.backbone}
        if filter_name == "backbone":
            return out
        for name, component in self.components.items():
            out.update(component_parts(component, f"model.tasks.{name}.model.", filter_name, False))
        return out

    def check_init_source(self, path: str | Path) -> None:
        """Refuse weights trained on another backbone variant (the message names both)."""
        path = Path(path)
        if path.is_file() and path.suffix == ".safetensors":
            return  # a bare weight file carries no description; shapes are checked key by key
        try:
            meta = read_meta(path)
        except (ValueError, KeyError):
            return  # not ours: nothing to compare, the key-by-key report still applies
        check_same_backbone(meta, self.backbone.arch_config.to_dict(), path)

    def compile_backbone(self, **options: Any) -> list[str]:
        """``torch.compile`` the backbone and neck in place (state-dict keys unchanged).

        Only these run the same shapes every step; heads and detector post-processing (NMS, variable
        box counts) stay eager, where compiling would mostly recompile. The backbone compiles once
        for every input size (:meth:`SigLIP2Backbone.compile`); the neck once per training input
        size, since torch's inductor specialises sizes in convolution backward (torch 2.14).
        """
        options = compile_kwargs(options)
        compiled = []
        for prefix in (self.backbone_prefix, self.neck_prefix):
            try:
                module = self.model.get_submodule(prefix.rstrip("."))
            except AttributeError:
                continue
            if module is not None:
                module.compile(**options)
                compiled.append(prefix.rstrip("."))
        return compiled

    # -- memory layout and DDP ---------------------------------------------------------------------
    def use_channels_last(self) -> None:
        """Store conv weights (patch embedding, necks, heads) channels-last (NHWC).

        The backbone's NCHW maps are already NHWC in memory (token grids permuted), so necks and
        conv heads then run NHWC kernels without layout copies; tensor-core convs prefer it. Inputs
        need no conversion: a conv with a channels-last weight picks the layout itself.
        """
        self.to(memory_format=torch.channels_last)

    def unused_parameter_reasons(self) -> list[str]:
        """Why some trainable parameters get no gradient in a training step (empty: none do).

        DDP assumes every trainable parameter gets a gradient each step and fails on the next step
        otherwise; searching for unused ones costs a graph traversal per step, so train.py turns
        ``find_unused_parameters`` on only when this names a reason. Frozen parameters are fine.
        """
        reasons = []
        bb = self.backbone
        last = max(bb.out_indices)
        if last < bb.num_layers - 1 and _trainable(bb.vit.blocks[last + 1 :]):
            reasons.append(
                f"backbone blocks {last + 1}..{bb.num_layers - 1} come after the last out_index {last} "
                "(the forward stops early)"
            )
        if not bb.norm_intermediates and _trainable(bb.vit.norm):
            reasons.append("the backbone's final norm is unused (norm_intermediates=false)")
        if bb.vit.attn_pool is not None and _trainable(bb.vit.attn_pool):
            reasons.append("the backbone's MAP head (keep_head=true) is unused by dense heads")
        for name, component in self.components.items():
            prefix = f"{name}: " if self.multitask else ""
            reasons += [prefix + r for r in component.unused_parameter_reasons()]
        return reasons

    # -- forward --------------------------------------------------------------------------------------
    def forward(self, images: Any) -> Any:
        """Single task: the component's forward (logits / depth / detections). Multi-task:
        ``{task: B_t×3×H×W}`` → ``{task: that network's outputs}`` (see :meth:`shared_forward`)."""
        if not self.multitask:
            return next(iter(self.components.values()))(images)
        return self.shared_forward(images)

    def shared_forward(self, images: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """One backbone pass over the concatenated batch when every task's padded images have the
        same size; otherwise one pass per task (warned once)."""
        components = {name: self.model.tasks[name] for name in images}
        padded = {name: components[name].pad_input(x) for name, x in images.items()}
        shapes = {tuple(x.shape[1:]) for x in padded.values()}
        if len(shapes) != 1:
            self.warn_once(
                "multi-task batches have different image sizes "
                f"({ {n: tuple(x.shape[-2:]) for n, x in padded.items()} }): one backbone pass per task "
                "(give every task the same crop size for a single shared pass)"
            )
            return {name: components[name].model(x) for name, x in images.items()}
        sizes = [len(x) for x in padded.values()]
        feats = self.backbone(
            torch.cat(list(padded.values())) if len(padded) > 1 else next(iter(padded.values()))
        )
        parts = {k: torch.split(v, sizes) for k, v in feats.items()}
        out = {}
        for i, name in enumerate(padded):
            task_feats = {k: parts[k][i] for k in self._feature_keys[name]}
            out[name] = components[name].decode(task_feats, padded[name].shape[-2:], images[name].shape[-2:])
        return out

    # -- training -----------------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if not self.multitask:
            ((name, component),) = self.components.items()
            losses = component.training_losses(batch)
            self.track_finite(component.kind, losses["loss"])
            bs = len(batch["image"])
            self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=True, batch_size=bs)
            return losses["loss"]
        missing = [n for n in self.task_names if not isinstance(batch, dict) or batch.get(n) is None]
        if missing:
            have = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
            raise ValueError(f"the training batch has no data for task(s) {missing} (it has {have})")
        shared = [n for n, c in self.components.items() if c.shares_backbone_pass]
        outs = self.shared_forward({n: self.components[n].inputs(batch[n]) for n in shared}) if shared else {}
        total: torch.Tensor | float = 0.0
        for name, component in self.components.items():
            sub_batch = batch[name]
            if name in outs:
                losses = component.losses(sub_batch, outs[name])
            else:  # its own pass through the same backbone (detection: torchvision batches itself)
                losses = component.training_losses(sub_batch)
            self.track_finite(name, losses["loss"])
            bs = len(sub_batch["image"])
            self.log_dict({f"train/{name}/{k}": v for k, v in losses.items()}, batch_size=bs)
            total = total + self.loss_weights[name] * losses["loss"]
        self.log(
            "train/loss",
            total,
            prog_bar=True,
            batch_size=sum(len(batch[n]["image"]) for n in self.task_names),
        )
        return total

    def check_batch(self, batch: Any) -> None:
        """Each task's host-side checks on its part of the training batch."""
        if not self.multitask:
            for component in self.components.values():
                component.check_batch(batch)
        elif isinstance(batch, dict):
            for name, component in self.components.items():
                if batch.get(name) is not None:
                    component.check_batch(batch[name])

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self._trainer
        if trainer is not None and trainer.training:
            self.check_batch(batch)
        return batch

    def track_finite(self, name: str, loss: torch.Tensor) -> None:
        """Record, on the device, the first step whose ``name`` loss is not finite (no host sync).

        :meth:`raise_if_not_finite` reads it every ``log_every_n_steps`` (where Lightning's logging
        reads values anyway), before each validation (so no checkpoint of a diverged run is written)
        and at the end of training.
        """
        first: dict[str, torch.Tensor] = self.__dict__.setdefault("_first_nonfinite", {})
        step = torch.full((), self.global_step, dtype=torch.long, device=loss.device)
        seen = first.get(name, torch.full_like(step, -1))
        first[name] = torch.where(~torch.isfinite(loss.detach()) & (seen < 0), step, seen)

    def raise_if_not_finite(self) -> None:
        """One host read of the recorded steps; raises naming the loss and the step."""
        for name, step in self.__dict__.get("_first_nonfinite", {}).items():
            s = int(step)
            if s >= 0:
                raise FloatingPointError(
                    f"non-finite {name} loss at step {s}: lower the lr, enable gradient clipping "
                    "(trainer.gradient_clip_val) or check the data"
                )

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        trainer = self._trainer
        every = max(1, int(getattr(trainer, "log_every_n_steps", 1) or 1)) if trainer is not None else 1
        if self.global_step % every == 0 or (trainer is not None and trainer.is_last_batch):
            self.raise_if_not_finite()

    def on_train_end(self) -> None:
        self.raise_if_not_finite()

    # -- optimisation -------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        opt_cfg = dict(self.optimizer_cfg)
        weight_decay = float(opt_cfg.pop("weight_decay", 0.05))
        groups = param_groups_layer_decay(
            self.model,
            self.backbone,
            weight_decay,
            self.layer_decay,
            backbone_prefix=self.backbone_prefix,
            shapes=getattr(self, "param_shapes", None),
        )
        if not groups:
            raise ValueError("no trainable parameters: everything is frozen")
        for g in groups:
            g.pop("names")
        target = opt_cfg.pop("_target_", "torch.optim.AdamW")
        opt_cfg.pop("_partial_", None)
        optimizer = instantiate({"_target_": target, "_partial_": True, **opt_cfg})(groups)
        sch = dict(self.scheduler_cfg)
        sch.setdefault("_target_", "siglip_dense.tasks.optim.warmup_schedule")
        sch["_partial_"] = True
        total = sch.pop("total_steps", None) or self.trainer.estimated_stepping_batches
        scheduler = instantiate(sch)(optimizer, total_steps=int(total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- evaluation: each task's own, one loader per task --------------------------------------------
    def setup(self, stage: str) -> None:
        if not self.multitask:
            return
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        names = getattr(dm, "task_names", None)
        if names is not None:
            check_task_data(self.task_names, list(names))
            self._loader_order = list(names)

    def _component_of_loader(self, dataloader_idx: int) -> TaskComponent:
        if not self.multitask:
            return next(iter(self.components.values()))
        if dataloader_idx >= len(self._loader_order):
            raise ValueError(
                f"evaluation loader {dataloader_idx} has no task: loaders are {self._loader_order} in order"
            )
        return self.components[self._loader_order[dataloader_idx]]

    def _set_predictions_dirs(self) -> None:
        for name, component in self.components.items():
            if self.predictions_dir is None:
                component.predictions_dir = None
            else:
                base = Path(self.predictions_dir)
                component.predictions_dir = base / name if self.multitask else base

    def _eval_context(self, name: str) -> EvalContext:
        trainer = self.trainer
        root = trainer.default_root_dir
        results_dir = None
        if root:
            results_dir = Path(root) / name if self.multitask else Path(root)
        return EvalContext(trainer.is_global_zero, results_dir, self._eval_dataset(name))

    def _eval_dataset(self, name: str) -> Any:
        """The dataset behind task ``name``'s evaluation loader (validation, else test)."""
        trainer = self.trainer
        idx = self._loader_order.index(name) if self.multitask else 0
        for loaders in (trainer.val_dataloaders, trainer.test_dataloaders):
            if loaders is None:
                continue
            loader = loaders[idx] if isinstance(loaders, (list, tuple)) else loaders
            if getattr(loader, "dataset", None) is not None:
                return loader.dataset
        dm = getattr(trainer, "datamodule", None)
        if self.multitask and dm is not None:
            dm = getattr(dm, "datamodules", {}).get(name)
        return getattr(dm, "val_dataset", None)

    def _eval_start(self) -> None:
        self._set_predictions_dirs()
        for component in self.components.values():
            component.on_eval_epoch_start()

    def _eval_end(self) -> None:
        for name, component in self.components.items():
            metrics = component.eval_epoch_end(self._eval_context(name))
            prefix = f"val/{name}/" if self.multitask else "val/"
            # the evaluators gathered every rank's samples: the values are global and equal on every
            # rank, so "max" over ranks is the value itself (exactly), and Lightning sees them synced
            self.log_dict(
                {prefix + k: v for k, v in metrics.items()},
                prog_bar=component.log_prog_bar,
                sync_dist=True,
                reduce_fx="max",
            )
        if self.multitask:
            self.last_metrics = {name: dict(c.last_metrics) for name, c in self.components.items()}
        else:
            self.last_metrics = dict(next(iter(self.components.values())).last_metrics)

    def on_validation_start(self) -> None:
        self.raise_if_not_finite()

    def on_validation_epoch_start(self) -> None:
        self._eval_start()

    def on_test_epoch_start(self) -> None:
        self._eval_start()

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if isinstance(batch, dict) and batch.get("meta") == []:  # every sample skipped (skip_bad)
            return
        self._component_of_loader(dataloader_idx).eval_step(batch)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.validation_step(batch, batch_idx, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._eval_end()

    def on_test_epoch_end(self) -> None:
        self._eval_end()

    def finalize_predictions(self, out_dir: Path) -> None:
        """Whole-set prediction files (rank 0, after evaluation): ``out_dir[/<task>]``."""
        for name, component in self.components.items():
            component.finalize_predictions(Path(out_dir) / name if self.multitask else Path(out_dir))

    def bind_data(self, datamodule: Any) -> None:
        """Check the data fits the trained model (e.g. the class list) and adopt its conventions."""
        if not self.multitask:
            next(iter(self.components.values())).bind_data(datamodule)
            return
        members = getattr(datamodule, "datamodules", None)
        if members is None:
            raise ValueError(
                "a multi-task model evaluates on a MultiTaskDataModule (one data module per task)"
            )
        check_task_data(self.task_names, list(members))
        for name, component in self.components.items():
            component.bind_data(members[name])

    def set_tta(self, tta: str | dict[str, Any]) -> None:
        if self.multitask:
            raise ValueError(f"{type(self).__name__} has no test-time augmentation; drop tta=")
        next(iter(self.components.values())).set_tta(tta)

    # -- inference without Hydra or a datamodule (tools/predict.py, load_model) ---------------------
    def predict(self, images: Any, score_threshold: float | None = None, classes: Any = None) -> Any:
        """Predictions for one image or a batch (paths, PIL images, numpy arrays, tensors: see
        :mod:`siglip_dense.predict`); one result for one image, a list for a batch.

        Single task: the component's result (``SegmentationPrediction``, ``DepthPrediction``,
        ``DetectionPrediction``); multi-task: ``{task: result}`` per image. ``score_threshold``
        (detection only; None: the model's ``vis_score_threshold``) keeps detections scoring above it;
        0 keeps the detector's raw top ``detections_per_img``.

        Raises:
            ValueError / TypeError: an input that is not an image (the message names its index);
                ``score_threshold`` for a model without a detection task.
        """
        from siglip_dense.predict import to_rgb_images

        if classes is not None:  # open vocabulary (a CAT-Seg head): switch the label set first
            from siglip_dense.openvocab.zeroshot import set_task_classes

            set_task_classes(self, classes)
        rgb, batched = to_rgb_images(images)
        options = {"score_threshold": score_threshold} if score_threshold is not None else {}
        takes = {
            n: "score_threshold" in inspect.signature(c.predict).parameters
            for n, c in self.components.items()
        }
        if options and not any(takes.values()):
            raise ValueError(
                f"score_threshold applies to detection; this model's tasks are {self.task_names}"
            )
        per_task = {n: c.predict(rgb, **(options if takes[n] else {})) for n, c in self.components.items()}
        if self.multitask:
            out = [{n: preds[i] for n, preds in per_task.items()} for i in range(len(rgb))]
        else:
            out = next(iter(per_task.values()))
        return out if batched else out[0]

    def write_outputs(self, image: Any, prediction: Any, out_dir: Path, stem: str) -> list[Path]:
        """Raw output file(s) and a PNG visualisation for one image (multi-task: ``out_dir/<task>/``)."""
        if not self.multitask:
            return next(iter(self.components.values())).write_outputs(image, prediction, out_dir, stem)
        written = []
        for name, component in self.components.items():
            written += component.write_outputs(image, prediction[name], Path(out_dir) / name, stem)
        return written

    # -- results a run writes (train.py and tools/eval.py call these) -------------------------------
    def summarize(self, metrics: dict[str, Any]) -> str:
        """A readable summary of final metrics for the console."""
        if not self.multitask:
            return next(iter(self.components.values())).summarize(metrics)
        parts = []
        for name, component in self.components.items():
            if isinstance(metrics.get(name), dict):
                weight = self.loss_weights[name]
                parts.append(f"== {name} (loss weight {weight:g}) ==\n{component.summarize(metrics[name])}")
        return "\n".join(parts)

    def save_visualization(self, datamodule: Any, path: Path, num: int) -> Path | None:
        """A picture of predictions vs ground truth; multi-task: ``<stem>_<task><suffix>`` per task."""
        if not self.multitask:
            return next(iter(self.components.values())).save_visualization(datamodule, path, num)
        members = getattr(datamodule, "datamodules", {}) or {}
        written = []
        for name, component in self.components.items():
            if name not in members:
                continue
            out = component.save_visualization(
                members[name], path.with_name(f"{path.stem}_{name}{path.suffix}"), num
            )
            if out is not None:
                written.append(out)
        for extra in written[1:]:
            print(f"predictions vs ground truth: {extra}")
        return written[0] if written else None

    def warn_once(self, message: str) -> None:
        warned: set[str] = self.__dict__.setdefault("_warned", set())
        if message not in warned:
            warned.add(message)
            warnings.warn(message, stacklevel=2)

    # -- checkpoints are self-describing ----------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the backbone's resolved architecture, each task's meta, per-rank random states.

        The saved weights already contain the backbone, so reloading must not need (or re-read) the
        original pretrained file, and must rebuild exactly the numerics it was trained with.
        """
        hp = copy.deepcopy(dict(checkpoint.get("hyper_parameters", {})))
        bb = dict(hp.get("backbone", {}))
        bb["checkpoint"] = None
        bb["arch_config"] = self.backbone.arch_config.to_dict()
        hp["backbone"] = bb
        hp["init_from"] = None
        meta = {
            "task": self.task_name,
            "arch": self.backbone.arch,
            "arch_config": self.backbone.arch_config.to_dict(),
            "mean": list(self.mean),
            "std": list(self.std),
            "data": copy.deepcopy(self.data_config),
        }
        if self.multitask:
            self.save_task_configs(hp, meta)
        else:
            (component,) = self.components.values()
            component.update_hparams(hp)
            meta.update(component.meta())
        checkpoint["hyper_parameters"] = hp
        checkpoint["siglip_dense"] = meta
        if self._trainer is not None:
            checkpoint["rng_states"] = gather_rng_states()

    def save_task_configs(self, hparams: dict[str, Any], meta: dict[str, Any]) -> None:
        """Multi-task: each task's resolved config and meta (``MultiTask`` implements it)."""
        raise NotImplementedError

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("siglip_dense", {})
        trainer = self._trainer
        self.check_checkpoint_tasks(checkpoint, trainer.ckpt_path if trainer is not None else None)
        self.on_load_meta(meta)
        state = checkpoint.get("state_dict", {})
        if state:
            for name, component in self.components.items():
                component.check_state_dict(
                    state, f"model.tasks.{name}.model." if self.multitask else "model."
                )
        if trainer is not None and trainer.state.fn == TrainerFn.FITTING and "rng_states" in checkpoint:
            # resuming a fit: continue the random streams (shuffle, augmentation, dropout) exactly
            set_rng_states(rng_states_for_rank(checkpoint["rng_states"], checkpoint_is_mid_epoch(checkpoint)))

    def valid_monitors(self) -> list[str]:
        """``monitor=`` values this module logs: ``val/[<task>/]<metric>`` (``<metric>`` where a
        component does not declare its metric names) and ``train/loss``."""
        out = []
        for name, component in self.components.items():
            prefix = f"val/{name}/" if self.multitask else "val/"
            out += [prefix + m for m in component.metric_names() or ["<metric>"]]
        return [*out, "train/loss"]

    def check_monitor(self, monitor: str | None) -> None:
        """Refuse a ``val/`` monitor that no configured task logs, before training (not at the first
        validation, after a whole epoch); a multi-task ``train/<task>/...`` must name a task too.
        Other monitors (``step``, a callback's metric) are not checked.

        Raises:
            ValueError: naming the monitor, the configured tasks and the valid monitors.
        """
        if not monitor:
            return
        parts = str(monitor).split("/")
        if parts[0] not in ("val", "train") or len(parts) < 2:
            return
        problem = None
        if self.multitask and (parts[0] == "val" or len(parts) > 2):
            name = parts[1]
            if name not in self.components:
                problem = f"there is no task {name!r}"
            elif parts[0] == "val":
                known = self.components[name].metric_names()
                metric = "/".join(parts[2:])
                if known is not None and metric not in known:
                    problem = f"task {name} logs no {metric!r}"
        elif not self.multitask and parts[0] == "val":
            known = next(iter(self.components.values())).metric_names()
            metric = "/".join(parts[1:])
            if known is not None and metric not in known:
                problem = f"this {self.task_name} model logs no {metric!r}"
        if problem:
            raise ValueError(
                f"monitor={monitor}: {problem} (tasks: {self.task_names}); valid monitors: "
                f"{', '.join(self.valid_monitors())}. Set monitor= (and monitor_mode=min|max) to one of them"
            )

    def check_checkpoint_tasks(self, checkpoint: dict[str, Any], path: str | Path | None = None) -> None:
        """Refuse a checkpoint trained for other tasks than this module's, before its weights load.

        Otherwise resuming (``ckpt_path=``) an older seg+depth run with today's seg+depth+det config
        ends in torch's ``Missing key(s) in state_dict``. A checkpoint without our meta is not checked.

        Raises:
            ValueError: naming the file (when known), the checkpoint's tasks, the config's and how to
                configure the same task set.
        """
        ckpt_tasks = checkpoint_tasks(checkpoint)
        if ckpt_tasks is None:
            return
        ckpt_multi, ckpt_kinds = ckpt_tasks
        mine = {name: c.kind for name, c in self.components.items()}
        if ckpt_multi == self.multitask and ckpt_kinds == mine:
            return
        where = f"checkpoint {path}" if path else "the checkpoint"
        theirs = _describe_tasks(ckpt_multi, ckpt_kinds)
        ours = _describe_tasks(self.multitask, mine)
        head = f"{where} was trained as {theirs}, but the config builds {ours}"
        if ckpt_multi != self.multitask or not self.multitask:
            raise ValueError(
                f"{head}: load it with the task config it was trained with (its run's "
                ".hydra/config.yaml: task=..., data=...); init_from= reuses its weights for another task"
            )
        extra = [n for n in mine if n not in ckpt_kinds]
        given_weights = dict(self.hparams.get("loss_weights") or {}) if hasattr(self, "hparams") else {}
        drops = []
        for name in extra:
            drops += [f"'~task.tasks.{name}'", f"'~data.datamodules.{name}'"]
            if name in given_weights:
                drops.append(f"'~task.loss_weights.{name}'")
        missing = [n for n in ckpt_kinds if n not in mine]
        steps = []
        if drops:
            steps.append("drop the tasks it lacks: " + " ".join(drops))
        if missing:
            steps.append(
                f"add task.tasks.<name> and data.datamodules.<name> for {missing} as the original run had them"
            )
        changed = [n for n in ckpt_kinds if n in mine and mine[n] != ckpt_kinds[n]]
        if changed:
            steps.append(f"give {changed} the task kind the checkpoint has")
        raise ValueError(
            f"{head}. To resume or load it, configure the same tasks: {'; '.join(steps)}. Keep the "
            "original run's other settings too (its .hydra/config.yaml): e.g. a seg+depth "
            "experiment=toy_multitask run written before detection joined it also needs "
            "trainer.gradient_clip_val=null (now 1.0)"
        )

    def on_load_meta(self, meta: dict[str, Any]) -> None:
        """Restore what the checkpoint says beyond the weights (the data config, per-task meta)."""
        # data configs name their classes by path: old checkpoints name paths since moved
        self.data_config = upgrade_config(meta.get("data"))
        if not self.multitask:
            for component in self.components.values():
                component.load_meta(meta)
            return
        for name, component in self.components.items():
            component.load_meta((meta.get("tasks") or {}).get(name, {}))


def checkpoint_tasks(checkpoint: dict[str, Any]) -> tuple[bool, dict[str, str]] | None:
    """``(multi-task?, {task name: kind})`` a checkpoint was trained for; None without our meta.

    Multi-task: the names of ``siglip_dense.tasks`` (else ``hyper_parameters.tasks``) and each one's
    ``task`` kind; single task: ``{kind: kind}`` (a single-task module names its one task by kind).
    """
    meta = checkpoint.get("siglip_dense")
    if not isinstance(meta, dict) or not meta.get("task"):
        return None
    hp_tasks = (checkpoint.get("hyper_parameters") or {}).get("tasks")
    member_meta = meta.get("tasks")
    if meta["task"] == "multitask" or isinstance(member_meta, dict) or isinstance(hp_tasks, dict):
        members = member_meta if isinstance(member_meta, dict) else hp_tasks or {}
        kinds = {}
        for name, value in members.items():
            kind = value.get("task") if isinstance(value, dict) else None
            if kind is None and isinstance(hp_tasks, dict) and isinstance(hp_tasks.get(name), dict):
                kind = _kind_of_target(hp_tasks[name].get("_target_"))
            kinds[str(name)] = str(kind)
        return True, kinds
    return False, {str(meta["task"]): str(meta["task"])}


def _kind_of_target(target: Any) -> str | None:
    """The task kind a member config's ``_target_`` builds (its module's ``task_name``)."""
    try:
        from hydra.utils import get_class

        return get_class(upgrade_config({"_target_": target})["_target_"]).task_name
    except Exception:  # noqa: BLE001 - an unimportable target: the kind stays unknown
        return None


def _describe_tasks(multitask: bool, kinds: dict[str, str]) -> str:
    if not multitask:
        return f"a single-task {next(iter(kinds.values()))} model"
    members = ", ".join(f"{n} ({k})" for n, k in kinds.items())
    return f"a multi-task model with tasks [{members}]"


def check_task_data(task_names: list[str], data_names: list[str]) -> None:
    """Every task has data and all data has a task (the message names both lists)."""
    no_data = [n for n in task_names if n not in data_names]
    no_task = [n for n in data_names if n not in task_names]
    if no_data:
        raise ValueError(
            f"task(s) {no_data} have no data: the data module has {data_names} (tasks: {task_names})"
        )
    if no_task:
        raise ValueError(
            f"the data module has data for {no_task} but there is no such task (tasks: {task_names})"
        )


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


__all__ = ["DenseModule", "MultiTaskModel", "check_task_data", "component_parts"]
