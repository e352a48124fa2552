"""The training job behind ``train.py``: compose data, task, trainer from a Hydra config and run."""

from __future__ import annotations

import json
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

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
    for name, cb_cfg in (cfg.get("callbacks") or {}).items():
        if cb_cfg is None or "_target_" not in cb_cfg:
            continue
        extra: dict[str, Any] = {}
        if name == "model_checkpoint":
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
    """The task's model sizes (classes) come from the data unless the config fixes them."""
    task_cfg = OmegaConf.to_container(cfg.task, resolve=True)
    from_data = datamodule.task_kwargs() if hasattr(datamodule, "task_kwargs") else {}
    # what the config fixes wins; everything else the task needs to know about the data comes from it
    extra = {k: v for k, v in from_data.items() if task_cfg.get(k) is None}
    if task_cfg.get("num_classes") is not None:
        extra.pop("class_names", None)
    return instantiate(task_cfg, _recursive_=False, _convert_="all", **extra)


def run_train(cfg: DictConfig) -> dict[str, Any]:
    """Train (and validate) as the config says; returns the final validation metrics."""
    out_dir = output_dir_of(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(int(cfg.seed), workers=True)

    datamodule = instantiate(cfg.data, _convert_="all")
    task = build_task(cfg, datamodule)
    if cfg.get("compile"):
        options = OmegaConf.to_container(cfg.get("compile_options") or {}, resolve=True)
        print(f"torch.compile {task.compile_backbone(**options)} with {options}")
    datamodule.mean, datamodule.std = tuple(task.mean), tuple(task.std)
    task.data_config = OmegaConf.to_container(cfg.data, resolve=True)

    callbacks = build_callbacks(cfg, out_dir)
    loggers = build_loggers(cfg, out_dir)
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, default_root_dir=str(out_dir)
    )
    save_run_info(cfg, out_dir)

    if cfg.get("train", True):
        trainer.fit(task, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))

    metrics: dict[str, Any] = {}
    if cfg.get("validate", True) and not trainer.fast_dev_run:
        ckpt = "best" if _has_best(trainer) else None
        trainer.validate(task, datamodule=datamodule, ckpt_path=ckpt, verbose=False)
        metrics = dict(task.last_metrics)
        if trainer.is_global_zero:
            write_results(task, datamodule, metrics, out_dir, int(cfg.get("num_vis", 6)))
    return metrics


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
