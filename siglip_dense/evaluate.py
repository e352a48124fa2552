"""The evaluation job behind ``tools/eval.py``: a checkpoint, its data (or other data), the metrics."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from siglip_dense.callbacks import SkippedSamples
from siglip_dense.checkpoints import load_task
from siglip_dense.data.io import DataError
from siglip_dense.tasks.module import DenseModule
from siglip_dense.train import output_dir_of


class OutputDirError(DataError):
    """An output folder the job cannot write, found before the work starts (the CLI prints one line)."""


def check_output_dir(path: Path, key: str = "output_dir") -> None:
    """Create ``path`` and write a file into it, so that an evaluation never runs only to lose its results.

    A real write, not ``os.access``: it also catches a read-only file system, a path under a regular
    file, and (as root) what permission bits alone would not tell.

    Raises:
        OutputDirError: naming ``key=path`` and the operating system's reason.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise OutputDirError(
            f"{key}={path} is not writable ({reason}); nothing was evaluated: pass a folder you can write, "
            f"{key}=DIR"
        ) from exc


def _data_group_chosen() -> bool:
    try:
        return HydraConfig.get().runtime.choices.get("data") is not None
    except ValueError:  # outside a Hydra app
        return False


def eval_data_config(cfg: DictConfig, task: DenseModule) -> dict[str, Any]:
    """``data=<name>`` picks a config; otherwise the checkpoint's own, with single keys overridden."""
    overrides = OmegaConf.to_container(cfg.get("data") or {}, resolve=True)
    if _data_group_chosen() or "_target_" in overrides:
        members = overrides.get("datamodules") or {}  # eval.yaml's all-null per-task placeholders: drop
        if not any(v is not None for keys in members.values() for v in (keys or {}).values()):
            overrides.pop("datamodules", None)
        return overrides
    if not task.data_config:
        raise ValueError(
            f"{cfg.ckpt_path} stores no data config (written before it was recorded?): "
            "pass data=<name> data.root=DIR"
        )
    data = dict(task.data_config)
    given = {k: v for k, v in overrides.items() if v is not None and k != "datamodules"}
    members = {
        str(name): {k: v for k, v in (keys or {}).items() if v is not None}
        for name, keys in (overrides.get("datamodules") or {}).items()
    }
    members = {name: keys for name, keys in members.items() if keys}
    if "datamodules" in data:
        return _override_members(data, given, members, cfg.ckpt_path)
    if members:
        raise ValueError(
            f"{cfg.ckpt_path} is a single-task checkpoint: override data.<key>, not "
            f"data.datamodules.{next(iter(members))}.*"
        )
    return _override(data, given)


def _override(data: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    if "root" in given and "toy" not in given:
        data["toy"] = False  # a real dataset at the new root, not generated toy scenes
    data.update(given)
    return data


def _override_members(
    data: dict[str, Any], given: dict[str, Any], members: dict[str, dict[str, Any]], ckpt: str
) -> dict[str, Any]:
    """A multi-task checkpoint's data config: ``data.datamodules.<name>.<key>`` overrides one member."""
    names = list(data["datamodules"])
    if "root" in given:
        raise ValueError(
            f"{ckpt} is a multi-task checkpoint (tasks {names}): set each task's dataset with "
            f"data.datamodules.<name>.root=DIR, e.g. data.datamodules.{names[0]}.root=DIR"
        )
    unknown = sorted(set(members) - set(names))
    if unknown:
        raise ValueError(f"data.datamodules.{unknown[0]}: {ckpt} has no task {unknown[0]!r}; tasks: {names}")
    data["datamodules"] = {
        name: _override(dict(member), members.get(name, {})) for name, member in data["datamodules"].items()
    }
    data.update(given)
    return data


def apply_detection_options(cfg: DictConfig, task: DenseModule) -> None:
    """``category_map`` (checkpoint id → data id) and ``test_protocol``: detection only."""
    mapping = cfg.get("category_map")
    protocol = cfg.get("test_protocol")
    if mapping is None and protocol is None:
        return
    if not hasattr(task, "set_category_map"):
        raise ValueError(
            f"category_map / test_protocol are detection options; {cfg.ckpt_path} is a {task.task_name} model"
        )
    if isinstance(mapping, str):
        mapping = yaml.safe_load(mapping)
    elif mapping is not None:
        mapping = OmegaConf.to_container(mapping, resolve=True)
    if mapping is not None and not isinstance(mapping, dict):
        raise ValueError(f"category_map must be a mapping {{checkpoint id: data id}}, got {mapping!r}")
    task.set_category_map(mapping)
    if protocol is not None:
        task.set_test_protocol(str(protocol))


def check_no_task_overrides(cfg: DictConfig) -> None:
    """The task comes from the checkpoint: a ``task.*`` override would be silently ignored, so refuse it."""
    task = cfg.get("task")
    if task is None:
        return
    keys, todo = [], [("task", OmegaConf.to_container(task) if isinstance(task, DictConfig) else task)]
    while todo:
        prefix, node = todo.pop()
        if isinstance(node, dict) and node:
            todo += [(f"{prefix}.{k}", v) for k, v in node.items()]
        else:
            keys.append(prefix)
    raise ValueError(
        f"{sorted(keys)[0]}: tools/eval.py takes the task from the checkpoint and applies no task.* override; "
        "set evaluation options with tta= (e.g. tta=flip) or the data with data.<key>="
    )


def run_eval(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt_path``; writes metrics.json (and predictions) and returns the metrics."""
    check_no_task_overrides(cfg)
    out_dir = Path(cfg.output_dir) if cfg.get("output_dir") else output_dir_of(cfg)
    check_output_dir(out_dir)  # before the work: results are never computed only to be lost
    task = load_task(cfg.ckpt_path)
    datamodule = instantiate(eval_data_config(cfg, task), _convert_="all")
    datamodule.mean, datamodule.std = tuple(task.mean), tuple(task.std)
    apply_detection_options(cfg, task)
    task.bind_data(datamodule)
    if cfg.get("tta") is not None:
        tta = cfg.tta if isinstance(cfg.tta, str) else OmegaConf.to_container(cfg.tta, resolve=True)
        task.set_tta(tta)
    if cfg.get("save_predictions"):
        task.predictions_dir = out_dir / "predictions"
    trainer: L.Trainer = instantiate(
        cfg.trainer, logger=False, enable_checkpointing=False, default_root_dir=str(out_dir)
    )
    # data.skip_bad=true: bad evaluation files are left out of the metrics (never replaced); then
    # metrics.json also holds ``skipped`` (their count) and ``skipped_files``, and SkippedSamples logs
    # one line ``skipped N of M samples in validation (evaluation; files: ...)`` (console, eval.log)
    skips = SkippedSamples()
    trainer.callbacks.append(skips)
    trainer.validate(task, datamodule=datamodule, verbose=False)
    metrics = dict(task.last_metrics)
    skipped = skips.totals.get("validation", (0, 0, []))
    if skipped[0]:  # only then: metrics.json of clean data keeps its keys
        metrics["skipped"], metrics["skipped_files"] = skipped[0], skipped[2]
    if trainer.is_global_zero:  # printed first: a failing write (disk full) still shows the numbers
        print(task.summarize({k: v for k, v in metrics.items() if not k.startswith("skipped")}), flush=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        print(f"metrics -> {out_dir / 'metrics.json'}")
        if cfg.get("save_predictions"):
            task.finalize_predictions(out_dir)
    return metrics
