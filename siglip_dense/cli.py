"""The command-line entry points: one Hydra app per job, behind both the console scripts and the shims.

Console scripts (``pyproject.toml``) and the repository's shims (``train.py``, ``tools/*.py``) call the
same functions here, so ``siglip-dense-train experiment=toy_seg`` == ``python train.py experiment=toy_seg``.

The configs are found wherever the package came from: in a source checkout (``PYTHONPATH`` or an
editable install) the repository's ``configs/``; in an installed wheel the copy shipped as package data
``siglip_dense.configs`` (``pyproject.toml`` maps it to ``configs/``), read through Hydra's ``pkg://``.
"""

from __future__ import annotations

import math
import os
import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

CONFIG_PACKAGE = "siglip_dense.configs"


def config_path() -> str:
    """Hydra ``config_path`` of the entry configs: the checkout's ``configs/`` or ``pkg://siglip_dense.configs``.

    The checkout wins when this module sits in one (next to ``pyproject.toml`` and ``configs/train.yaml``),
    so edits to ``configs/`` take effect without reinstalling.
    """
    root = Path(__file__).resolve().parents[1]
    if (root / "pyproject.toml").is_file() and (root / "configs" / "train.yaml").is_file():
        return str(root / "configs")
    return f"pkg://{CONFIG_PACKAGE}"


CONFIG_PATH = config_path()


def compose_config(config_name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """Compose an entry config (``train``, ``eval``, ``convert``, ...) as its app would, without running it.

    No Hydra job runs: ``hydra:`` interpolations (run directory) are not resolved in the result.
    """
    from hydra import compose, initialize_config_dir, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    if CONFIG_PATH.startswith("pkg://"):
        context = initialize_config_module(config_module=CONFIG_PACKAGE, version_base="1.3")
    else:
        context = initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3")
    with context:
        return compose(config_name, overrides=list(overrides))


def monitored_metric(
    cfg: DictConfig, metrics: Mapping[str, Any], logged: Mapping[str, float] | None = None
) -> float | None:
    """The value of ``cfg.monitor`` (``val/mIoU``, ``val/seg/mIoU``, ``train/loss``) after a run.

    What a Hydra sweeper (Optuna, Ax, Nevergrad) optimises, so a finished run always gives a float:
    the final validation's value; else (``train/loss``, a metric the final validation did not
    produce) its last logged value (``trainer.callback_metrics``, given as ``logged``), with a
    warning; a metric that is null (COCO ``bbox_APl`` without large objects) or absent from both is
    NaN, with a warning naming what there is. None when the run neither validated nor logged it
    (``validate=false``, ``fast_dev_run``).
    """
    if not cfg.get("monitor") or (not metrics and not logged):
        return None
    monitor = str(cfg.monitor)
    found, value, where = _final_value(monitor, metrics)
    if found and value is not None:
        return float(value)
    if found:
        warnings.warn(
            f"monitor={monitor} is null in the final metrics (undefined on this data): NaN", stacklevel=2
        )
        return math.nan
    if logged and monitor in logged:
        if metrics:
            warnings.warn(
                f"monitor={monitor} is not in the final validation's metrics: its last logged value",
                stacklevel=2,
            )
        return float(logged[monitor])
    if not metrics:
        return None
    have = sorted(logged or {})
    warnings.warn(
        f"monitor={monitor}: no {where!r} in the final metrics ({_keys(metrics)}), nor logged ({have}): NaN",
        stacklevel=2,
    )
    return math.nan


def _final_value(monitor: str, metrics: Mapping[str, Any]) -> tuple[bool, Any, str]:
    """``(found, value, the first missing part)`` of ``val/<task>/<metric>`` in nested final metrics."""
    parts = monitor.split("/")
    if parts[0] == "val" and parts[0] not in metrics:
        parts = parts[1:]
    value: Any = metrics
    for part in parts:
        if not isinstance(value, Mapping) or part not in value:
            return False, None, part
        value = value[part]
    return True, value, ""


def _keys(metrics: Mapping[str, Any]) -> list[str]:
    """The monitor names final metrics hold (``val/<task>/<metric>`` or ``val/<metric>``)."""
    out = []
    for key, value in metrics.items():
        if isinstance(value, Mapping):
            out += [f"val/{key}/{k}" for k, v in value.items() if not isinstance(v, Mapping)]
        else:
            out.append(f"val/{key}")
    return out


def upgrade_legacy_targets(cfg: DictConfig) -> list[tuple[str, str, str]]:
    """Rewrite, in ``cfg``, every ``_target_`` naming a class at its old path (``siglip_dense.legacy``).

    A user's recipe written before a module moved (``siglip_dense.data.datamodule.SegDataModule``)
    would otherwise fail with ``No module named ...``; each rewrite is warned as ``old -> new`` so
    the recipe can be updated. Returns ``(config key, old, new)`` per rewrite.
    """
    from omegaconf import OmegaConf

    from siglip_dense.legacy import LEGACY_TARGETS, TARGET_KEY

    found: list[tuple[list[Any], str]] = []

    def walk(node: Any, path: list[Any]) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                if key == TARGET_KEY and isinstance(value, str) and value in LEGACY_TARGETS:
                    found.append(([*path, key], value))
                else:
                    walk(value, [*path, key])
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, [*path, i])

    walk(OmegaConf.to_container(cfg, resolve=False), [])
    rewrites = []
    for path, old in found:
        parent: Any = cfg
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = LEGACY_TARGETS[old]
        where = ".".join(str(k) for k in path)
        warnings.warn(
            f"{where}: {old} moved to {LEGACY_TARGETS[old]}; using the new path (update the config)",
            FutureWarning,
            stacklevel=2,
        )
        rewrites.append((where, old, LEGACY_TARGETS[old]))
    return rewrites


