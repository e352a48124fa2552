"""Trained models as files: read what a checkpoint is, rebuild its task, export it for deployment.

A Lightning checkpoint written by train.py carries ``checkpoint["siglip_dense"]`` (task, arch,
classes, mean/std, the data config) and hyper-parameters that rebuild the exact model, so nothing
here needs Hydra or the original pretrained weights. An export is ``model.safetensors`` (the model's
weights, nothing else) plus ``config.json`` (that same description).
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch

from siglip_dense.evaluation.deferred import defer_eval_checks

# task name stored in checkpoints -> "module:Class"
TASK_CLASSES: dict[str, str] = {
    "segmentation": "siglip_dense.tasks.segmentation:SegmentationTask",
    "depth": "siglip_dense.tasks.depth:DepthTask",
    "detection": "siglip_dense.tasks.detection:DetectionTask",
    "normals": "siglip_dense.tasks.normals:NormalsTask",
    "multitask": "siglip_dense.tasks.multitask:MultiTask",
}
EXPORT_FORMAT = "siglip_dense.export.v1"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class CheckpointFormatError(ValueError):
    """The file is not a siglip-dense checkpoint or export (the message names it)."""


def task_class(name: str) -> type[L.LightningModule]:
    if name not in TASK_CLASSES:
        raise CheckpointFormatError(f"unknown task {name!r}; known: {sorted(TASK_CLASSES)}")
    module, cls = TASK_CLASSES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def _load_ckpt(path: Path) -> dict[str, Any]:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised naming the file
        raise CheckpointFormatError(f"could not read checkpoint {path}: {e}") from e


_WHAT_LOADS = (
    f"a checkpoint written by siglip-dense's train.py (.ckpt) or an export directory ({WEIGHTS_FILE} + "
    f"{CONFIG_FILE}, tools/export.py)"
)


def _safetensors_format(path: Path) -> str | None:
    """The ``format`` a safetensors file's metadata records (None: none, or not readable)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format")
    except Exception:  # noqa: BLE001 - SafetensorError, OSError: the caller's error names the file
        return None


def checkpoint_location(path: str | Path) -> Path:
    """What ``path`` names as a task checkpoint: an export's ``model.safetensors`` is its directory.

    An export's weight file is only half of it (the hyper-parameters that rebuild the model are in
    the ``config.json`` beside it), so the file stands for the directory, which is what a user who
    passes it means.

    Raises:
        CheckpointFormatError: a safetensors file that is not an export's weights (a backbone weight
            file, a converted checkpoint), or an export's weights without their ``config.json``.
    """
    path = Path(path)
    if not (path.is_file() and path.suffix == ".safetensors"):
        return path
    if _safetensors_format(path) != EXPORT_FORMAT:
        raise CheckpointFormatError(
            f"{path} is a safetensors weight file, not a siglip-dense task checkpoint: pass {_WHAT_LOADS}; "
            f"backbone weights start a training run instead (train.py backbone.checkpoint={path})"
        )
    if not (path.parent / CONFIG_FILE).is_file():
        raise CheckpointFormatError(
            f"{path} holds the weights of a siglip-dense export, but {path.parent / CONFIG_FILE} (the "
            f"model's config) is missing: pass the export directory with both files, as tools/export.py "
            "writes it"
        )
    return path.parent


