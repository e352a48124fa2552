"""Multi-task training: one shared SigLIP 2 backbone feeding several tasks' components.

:class:`MultiTask` is a :class:`~siglip_dense.tasks.module.DenseModule` with several entries: each
``tasks.<name>`` is an existing single-task config (``_target_`` SegmentationTask, DepthTask or
DetectionTask with its neck, head, loss and evaluation protocol), built as that task's component on
the ONE shared backbone. A training batch is ``{task: batch}``; tasks whose padded images have the
same size share one backbone pass, the others (detection always) run their own pass through the same
backbone. The loss is ``Σ loss_weights[t] · loss_t``. Validation has one loader per task; each task
computes its own metrics, logged as ``val/<task>/<metric>``; ``last_metrics`` is
``{task: {metric: value}}``.

Checkpoints hold the shared backbone once (``model.backbone.*``); the tasks' networks live under
``model.tasks.<task>.model.*``.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

from hydra.utils import get_class

from siglip_dense.models.backbone import SigLIP2Backbone
from siglip_dense.tasks.component import TaskComponent
from siglip_dense.tasks.module import DenseModule, check_task_data

# keys that belong to the multi-task module: the same keys in a member config are not used
TOP_LEVEL_KEYS = ("optimizer", "scheduler", "layer_decay", "freeze_backbone", "init_from", "init_from_filter")


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


class MultiTask(DenseModule):
    """Several dense tasks on one backbone, trained together with per-task loss weights.

    Args:
        backbone: the shared backbone config (as every task config has it).
        tasks: ``{name: task config}`` (``_target_`` + the task's own keys, e.g. the existing
            ``seg_upernet`` / ``depth_dpt`` / ``det_mask_rcnn`` configs). A task's ``backbone`` may
            only differ from the shared one in ``out_indices`` (the shared backbone returns the
            union). The keys in ``TOP_LEVEL_KEYS`` (optimizer, schedule, layer decay, freezing,
            init_from) are this module's; the same keys in a task config must agree or be absent.
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
        bad = {n: float(w) for n, w in weights.items() if not float(w) >= 0}
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
        self._member_classes: dict[str, type[DenseModule]] = {}
        self._member_hparams: dict[str, dict[str, Any]] = {}
        indices = {
            name: self._member_indices(name, tasks[name], backbone, shared, init_from) for name in names
        }
        union = tuple(sorted(set().union(*indices.values())))
        components: dict[str, TaskComponent] = {}
        for name in names:
            keys = [f"blocks.{i}" for i in indices[name]]
            extra = {k: v for k, v in ((tasks_kwargs or {}).get(name) or {}).items()}
            components[name] = self._build_member(name, tasks[name], extra, shared, keys)
        if union != tuple(shared.out_indices):
            shared.out_indices = union
        for name, component in components.items():
            if indices[name] != union:
                _check_reads_named_maps(name, component)
        self.attach(
            components,
            multitask=True,
            loss_weights=weights,
            backbone=shared,
            feature_keys={n: [f"blocks.{i}" for i in idx] for n, idx in indices.items()},
        )
        self.finish_init(freeze_backbone, init_from, init_from_filter)

    # -- construction helpers ---------------------------------------------------------------------
    def _member_indices(
        self,
        name: str,
        cfg: Any,
        backbone: dict[str, Any],
        shared: SigLIP2Backbone,
        init_from: str | None,
    ) -> tuple[int, ...]:
        """Check a member config against the shared settings; the backbone blocks it reads."""
        if not isinstance(cfg, dict) or "_target_" not in cfg:
            raise ValueError(f"tasks.{name} must be a task config with a _target_, got {cfg!r}")
        sub_init = cfg.get("init_from")
        if sub_init is not None and sub_init != init_from:
            raise ValueError(
                f"tasks.{name}.init_from={sub_init!r}: init_from applies to the whole multi-task model; "
                "set it at the top level (it reads the shared backbone from any task's checkpoint)"
            )
        override = dict(cfg.get("backbone") or {})
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
        return _normalize_indices(out_indices, shared.num_layers)

    def _build_member(
        self,
        name: str,
        cfg: dict[str, Any],
        extra: dict[str, Any],
        shared: SigLIP2Backbone,
        out_keys: list[str],
    ) -> TaskComponent:
        """Member ``name``'s component on the shared backbone, from its single-task config."""
        cls = get_class(str(cfg["_target_"]))
        if not (isinstance(cls, type) and issubclass(cls, DenseModule)) or cls.component_class is None:
            raise ValueError(
                f"tasks.{name}: {cfg['_target_']} is not a single-task module (SegmentationTask, "
                "DepthTask or DetectionTask)"
            )
        kwargs = {k: v for k, v in copy.deepcopy(dict(cfg)).items() if k not in ("_target_", "backbone")}
        for key in TOP_LEVEL_KEYS:
            kwargs.pop(key, None)
        # what the task config fixes wins; the rest comes from the data (as train.py's build_task)
        extra = {k: v for k, v in extra.items() if kwargs.get(k) is None}
        if kwargs.get("num_classes") is not None:
            extra.pop("class_names", None)
        kwargs.update(extra)
        accepted = _constructor_defaults(cls)
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise ValueError(f"tasks.{name}: {cls.__name__} has no argument(s) {unknown}")
        self._member_classes[name] = cls
        self._member_hparams[name] = {**accepted, **kwargs}
        return cls.component_class.build(shared, **kwargs, out_keys=out_keys)

    # -- checkpoints ---------------------------------------------------------------------------------
    def save_task_configs(self, hparams: dict[str, Any], meta: dict[str, Any]) -> None:
        """Self-describing: per-task meta under ``tasks``, and each task's resolved config (classes,
        depth range from the data) in ``hyper_parameters.tasks``."""
        task_cfgs, metas = {}, {}
        for name, component in self.components.items():
            cls = self._member_classes[name]
            cfg: dict[str, Any] = {"_target_": f"{cls.__module__}.{cls.__qualname__}"}
            cfg.update(copy.deepcopy(self._member_hparams[name]))
            component.update_hparams(cfg)
            if name in self._backbone_overrides:
                cfg["backbone"] = dict(self._backbone_overrides[name])
            task_cfgs[name] = cfg
            metas[name] = {
                "task": component.kind,
                **component.meta(),
                "data": copy.deepcopy(component.data_config),
            }
        hparams["tasks"] = task_cfgs
        hparams["tasks_kwargs"] = None  # merged into the task configs above
        meta["tasks"] = metas
        meta["loss_weights"] = dict(self.loss_weights)


def _constructor_defaults(cls: type) -> dict[str, Any]:
    """A single-task module's component arguments and their defaults (its ``__init__`` minus the
    backbone and the multi-task module's own keys)."""
    out = {}
    for p in inspect.signature(cls.__init__).parameters.values():
        if p.name in ("self", "backbone", *TOP_LEVEL_KEYS) or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        out[p.name] = None if p.default is inspect.Parameter.empty else copy.deepcopy(p.default)
    return out


def _check_reads_named_maps(name: str, component: TaskComponent) -> None:
    """With a union of out_indices, heads/necks that read "all maps" (in_keys unset) would read extra ones."""
    for mod_name, module in component.model.named_modules():
        if mod_name.startswith(component.backbone_path):
            continue
        if hasattr(module, "in_keys") and not module.in_keys:
            raise ValueError(
                f"tasks.{name}: {mod_name or 'model'} ({type(module).__name__}) reads all backbone maps "
                "(in_keys unset) but the shared backbone returns more blocks than this task asked for: "
                "set its in_keys"
            )


__all__ = ["TOP_LEVEL_KEYS", "MultiTask", "check_task_data"]