def require(cfg: DictConfig, usage: str) -> None:
    """Exit with status 2 and ``usage`` when a mandatory (``???``) top-level key was not given."""
    from omegaconf import OmegaConf

    missing = [key for key in cfg if OmegaConf.is_missing(cfg, key)]
    if missing:
        print(f"error: missing {', '.join(f'{k}=...' for k in missing)}\nusage: {usage}", file=sys.stderr)
        sys.exit(2)


# -- data errors: the message, not the framework's traceback ---------------------------------------------
WORKER_MARKER = "Original Traceback"


def data_error_message(exc: BaseException) -> str | None:
    """The user-facing message of a :class:`~siglip_dense.data.io.DataError` in ``exc`` or its causes.

    A DataLoader worker's exception reaches the main process re-raised as the same type with the
    worker's whole traceback as its message (torch's ``ExceptionWrapper``); the original message is
    the text after its last ``DataError: ``. None when no DataError is involved.
    """
    from siglip_dense.data.io import DataError

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, DataError):
            text = str(current)
            if WORKER_MARKER in text and "DataError: " in text:
                text = text[text.rfind("DataError: ") + len("DataError: ") :]
            return text.strip()
        current = current.__cause__ or current.__context__
    return None


def report_data_errors(job: Any, cfg: DictConfig) -> Any:
    """Run ``job(cfg)``; a data error ends the process with status 1 and one clear line.

    The message (naming the file) goes to stderr as ``error: <message>`` and into the job's log
    (``train.log``); the traceback through Lightning and the DataLoader only with
    ``HYDRA_FULL_ERROR=1``, as Hydra's own errors.
    """
    import logging

    try:
        return job(cfg)
    except Exception as exc:
        message = data_error_message(exc)
        if message is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        logging.getLogger("siglip_dense").error(message)
        print(f"error: {message}\n(set HYDRA_FULL_ERROR=1 for the full traceback)", file=sys.stderr)
        sys.exit(1)


# -- train ----------------------------------------------------------------------------------------------
@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def train_app(cfg: DictConfig) -> float | None:
    """Train as ``cfg`` says; returns the monitored metric (see :func:`monitored_metric`)."""
    from siglip_dense.train import run_train

    def job(c: DictConfig) -> float | None:
        upgrade_legacy_targets(c)
        logged: dict[str, float] = {}
        return monitored_metric(c, run_train(c, logged), logged)

    return report_data_errors(job, cfg)


def train(argv: Sequence[str] | None = None) -> None:
    """``siglip-dense-train`` / ``python train.py``: DDP-rank and resume handling, then the Hydra app."""
    from siglip_dense.launch import argv_for_rank, argv_resuming_in_run_dir

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    sys.argv = argv_for_rank(sys.argv, os.environ)  # torchrun / srun: .hydra/ by rank 0 only
    sys.argv = argv_resuming_in_run_dir(sys.argv)  # ckpt_path=<run>/checkpoints/...: continue in <run>
    train_app()


