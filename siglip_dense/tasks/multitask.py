"""Multi-task training: one shared SigLIP 2 backbone feeding several tasks' necks and heads.

:class:`MultiTask` composes the existing task modules (``SegmentationTask``, ``DepthTask``): each is
built from its own config and keeps its neck, head, loss, metrics and evaluation protocol; then all
of them are made to share ONE backbone module. A training batch is ``{task: batch}``: when every
task's images have the same (padded) size, they are concatenated and the backbone runs once; its
maps are split back per task and each task's neck + head + loss gets its slice. The loss is
``Σ loss_weights[t] · loss_t``. Validation has one loader per task; each task computes its own
metrics, logged as ``val/<task>/<metric>``; ``last_metrics`` is ``{task: {metric: value}}``.

Checkpoints hold the shared backbone once (``model.backbone.*``); the tasks' heads live under
``model.tasks.<task>.model.*``.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from torch import nn

from siglip_dense.models.backbone import SigLIP2Backbone
from siglip_dense.tasks.base import DenseTask
from siglip_dense.tasks.depth import DepthTask
from siglip_dense.tasks.segmentation import SegmentationTask

# keys that belong to the multi-task module: the same keys in a sub-task config are not used
TOP_LEVEL_KEYS = ("optimizer", "scheduler", "layer_decay", "freeze_backbone", "init_from", "init_from_filter")


# ---------------------------------------------------------------------------------------------
# per task kind: which batch entry is the input, and the losses from the model's outputs
# (the same calls the task's own training_step makes, minus logging)
# ---------------------------------------------------------------------------------------------
def _seg_losses(
    task: SegmentationTask, batch: dict[str, Any], out: dict[str, Any]
) -> dict[str, torch.Tensor]:
    return task.compute_loss(out, batch["mask"].long())


def _depth_losses(task: DepthTask, batch: dict[str, Any], out: dict[str, Any]) -> dict[str, torch.Tensor]:
    return task.compute_loss(out["depth"], batch["depth"].float())


LOSS_FNS: dict[type, Callable[[Any, dict[str, Any], dict[str, Any]], dict[str, torch.Tensor]]] = {
    SegmentationTask: _seg_losses,
    DepthTask: _depth_losses,
}


def _loss_fn(task: DenseTask) -> Callable[[Any, dict[str, Any], dict[str, Any]], dict[str, torch.Tensor]]:
    for cls, fn in LOSS_FNS.items():
        if isinstance(task, cls):
            return fn
    raise ValueError(
        f"MultiTask supports {sorted(c.__name__ for c in LOSS_FNS)} sub-tasks, got {type(task).__name__}"
    )


def _normalize_indices(indices: Any, depth: int) -> tuple[int, ...]:
    if isinstance(indices, int):
        indices = [indices]
    out = []
    for i in indices:
        j = int(i) + depth if int(i) < 0 else int(i)
        if not 0 <= j < depth:
            raise ValueError(f"out_indices entry {i} is out of range for a {depth}-block backbone")
        out.append(j)
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# the model: one backbone, several task modules whose ``model.backbone`` IS that backbone
# ---------------------------------------------------------------------------------------------
class MultiTaskModel(nn.Module):
    """``backbone`` + ``tasks`` (a ModuleDict of task modules sharing it).

    The backbone appears in the module tree once per task too (``tasks.<t>.model.backbone``, the same
    object); ``state_dict`` keeps only ``backbone.*`` and loading fills the aliases back in.
    """

    def __init__(self, backbone: SigLIP2Backbone, tasks: dict[str, DenseTask]) -> None:
        super().__init__()
        self.backbone = backbone
        self.tasks = nn.ModuleDict(tasks)
        for task in tasks.values():
            task.model.backbone = backbone
        self.register_state_dict_post_hook(_drop_backbone_aliases)
        self.register_load_state_dict_pre_hook(_fill_backbone_aliases)

    def alias_prefixes(self, prefix: str = "") -> list[str]:
        return [f"{prefix}tasks.{name}.model.backbone." for name in self.tasks]


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


def _check_member_settings(name: str, cfg: Any, shared: dict[str, Any]) -> None:
    """A member's optimiser / schedule / layer decay / freezing differing from the model's: refused.

    The multi-task model optimises all tasks with one set of these (``task.<key>``); the member
    configs carry the same keys (they are the single-task configs), interpolated from the top in
    ``configs/task/multitask_*.yaml``. A different value there would be silently unused.
    """
    for key, value in shared.items():
        if isinstance(cfg, dict) and key in cfg and cfg[key] != value:
            raise ValueError(
                f"task.tasks.{name}.{key}={cfg[key]!r} would not be used: {key} is set once for the "
                f"whole multi-task model, at task.{key} (now {value!r}); set it there"
            )


# ---------------------------------------------------------------------------------------------
# the LightningModule
# ---------------------------------------------------------------------------------------------
class MultiTask(DenseTask):
    """Several dense tasks on one backbone, trained together with per-task loss weights.

    Args:
        backbone: the shared backbone config (as every task config has it).
        tasks: ``{name: task config}`` (``_target_`` + the task's own keys, e.g. the existing
            ``seg_upernet`` / ``depth_dpt`` configs). A task's ``backbone`` may only differ from the
            shared one in ``out_indices`` (the shared backbone returns the union). The keys in
            ``TOP_LEVEL_KEYS`` (optimizer, schedule, layer decay, freezing, init_from) are this
            module's; the same keys in a task config are not used.
        loss_weights: ``{name: weight}``; tasks not named get 1.0.
        tasks_kwargs: ``{name: kwargs}`` from each task's data (``MultiTaskDataModule.task_kwargs``):
            what a task config leaves null (classes, depth range) comes from here.
    """

    task_name = "multitask"

    def __init__(
        self,
        backbone: dict[str, Any],
        tasks: dict[str, dict[str, Any]],
        loss_weights: dict[str, float] | None = None,
        tasks_kwargs: dict[str, dict[str, Any]] | None = None,
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        layer_decay: float = 1.0,
        freeze_backbone: bool = False,
        init_from: str | None = None,
        init_from_filter: str = "all",
    ) -> None:
        super().__init__(backbone, optimizer, scheduler, layer_decay, freeze_backbone)
        self.save_hyperparameters()
        if not tasks:
            raise ValueError("MultiTask needs at least one task config (tasks={})")
        names = [str(n) for n in tasks]
        weights = dict(loss_weights or {})
        unknown = sorted(set(weights) - set(names))
        if unknown:
            raise ValueError(f"loss_weights names {unknown}, but there is no such task; tasks: {names}")
        self.loss_weights = {n: float(weights.get(n, 1.0)) for n in names}
        bad = {n: w for n, w in self.loss_weights.items() if not w >= 0}
        if bad:
            raise ValueError(f"loss weights must be >= 0, got {bad}")
        if tasks_kwargs is not None:
            check_task_data(names, list(tasks_kwargs))

        shared_settings = {
            "optimizer": optimizer,
            "scheduler": scheduler,
            "layer_decay": layer_decay,
            "freeze_backbone": freeze_backbone,
        }
        for name in names:
            _check_member_settings(name, tasks[name], shared_settings)
        shared = self.build_backbone(backbone)
        self._backbone_overrides: dict[str, dict[str, Any]] = {}
        sub_tasks: dict[str, DenseTask] = {}
        indices: dict[str, tuple[int, ...]] = {}
        for name in names:
            cfg = self._sub_config(name, tasks[name], backbone, shared, init_from)
            # what the task config fixes wins; the rest comes from the data (as train.py's build_task)
            extra = {k: v for k, v in ((tasks_kwargs or {}).get(name) or {}).items() if cfg.get(k) is None}
            if cfg.get("num_classes") is not None:
                extra.pop("class_names", None)
            sub = instantiate(cfg, _recursive_=False, _convert_="all", **extra)
            if not isinstance(sub, DenseTask):
                raise TypeError(f"tasks.{name} built a {type(sub).__name__}, not a DenseTask")
            _loss_fn(sub)  # refuse unsupported kinds now, not at the first step
            indices[name] = tuple(sub.backbone.out_indices)
            sub_tasks[name] = sub
        union = tuple(sorted(set().union(*indices.values())))
        if union != tuple(shared.out_indices):
            shared.out_indices = union
        for name, sub in sub_tasks.items():
            if indices[name] != union:
                _check_reads_named_maps(name, sub)
        self._feature_keys = {n: [f"blocks.{i}" for i in idx] for n, idx in indices.items()}
        self.model = MultiTaskModel(shared, sub_tasks)
        for name, sub in sub_tasks.items():
            # the task's own logging (its validation metrics) goes to val/<name>/... on this module
            sub.log = functools.partial(self._log_for, name)
        self._loader_order: list[str] = list(names)
        self.last_metrics: dict[str, Any] = {}
        self.finish_init(freeze_backbone, init_from, init_from_filter)

    # -- construction helpers ---------------------------------------------------------------------
    def _sub_config(
        self,
        name: str,
        cfg: dict[str, Any],
        backbone: dict[str, Any],
        shared: SigLIP2Backbone,
        init_from: str | None,
    ) -> dict[str, Any]:
        if not isinstance(cfg, dict) or "_target_" not in cfg:
            raise ValueError(f"tasks.{name} must be a task config with a _target_, got {cfg!r}")
        cfg = copy.deepcopy(dict(cfg))
        sub_init = cfg.get("init_from")
        if sub_init is not None and sub_init != init_from:
            raise ValueError(
                f"tasks.{name}.init_from={sub_init!r}: init_from applies to the whole multi-task model; "
                "set it at the top level (it reads the shared backbone from any task's checkpoint)"
            )
        for key in TOP_LEVEL_KEYS:
            cfg.pop(key, None)
        override = dict(cfg.pop("backbone", None) or {})
        differing = sorted(
            k for k, v in override.items() if k != "out_indices" and k in backbone and backbone[k] != v
        )
        differing += sorted(k for k in override if k != "out_indices" and k not in backbone)
        if differing:
            raise ValueError(
                f"tasks.{name}.backbone differs from the shared backbone in {differing}: the tasks share one "
                "backbone, only out_indices may differ per task"
            )
        if "out_indices" in override and list(override["out_indices"]) != list(
            backbone.get("out_indices", [])
        ):
            self._backbone_overrides[name] = {"out_indices": list(override["out_indices"])}
        out_indices = override.get("out_indices", backbone.get("out_indices", shared.out_indices))
        # the task builds a throwaway backbone (random init, no file read) that is replaced by the shared
        cfg["backbone"] = {
            **backbone,
            "checkpoint": None,
            "arch_config": shared.arch_config.to_dict(),
            "out_indices": list(_normalize_indices(out_indices, shared.num_layers)),
            "freeze": False,
            "freeze_blocks": 0,
            "grad_checkpointing": False,
            "verbose": False,
        }
        cfg["freeze_backbone"] = False
        return cfg

    def init_components(self, filter_name: str) -> dict[str, nn.Module]:
        """The shared backbone, then each task's own parts (``tasks.<name>.model.<part>.``) for
        ``backbone+neck`` (necks) and ``all`` (necks and heads), each located on its own in the source."""
        out = super().init_components("backbone")
        if filter_name == "backbone":
            return out
        for name, sub in self.sub_tasks.items():
            for prefix, part in sub.init_components(filter_name).items():
                if prefix != f"model.{sub.backbone_prefix}":
                    out[f"model.tasks.{name}.{prefix}"] = part
        return out

    # -- the pieces ---------------------------------------------------------------------------------
    @property
    def task_names(self) -> list[str]:
        return list(self.model.tasks)

    @property
    def sub_tasks(self) -> dict[str, DenseTask]:
        return dict(self.model.tasks.items())

    @property
    def trainer(self) -> L.Trainer:
        return L.LightningModule.trainer.fget(self)

    @trainer.setter
    def trainer(self, trainer: L.Trainer | None) -> None:
        L.LightningModule.trainer.fset(self, trainer)
        model = self._modules.get("model")
        if model is not None:
            for sub in model.tasks.values():
                sub.trainer = trainer

    @property
    def data_config(self) -> dict[str, Any] | None:
        return getattr(self, "_data_config", None)

    @data_config.setter
    def data_config(self, value: dict[str, Any] | None) -> None:
        """The multi-task data config; each task gets its own member config (``datamodules.<task>``)."""
        self._data_config = value
        model = self._modules.get("model")
        if model is None:
            return
        members = (value or {}).get("datamodules") or {} if isinstance(value, dict) else {}
        for name, sub in model.tasks.items():
            sub.data_config = copy.deepcopy(members.get(name))

    def _log_for(self, task: str, name: str, value: Any, **kwargs: Any) -> None:
        """A sub-task's ``self.log``: ``val/mIoU`` of task ``seg`` → ``val/seg/mIoU`` here."""
        stage, sep, rest = name.partition("/")
        self.log(f"{stage}/{task}/{rest}" if sep else f"{task}/{name}", value, **kwargs)

    # -- one backbone pass for all tasks ------------------------------------------------------------
    def forward(self, images: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """``{task: B_t×3×H×W}`` → ``{task: that task's model outputs}``.

        One backbone pass over the concatenated batch when every task's padded images have the same
        size; otherwise one pass per task (warned once).
        """
        models = {name: self.model.tasks[name].model for name in images}
        padded = {name: models[name].pad_input(x) for name, x in images.items()}
        shapes = {tuple(x.shape[1:]) for x in padded.values()}
        if len(shapes) != 1:
            self.warn_once(
                "multi-task batches have different image sizes "
                f"({ {n: tuple(x.shape[-2:]) for n, x in padded.items()} }): one backbone pass per task "
                "(give every task the same crop size for a single shared pass)"
            )
            return {name: models[name](x) for name, x in images.items()}
        sizes = [len(x) for x in padded.values()]
        feats = self.backbone(
            torch.cat(list(padded.values())) if len(padded) > 1 else next(iter(padded.values()))
        )
        parts = {k: torch.split(v, sizes) for k, v in feats.items()}
        out = {}
        for i, name in enumerate(padded):
            task_feats = {k: parts[k][i] for k in self._feature_keys[name]}
            out[name] = models[name].decode(task_feats, padded[name].shape[-2:], images[name].shape[-2:])
        return out

    def check_batch(self, batch: dict[str, Any]) -> None:
        """Each task's host-side checks on its part of the training batch."""
        if isinstance(batch, dict):
            for name, sub in self.model.tasks.items():
                if batch.get(name) is not None:
                    sub.check_batch(batch[name])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        missing = [n for n in self.task_names if not isinstance(batch, dict) or batch.get(n) is None]
        if missing:
            have = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
            raise ValueError(f"the training batch has no data for task(s) {missing} (it has {have})")
        outs = self({name: batch[name]["image"] for name in self.task_names})
        total: torch.Tensor | float = 0.0
        for name in self.task_names:
            sub, sub_batch = self.model.tasks[name], batch[name]
            losses = _loss_fn(sub)(sub, sub_batch, outs[name])
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

    # -- data the tasks are trained on ----------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        names = getattr(dm, "task_names", None)
        if names is not None:
            check_task_data(self.task_names, list(names))
            self._loader_order = list(names)

    # -- evaluation: each task's own, one loader per task -------------------------------------------
    def _task_of_loader(self, dataloader_idx: int) -> DenseTask:
        if dataloader_idx >= len(self._loader_order):
            raise ValueError(
                f"evaluation loader {dataloader_idx} has no task: loaders are {self._loader_order} in order"
            )
        return self.model.tasks[self._loader_order[dataloader_idx]]

    def _set_predictions_dirs(self) -> None:
        for name, sub in self.sub_tasks.items():
            sub.predictions_dir = (
                Path(self.predictions_dir) / name if self.predictions_dir is not None else None
            )

    def on_validation_start(self) -> None:
        super().on_validation_start()
        self._set_predictions_dirs()

    def on_test_start(self) -> None:
        self._set_predictions_dirs()

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._task_of_loader(dataloader_idx).validation_step(batch, batch_idx)

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._task_of_loader(dataloader_idx).test_step(batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        for sub in self.sub_tasks.values():
            sub.on_validation_epoch_end()
        self.last_metrics = {name: dict(sub.last_metrics) for name, sub in self.sub_tasks.items()}

    def on_test_epoch_end(self) -> None:
        for sub in self.sub_tasks.values():
            sub.on_test_epoch_end()
        self.last_metrics = {name: dict(sub.last_metrics) for name, sub in self.sub_tasks.items()}

    def finalize_predictions(self, out_dir: Path) -> None:
        for name, sub in self.sub_tasks.items():
            sub.finalize_predictions(Path(out_dir) / name)

    def bind_data(self, datamodule: Any) -> None:
        members = getattr(datamodule, "datamodules", None)
        if members is None:
            raise ValueError(
                "a multi-task model evaluates on a MultiTaskDataModule (one data module per task)"
            )
        check_task_data(self.task_names, list(members))
        for name, sub in self.sub_tasks.items():
            sub.bind_data(members[name])

    # -- results -----------------------------------------------------------------------------------
    def summarize(self, metrics: dict[str, Any]) -> str:
        parts = []
        for name, sub in self.sub_tasks.items():
            if isinstance(metrics.get(name), dict):
                parts.append(
                    f"== {name} (loss weight {self.loss_weights[name]:g}) ==\n{sub.summarize(metrics[name])}"
                )
        return "\n".join(parts)

    def save_visualization(self, datamodule: Any, path: Path, num: int) -> Path | None:
        """``<stem>_<task><suffix>`` per task (each task's own picture); returns the first."""
        members = getattr(datamodule, "datamodules", {}) or {}
        written = []
        for name, sub in self.sub_tasks.items():
            if name not in members:
                continue
            out = sub.save_visualization(
                members[name], path.with_name(f"{path.stem}_{name}{path.suffix}"), num
            )
            if out is not None:
                written.append(out)
        for extra in written[1:]:
            print(f"predictions vs ground truth: {extra}")
        return written[0] if written else None

    def unused_parameter_reasons(self) -> list[str]:
        reasons = super().unused_parameter_reasons()
        for name, sub in self.sub_tasks.items():
            reasons += [f"{name}: {r}" for r in sub.unused_parameter_reasons() if r not in reasons]
        return reasons

    # -- checkpoints ---------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Self-describing: ``siglip_dense.task = "multitask"``, per-task meta under ``tasks``, and each
        task's resolved config (classes, depth range from the data) in ``hyper_parameters.tasks``."""
        super().on_save_checkpoint(checkpoint)
        hp = checkpoint["hyper_parameters"]
        task_cfgs, metas = {}, {}
        for name, sub in self.sub_tasks.items():
            sub_ckpt: dict[str, Any] = {"hyper_parameters": copy.deepcopy(dict(sub.hparams))}
            sub.on_save_checkpoint(sub_ckpt)
            sub_hp = sub_ckpt["hyper_parameters"]
            cfg = {"_target_": f"{type(sub).__module__}.{type(sub).__qualname__}"}
            cfg.update({k: v for k, v in sub_hp.items() if k not in (*TOP_LEVEL_KEYS, "backbone")})
            if name in self._backbone_overrides:
                cfg["backbone"] = dict(self._backbone_overrides[name])
            task_cfgs[name] = cfg
            meta = sub_ckpt["siglip_dense"]
            for key in ("arch", "arch_config", "mean", "std"):  # the same for all: kept once, at the top
                meta.pop(key, None)
            metas[name] = meta
        hp["tasks"] = task_cfgs
        hp["tasks_kwargs"] = None  # merged into the task configs above
        checkpoint["siglip_dense"]["tasks"] = metas
        checkpoint["siglip_dense"]["loss_weights"] = dict(self.loss_weights)

    def on_load_meta(self, meta: dict[str, Any]) -> None:
        super().on_load_meta(meta)
        for name, sub in self.sub_tasks.items():
            sub.on_load_meta((meta.get("tasks") or {}).get(name, {}))


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


def _check_reads_named_maps(name: str, task: DenseTask) -> None:
    """With a union of out_indices, heads/necks that read "all maps" (in_keys unset) would read extra ones."""
    for mod_name, module in task.model.named_modules():
        if mod_name.startswith("backbone"):
            continue
        if hasattr(module, "in_keys") and not module.in_keys:
            raise ValueError(
                f"tasks.{name}: {mod_name or 'model'} ({type(module).__name__}) reads all backbone maps "
                "(in_keys unset) but the shared backbone returns more blocks than this task asked for: "
                "set its in_keys"
            )


__all__ = ["LOSS_FNS", "MultiTask", "MultiTaskModel", "check_task_data"]