def read_meta(path: str | Path) -> dict[str, Any]:
    """The self-description of a Lightning checkpoint or an export (its directory or weight file)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    path = checkpoint_location(path)
    if path.is_dir():
        config = path / CONFIG_FILE
        if not config.is_file():
            raise CheckpointFormatError(
                f"{path} is a directory without {CONFIG_FILE}: not an export; pass {_WHAT_LOADS}"
            )
        described = json.loads(config.read_text())
        if not isinstance(described, dict) or "siglip_dense" not in described:
            raise CheckpointFormatError(
                f"{config} has no 'siglip_dense' entry: {path} is not a siglip-dense export; pass {_WHAT_LOADS}"
            )
        return described["siglip_dense"]
    ckpt = _load_ckpt(path)
    if not isinstance(ckpt, dict) or "siglip_dense" not in ckpt:
        keys = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointFormatError(
            f"{path} has no 'siglip_dense' entry (top-level keys: {keys}): expected {_WHAT_LOADS}; "
            f"backbone weights start a training run instead (train.py backbone.checkpoint={path})"
        )
    return ckpt["siglip_dense"]


def load_task(path: str | Path, map_location: str | torch.device = "cpu") -> L.LightningModule:
    """Rebuild the task of a Lightning checkpoint or an export (its directory or its
    ``model.safetensors``), weights loaded, eval mode."""
    path = Path(path)
    meta = read_meta(path)
    path = checkpoint_location(path)
    cls = task_class(meta["task"])
    with defer_eval_checks():  # a stored eval setting is checked where eval can override it
        task = _rebuild(cls, path, meta, map_location)
    return task.eval()


def _rebuild(
    cls: type[L.LightningModule], path: Path, meta: dict[str, Any], map_location: Any
) -> L.LightningModule:
    if path.is_dir():
        from safetensors.torch import load_file

        config = json.loads((path / CONFIG_FILE).read_text())
        task = cls(**config["hyper_parameters"])
        task.model.load_state_dict(load_file(str(path / WEIGHTS_FILE)), strict=True)
        task.on_load_meta(meta)
        task = task.to(map_location)
    else:
        task = cls.load_from_checkpoint(str(path), map_location=map_location, weights_only=True)
    return task


def export(ckpt_path: str | Path, out_dir: str | Path) -> Path:
    """``model.safetensors`` + ``config.json`` from a Lightning checkpoint (no optimizer state)."""
    from safetensors.torch import save_file

    ckpt_path, out_dir = Path(ckpt_path), Path(out_dir)
    ckpt = _load_ckpt(ckpt_path)
    if "siglip_dense" not in ckpt:
        raise CheckpointFormatError(f"{ckpt_path} is not a siglip-dense checkpoint")
    state = {
        k.removeprefix("model."): v.contiguous()
        for k, v in ckpt["state_dict"].items()
        if k.startswith("model.")
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_dir / WEIGHTS_FILE), metadata={"format": EXPORT_FORMAT})
    # safetensors writes through a private temporary file (mode 0600): give it a new file's mode
    chmod_as_new_file(out_dir / WEIGHTS_FILE)
    config = {
        "format": EXPORT_FORMAT,
        "siglip_dense": ckpt["siglip_dense"],
        "hyper_parameters": ckpt["hyper_parameters"],
        "source": str(ckpt_path),
    }
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return out_dir


def chmod_as_new_file(path: Path) -> None:
    """The mode ``open()`` gives a new file: 0666 minus the process umask (0644 under umask 022)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> L.LightningModule:
    """A ready model from a checkpoint or an export (its directory or its ``model.safetensors``), in
    eval mode; no Hydra needed.

    ``model.predict(images, score_threshold=None)`` takes paths, PIL images, numpy arrays or tensors,
    one or a batch, and returns per task the structures of :mod:`siglip_dense.predict`. SigLIP
    image-text checkpoints (zero-shot) go through :func:`siglip_dense.load_model`.
    """
    return load_task(path, map_location=device)


def check_same_backbone(src_meta: dict[str, Any], arch_config: dict[str, Any], src: str | Path) -> None:
    """Weights trained on one backbone variant must not be poured into another."""
    theirs = src_meta.get("arch_config")
    if not theirs:
        return
    keys = ("embed_dim", "depth", "num_heads", "mlp_dim", "patch_size")
    if any(theirs.get(k) != arch_config.get(k) for k in keys):
        a = {k: theirs.get(k) for k in keys}
        b = {k: arch_config.get(k) for k in keys}
        raise CheckpointFormatError(
            f"{src} was trained on backbone {src_meta.get('arch')} {a}; this run's backbone is "
            f"{arch_config.get('arch')} {b}: the weights cannot be reused across variants"
        )