# -- eval -----------------------------------------------------------------------------------------------
@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval")
def eval_app(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt_path``; returns the metrics (also written to ``metrics.json``)."""
    from siglip_dense.evaluate import run_eval

    require(cfg, "siglip-dense-eval ckpt_path=PATH [data.root=DIR] [save_predictions=true] [output_dir=DIR]")
    if cfg.get("zero_shot"):  # open vocabulary: ckpt_path is a SigLIP (2) image-text checkpoint
        from siglip_dense.openvocab.run import run_zero_shot_eval

        return report_data_errors(run_zero_shot_eval, cfg)
    upgrade_legacy_targets(cfg)
    return report_data_errors(run_eval, cfg)


def evaluate(argv: Sequence[str] | None = None) -> None:
    """``siglip-dense-eval`` / ``python tools/eval.py``."""
    from siglip_dense.launch import argv_for_rank

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    sys.argv = argv_for_rank(sys.argv, os.environ)
    eval_app()


# -- predict --------------------------------------------------------------------------------------------
@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="predict")
def predict_app(cfg: DictConfig) -> list[Path]:
    """Predict ``cfg.input`` (an image or a folder) into ``cfg.output``; returns the files written."""
    from siglip_dense.predict import run_predict

    require(cfg, "siglip-dense-predict ckpt_path=PATH input=IMAGE_OR_DIR output=DIR [device=cuda]")
    if cfg.get("classes") is not None:  # open vocabulary: ckpt_path is a SigLIP (2) image-text checkpoint
        from siglip_dense.openvocab.run import run_open_vocab_predict

        return report_data_errors(  # bad classes / open_vocab values: one line, not a traceback
            lambda c: run_open_vocab_predict(
                c.ckpt_path, c.input, c.output, c.classes, c.device, c.open_vocab
            ),
            cfg,
        )
    thr = cfg.get("score_threshold")
    return report_data_errors(lambda c: run_predict(c.ckpt_path, c.input, c.output, c.device, thr), cfg)


def predict(argv: Sequence[str] | None = None) -> None:
    """``siglip-dense-predict`` / ``python tools/predict.py``."""
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    predict_app()


# -- export ---------------------------------------------------------------------------------------------
@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="export")
def export_app(cfg: DictConfig) -> Path:
    """Export ``cfg.ckpt_path`` to ``cfg.out`` (model.safetensors + config.json); returns the folder."""
    from siglip_dense.checkpoints import export as export_checkpoint

    require(cfg, "siglip-dense-export ckpt_path=PATH out=DIR")
    out = export_checkpoint(cfg.ckpt_path, cfg.out)
    print(f"exported {cfg.ckpt_path} -> {out}")
    return out


def export(argv: Sequence[str] | None = None) -> None:
    """``siglip-dense-export`` / ``python tools/export.py``."""
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    export_app()


# -- convert --------------------------------------------------------------------------------------------
def _first(keys: list[str], n: int = 5) -> str:
    more = f", ... (+{len(keys) - n})" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def run_convert(cfg: DictConfig) -> int:
    """Convert ``cfg.src`` to ``cfg.out`` (``.safetensors`` + ``.json``); returns the exit status.

    A checkpoint that cannot be read prints ``error: <reason naming the file>`` to stderr and
    returns 1 (no traceback); an ``out`` not ending in ``.safetensors`` returns 2.
    """
    from siglip_dense.models.arch import match_timm_arch
    from siglip_dense.models.weights import CheckpointError, read_checkpoint, save_checkpoint

    require(cfg, "siglip-dense-convert src=SRC out=OUT.safetensors [img_size=N]")
    out = Path(str(cfg.out))
    if out.suffix != ".safetensors":
        print(f"error: out must end in .safetensors, got {out}", file=sys.stderr)
        return 2
    img_size = cfg.get("img_size")
    try:
        loaded = read_checkpoint(str(cfg.src), img_size=None if img_size is None else int(img_size))
        loaded.arch.arch = loaded.arch.arch or match_timm_arch(loaded.arch)
        save_checkpoint(out, loaded.state_dict, loaded.arch)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    a = loaded.arch
    print(f"read {loaded.path} ({loaded.source_format}): {len(loaded.state_dict)} tensors")
    print(
        f"arch {a.arch or 'custom'}: embed_dim={a.embed_dim} depth={a.depth} heads={a.num_heads} "
        f"mlp={a.mlp_dim} patch={a.patch_size} img_size={tuple(a.img_size)} eps={a.norm_eps} "
        f"act={a.act_layer} head={a.has_head} pos_resample={a.pos_resample}"
    )
    if loaded.guessed:
        print(f"guessed (not in the checkpoint): {', '.join(sorted(loaded.guessed))}")
    if loaded.dropped_keys:
        print(f"dropped {len(loaded.dropped_keys)} non-vision keys: {_first(loaded.dropped_keys)}")
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="convert")
def convert_app(cfg: DictConfig) -> int:
    """Convert a checkpoint; a failure exits with :func:`run_convert`'s status."""
    status = run_convert(cfg)
    if status:
        sys.exit(status)
    return status


def convert(argv: Sequence[str] | None = None) -> None:
    """``siglip-dense-convert src=SRC out=OUT.safetensors [img_size=N]``."""
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    convert_app()


def hydra_quote(value: str) -> str:
    """``value`` as a quoted Hydra override value (paths with spaces, ``=``, commas or brackets)."""
    # Hydra's rule: only backslashes before a quote (or the closing quote) are escapes
    escaped = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)
    escaped = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, escaped)
    return f"'{escaped}'"
