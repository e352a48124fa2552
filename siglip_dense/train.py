"""The training job behind ``train.py``: compose data, task, trainer from a Hydra config and run."""

from __future__ import annotations

import json
import os
import platform
import signal
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, read_write

from siglip_dense.callbacks import GracefulRequeue, ProgressLog, RestoreLoaderStates, SkippedSamples
from siglip_dense.config_check import check_train_config

PACKAGES = ("siglip-dense", "torch", "torchvision", "lightning", "timm", "hydra-core", "albumentations")


def output_dir_of(cfg: DictConfig) -> Path:
    """The run directory: Hydra's, read once and passed explicitly (never ``os.getcwd()``)."""
    if cfg.get("paths") and cfg.paths.get("output_dir"):
        try:
            return Path(cfg.paths.output_dir)
        except Exception:  # noqa: BLE001 - outside a Hydra app the interpolation fails
            pass
    return Path(HydraConfig.get().runtime.output_dir)


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


@rank_zero_only
def save_run_info(cfg: DictConfig, out_dir: Path) -> None:
    """Resolved config, versions and seed next to the checkpoints (rank 0 only)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    info = {"seed": cfg.get("seed"), "versions": package_versions(), "argv": sys.argv}
    (out_dir / "run_info.json").write_text(json.dumps(info, indent=2))


def build_callbacks(cfg: DictConfig, out_dir: Path) -> list[L.Callback]:
    callbacks = []
    for cb_cfg in (cfg.get("callbacks") or {}).values():
        if cb_cfg is None or "_target_" not in cb_cfg:
            continue
        extra: dict[str, Any] = {}
        if issubclass(get_class(cb_cfg._target_), ModelCheckpoint):
            extra["dirpath"] = str(out_dir / "checkpoints")
        callbacks.append(instantiate(cb_cfg, **extra))
    return callbacks


def build_loggers(cfg: DictConfig, out_dir: Path) -> list[Any]:
    return [
        instantiate(lg, save_dir=str(out_dir))
        for lg in (cfg.get("logger") or {}).values()
        if lg is not None and "_target_" in lg
    ]


def build_task(cfg: DictConfig, datamodule: L.LightningDataModule) -> L.LightningModule:
    """The task's model sizes (classes) come from the data unless the config fixes them.

    A resumed fit (``train=true ckpt_path=...``) does not read ``init_from``: the checkpoint's weights
    replace it (the run it continues started from it), and the file need not exist any more.
    """
    task_cfg = OmegaConf.to_container(cfg.task, resolve=True)
    if cfg.get("train", True) and cfg.get("ckpt_path") and task_cfg.get("init_from"):
        rank_zero_info(f"init_from={task_cfg['init_from']} not read: resuming from ckpt_path={cfg.ckpt_path}")
        task_cfg["init_from"] = None
    from_data = datamodule.task_kwargs() if hasattr(datamodule, "task_kwargs") else {}
    # what the config fixes wins; everything else the task needs to know about the data comes from it
    extra = {k: v for k, v in from_data.items() if task_cfg.get(k) is None}
    if task_cfg.get("num_classes") is not None:
        extra.pop("class_names", None)
    return instantiate(task_cfg, _recursive_=False, _convert_="all", **extra)


def trainer_config(trainer_cfg: DictConfig, task: L.LightningModule) -> DictConfig:
    """The trainer config, with DDP's unused-parameter search on only where the task needs it.

    ``strategy: ddp`` assumes every trainable parameter gets a gradient each step (no per-step graph
    search); a task with a frozen-out or zero-weight branch names why it needs the search. An explicit
    strategy (a string other than ``ddp``, or a strategy object config) is left as the user wrote it.
    """
    reasons = task.unused_parameter_reasons() if hasattr(task, "unused_parameter_reasons") else []
    if trainer_cfg.get("strategy") != "ddp" or not reasons:
        return trainer_cfg
    rank_zero_info("DDP find_unused_parameters=True: " + "; ".join(reasons))
    cfg = trainer_cfg.copy()
    cfg.strategy = "ddp_find_unused_parameters_true"
    return cfg


def pin_hydra_job_for_ddp_children() -> None:
    """Make the processes Lightning's DDP launcher re-executes rerun exactly this Hydra job.

    The launcher re-runs ``sys.argv`` with ``hydra.run.dir=<hydra.run.dir>``. Inside a multirun
    (``-m a=1,2``) that would start a whole sweep in every child, in another directory. So within a
    sweep job the children get this job's own overrides (``a=1``) and its output directory:
    one run directory per trial, shared by all its ranks.
    """
    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.instance().cfg
    if hydra_cfg is None or hydra_cfg.hydra.mode != RunMode.MULTIRUN:
        return
    job_dir = hydra_cfg.hydra.runtime.output_dir
    with read_write(hydra_cfg.hydra.run):
        hydra_cfg.hydra.run.dir = job_dir
    sys.argv = [sys.argv[0], *hydra_cfg.hydra.overrides.task]


def progress_mode(cfg: DictConfig) -> str:
    """``cfg.progress``: ``bar`` (Lightning's progress bar), ``log`` (:class:`ProgressLog` lines) or
    ``auto`` (the bar on a terminal, lines when stdout is redirected: a batch job's log file)."""
    mode = str(cfg.get("progress", "auto"))
    if mode not in ("auto", "bar", "log"):
        raise ValueError(f"progress must be auto, bar or log, got {mode!r}")
    if mode == "auto":
        return "bar" if sys.stdout.isatty() else "log"
    return mode


def check_task_data_config(cfg: DictConfig) -> None:
    """A multi-task config has one data member per task and a task per data member.

    Checked on the unresolved config: otherwise a task whose data member was dropped
    (``'~data.datamodules.det'`` alone) fails as OmegaConf's ``InterpolationKeyError:
    'data.datamodules.det.image_size' not found``.

    Raises:
        ValueError: naming the tasks (``task.tasks``), the data members (``data.datamodules``) and
            the overrides that make them agree.
    """
    task, data = cfg.get("task"), cfg.get("data")
    tasks = task.get("tasks") if isinstance(task, DictConfig) else None
    members = data.get("datamodules") if isinstance(data, DictConfig) else None
    if not isinstance(tasks, DictConfig) or not isinstance(members, DictConfig):
        return
    task_names, data_names = [str(k) for k in tasks], [str(k) for k in members]
    no_data = [n for n in task_names if n not in data_names]
    no_task = [n for n in data_names if n not in task_names]
    if not (no_data or no_task):
        return
    fixes = []
    weights = task.get("loss_weights") or {}
    for name in no_data:
        drop = f"'~task.tasks.{name}'" + (f" '~task.loss_weights.{name}'" if name in weights else "")
        fixes.append(
            f"task {name} has no data: drop the task too ({drop}) or configure data.datamodules.{name}"
        )
    for name in no_task:
        fixes.append(
            f"data.datamodules.{name} has no task: drop it ('~data.datamodules.{name}') or add task.tasks.{name}"
        )
    raise ValueError(
        f"the tasks (task.tasks: {task_names}) and the data (data.datamodules: {data_names}) differ: "
        + "; ".join(fixes)
    )


def check_run_mode(cfg: DictConfig) -> None:
    """``train``, ``validate``, ``ckpt_path`` and ``init_from`` together must name one thing to do
    with one set of weights.

    Training starts from the config's weights (``init_from`` if set) or, with ``ckpt_path``, resumes
    that checkpoint (whose weights replace ``init_from``'s). ``train=false`` validates the weights
    named by exactly one of ``ckpt_path`` (a training checkpoint, as saved) or ``init_from`` (with
    ``init_from_filter=all``: the whole model).

    Raises:
        ValueError: one line naming the keys and the way out, for a ``ckpt_path`` that is exported
            weights (a folder or ``.safetensors``), and for ``train=false`` with ``validate=false``,
            with no weights, with both ``ckpt_path`` and ``init_from``, or with an
            ``init_from_filter`` that leaves parts of the model untrained.
    """
    ckpt = cfg.get("ckpt_path")
    if ckpt and (Path(str(ckpt)).is_dir() or str(ckpt).endswith(".safetensors")):
        raise ValueError(
            f"ckpt_path={ckpt} is exported weights, not a training checkpoint (.ckpt): ckpt_path resumes "
            f"or validates a run's checkpoint; use init_from={ckpt} to start from or validate these weights"
        )
    if cfg.get("train", True):
        return
    init = OmegaConf.select(cfg, "task.init_from", default=None)
    init_filter = OmegaConf.select(cfg, "task.init_from_filter", default="all")
    if not cfg.get("validate", True):
        raise ValueError(
            "train=false validate=false: nothing to do. Set train=true to train, or validate=true "
            "ckpt_path=<checkpoint> to evaluate one (or tools/eval.py ckpt_path=<checkpoint>)"
        )
    if ckpt and init:
        raise ValueError(
            f"train=false with ckpt_path={ckpt} and init_from={init}: name the weights to validate "
            "once (drop init_from= or ckpt_path=)"
        )
    if not ckpt and not init:
        raise ValueError(
            "train=false validate=true names no trained weights (the model would be validated as "
            "initialised): set ckpt_path=<checkpoint> (or tools/eval.py ckpt_path=<checkpoint>)"
        )
    if init and init_filter != "all":
        raise ValueError(
            f"train=false validates init_from={init}, but init_from_filter={init_filter} leaves the "
            "rest of the model untrained: set init_from_filter=all, or ckpt_path=<checkpoint>"
        )


def run_train(cfg: DictConfig, logged: dict[str, float] | None = None) -> dict[str, Any]:
    """Train (and validate) as the config says; returns the final validation metrics.

    ``logged``, when given, receives the last logged value of every scalar (Lightning's
    ``callback_metrics`` after fit, then after the final validation): ``train/loss`` and the like,
    which the returned validation metrics do not hold.
    """
    check_task_data_config(cfg)  # before anything resolves ${data.datamodules.<task>...}
    check_train_config(cfg)
    check_run_mode(cfg)
    out_dir = output_dir_of(cfg)
    launch_env = {k: os.environ.get(k) for k in LAUNCH_ENV_KEYS}
    if cfg.get("seed") is not None:
        L.seed_everything(int(cfg.seed), workers=True)

    datamodule = instantiate(cfg.data, _convert_="all")
    task = build_task(cfg, datamodule)
    if cfg.get("channels_last"):
        task.use_channels_last()
    if cfg.get("compile"):
        options = OmegaConf.to_container(cfg.get("compile_options") or {}, resolve=True)
        print(f"torch.compile {task.compile_backbone(**options)} with {options}")
    if hasattr(task, "check_monitor"):
        task.check_monitor(cfg.get("monitor"))  # now, not at the first validation after an epoch
    datamodule.mean, datamodule.std = tuple(task.mean), tuple(task.std)
    task.data_config = OmegaConf.to_container(cfg.data, resolve=True)

    requeue = GracefulRequeue()  # SLURM pre-emption: Lightning's requeue, at a batch boundary
    callbacks = [*build_callbacks(cfg, out_dir), RestoreLoaderStates(), requeue, SkippedSamples()]
    progress = progress_mode(cfg)
    extra: dict[str, Any] = {}
    if progress == "log":  # plain lines into train.log / stdout instead of a terminal progress bar
        callbacks.append(ProgressLog(cfg.get("progress_every_n_steps")))
        if cfg.trainer.get("enable_progress_bar") is None:
            extra["enable_progress_bar"] = False
    loggers = build_loggers(cfg, out_dir)
    trainer: L.Trainer = instantiate(
        trainer_config(cfg.trainer, task),
        callbacks=callbacks,
        logger=loggers or False,
        default_root_dir=str(out_dir),
        **extra,
    )
    save_run_info(cfg, out_dir)
    pin_hydra_job_for_ddp_children()

    if cfg.get("train", True):
        try:
            trainer.fit(task, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        except SIGTERMException as exc:
            raise SystemExit(stopped_by_signal(trainer, out_dir, requeue.signum)) from exc
        _record_logged(trainer, logged)

    metrics: dict[str, Any] = {}
    if cfg.get("validate", True) and not trainer.fast_dev_run:
        trainer.validate(
            task, datamodule=datamodule, ckpt_path=weights_to_validate(cfg, trainer), verbose=False
        )
        metrics = dict(task.last_metrics)
        _record_logged(trainer, logged)
        if trainer.is_global_zero:
            write_results(task, datamodule, metrics, out_dir, int(cfg.get("num_vis", 6)))
    end_process_group(trainer, launch_env)
    return metrics


def _record_logged(trainer: L.Trainer, logged: dict[str, float] | None) -> None:
    """Copy the trainer's last logged scalars into ``logged`` (a new stage resets them)."""
    if logged is not None:
        logged.update({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})


# what Lightning's DDP launcher writes into the launching process's environment
LAUNCH_ENV_KEYS = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def end_process_group(trainer: L.Trainer, launch_env: dict[str, str | None]) -> None:
    """Leave the process as a sweep's next trial needs it: no process group, launcher env undone.

    Otherwise the next trial reuses a group whose peers have exited, or (``LOCAL_RANK`` still set)
    believes its ranks were started externally and waits for children it never spawns.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        trainer.strategy.barrier("end_of_run")
        torch.distributed.destroy_process_group()
    for key, value in launch_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def stopped_by_signal(trainer: L.Trainer, out_dir: Path, signum: int | None = None) -> int:
    """Report a fit stopped by a signal; returns the exit status 128 + signal (SIGTERM unless given).

    Lightning stopped at a batch boundary and ``LastCheckpoint`` saved the state there. A non-zero
    status, so a scheduler does not read the run as finished.
    """
    signum = int(signum or signal.SIGTERM)
    last = out_dir / "checkpoints" / "last.ckpt"
    rank_zero_info(
        f"Stopped by {signal.Signals(signum).name} at epoch {trainer.current_epoch}, step "
        f"{trainer.global_step}; state saved in {last}. Resume exactly with: "
        f"python train.py <same arguments> ckpt_path={last}"
    )
    return 128 + signum


def weights_to_validate(cfg: DictConfig, trainer: L.Trainer) -> str | None:
    """The checkpoint the final validation loads: after training the best-k callback's file (by
    path: ``"best"`` warns that there are two ModelCheckpoints), else the weights in memory; without
    training ``ckpt_path`` (:func:`check_run_mode`: else ``init_from``'s weights, in memory)."""
    if not cfg.get("train", True):
        return cfg.get("ckpt_path") or None
    return trainer.checkpoint_callback.best_model_path if _has_best(trainer) else None


def _has_best(trainer: L.Trainer) -> bool:
    cb = trainer.checkpoint_callback
    return bool(cb is not None and getattr(cb, "best_model_path", ""))


def write_results(
    task: L.LightningModule,
    datamodule: L.LightningDataModule,
    metrics: dict[str, Any],
    out_dir: Path,
    num_vis: int,
) -> None:
    """metrics.json, the console summary and a picture of predictions vs ground truth."""
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(task.summarize(metrics))
    print(f"metrics -> {out_dir / 'metrics.json'}")
    if num_vis > 0:
        path = task.save_visualization(datamodule, out_dir / "predictions.png", num_vis)
        if path is not None:
            print(f"predictions vs ground truth: {path}")
