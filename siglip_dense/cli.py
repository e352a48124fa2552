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


# -- command-line mistakes: one line naming the argument, not Hydra's advice -----------------------------
HYDRA_FLAGS_WITHOUT_RUN = (
    "help",
    "hydra_help",
    "shell_completion",
    "info",
    "config_path",
    "experimental_rerun",
)


def command_line_error(config_name: str, args: Sequence[str]) -> str | None:
    """The one-line message for a command line Hydra refuses for an unknown key or an unreadable value.

    The config is composed as the app is about to compose it (Hydra's search path, ``--config-dir``
    included; sweeps are not expanded). Two mistakes get their own message:

    - a key the config does not define (``trainer.max_epoch=1``): Hydra's advice is ``+key=...``,
      which only adds a key no code reads; here it is the nearest valid key (``did you mean``), and the
      ``+`` form only for a Lightning Trainer argument when nothing is close;
    - an argument Hydra's override grammar cannot read (non-ASCII letters, parentheses or quotes in a
      path): the same argument, quoted so that it reads.

    Anything else (a missing config group option, a sweep in a single run, ...) gives None: Hydra
    reports it as usual.
    """
    parsed = _parse_hydra_args(args)
    if parsed is None or any(getattr(parsed, flag, None) for flag in HYDRA_FLAGS_WITHOUT_RUN):
        return None
    overrides = list(parsed.overrides)
    for i, arg in enumerate(overrides):
        message = _unreadable_override(arg, overrides[i - 1] if i else None)
        if message:
            return message
    return _unknown_key(parsed.config_name or config_name, overrides, parsed.config_dir)


def _parse_hydra_args(args: Sequence[str]) -> Any:
    """Hydra's own reading of the command line (flags and overrides); None where it would refuse it."""
    import contextlib
    import io

    from hydra._internal.utils import get_args_parser

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return get_args_parser().parse_args(list(args))
    except SystemExit:  # a bad flag: Hydra says so itself
        return None


def _unreadable_override(arg: str, previous: str | None = None) -> str | None:
    """How to quote ``arg`` when Hydra's override grammar cannot read it, else None.

    ``previous`` (the argument before) names the shell's split of an unquoted path with a space:
    ``data.root=/my data/ADE`` arrives as ``data.root=/my`` and ``data/ADE``.
    """
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        OverridesParser.create().parse_overrides([arg])
        return None
    except OverrideParseException:
        pass
    key, sep, value = arg.partition("=")
    if not sep:
        if previous is not None and "=" in previous:
            joined = shlex.quote(f"{previous} {arg}")
            return (
                f"cannot read the argument {arg!r}: arguments are key=value. If it is the rest of "
                f"{previous!r} (a path with a space), quote the whole argument for the shell: {joined}"
            )
        return f"cannot read the argument {arg!r}: arguments are key=value (Hydra's override grammar)"
    quoted = f"{key}={hydra_quote(value)}"
    shell = f'"{quoted}"' if not any(c in quoted for c in '"$`\\!') else shlex.quote(quoted)
    return (
        f"cannot read {arg} on the command line: Hydra needs quotes around a value with non-ASCII letters "
        f"or any of ( ) [ ] {{ }} ' \" = # ~ in it; write {shell} (the single quotes are for Hydra, "
        "the outer ones for the shell)"
    )


def _unknown_key(config_name: str, overrides: list[str], config_dir: str | None) -> str | None:
    """``unknown config key 'trainer.max_epoch' ...; did you mean 'trainer.max_epochs'?`` or None."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_automatic_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import ConfigCompositionException
    from hydra.types import RunMode

    search_path = create_automatic_config_search_path(None, None, CONFIG_PATH)
    if config_dir is not None:  # as Hydra adds --config-dir
        if not os.path.isdir(config_dir):
            return None
        directory = f"file://{os.path.abspath(config_dir)}"
        search_path.prepend(
            provider="command-line", path=directory, anchor=SearchPathQuery(provider="schema")
        )
    GlobalHydra.instance().clear()
    try:
        app = Hydra.create_main_hydra2(task_name=config_name, config_search_path=search_path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            app.compose_config(
                config_name, list(overrides), run_mode=RunMode.MULTIRUN, validate_sweep_overrides=False
            )
    except ConfigCompositionException as exc:
        return _unknown_key_message(exc)
    except Exception:  # noqa: BLE001 - anything else: Hydra reports it when the app composes
        return None
    finally:
        GlobalHydra.instance().clear()
    return None


def _unknown_key_message(exc: Exception) -> str | None:
    """The message of Hydra's ``Could not override 'x.y'`` (a missing key), with the nearest valid key.

    Under a ``_target_`` node, an argument of the target that the config does not list is a valid
    key too, added with a ``+`` (``+trainer.limit_val_batches=4``): offered only when no listed key
    is close.
    """
    import difflib

    from omegaconf import DictConfig
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    from siglip_dense.config_check import accepted_keys, unknown_key_message

    cause = exc.__cause__
    if not str(exc).startswith("Could not override") or not isinstance(
        cause, ConfigAttributeError | ConfigKeyError
    ):
        return None
    full_key = str(cause.full_key)
    path, _, key = full_key.rpartition(".")
    parent = cause.parent_node
    listed = [str(k) for k in parent if not str(k).startswith("_")] if isinstance(parent, DictConfig) else []
    message = unknown_key_message(key, path, listed, owner="the config")
    target = parent.get("_target_") if isinstance(parent, DictConfig) else None
    if "did you mean" in message or not isinstance(target, str):
        return message
    extra = sorted((accepted_keys(target) or set()) - set(listed))
    close = difflib.get_close_matches(key, extra, n=1, cutoff=0.6)
    where = f"{path}." if path else ""
    if close:
        return (
            f"unknown config key '{full_key}'; did you mean '+{where}{close[0]}'? ({target} takes it; "
            "the config does not list it, so it needs a '+')"
        )
    return message + f"; nor is it an argument of {target}"


def exit_on_command_line_error(config_name: str) -> None:
    """Exit with status 2 and one ``error:`` line for the mistakes :func:`command_line_error` names.

    ``HYDRA_FULL_ERROR=1`` leaves everything to Hydra (its message and traceback).
    """
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        return
    message = command_line_error(config_name, sys.argv[1:])
    if message:
        print(f"error: {message}", file=sys.stderr)
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


def log_once_to_console() -> None:
    """Lightning's INFO lines once, through the handlers Hydra gave the root logger (console + log file).

    ``import lightning`` gives its ``lightning`` logger a stderr handler of its own, and the records
    also propagate to the root logger, which Hydra's job logging prints on stdout and writes to the
    job's log: every line came out on both streams. Where the root logger has handlers, Lightning's
    own console handlers go and its loggers propagate.
    """
    import logging

    import lightning  # noqa: F401 - its handlers exist from the import on

    if not logging.getLogger().handlers:
        return
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)
        logger.propagate = True


# -- train ----------------------------------------------------------------------------------------------
@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def train_app(cfg: DictConfig) -> float | None:
    """Train as ``cfg`` says; returns the monitored metric (see :func:`monitored_metric`)."""
    from siglip_dense.train import run_train

    log_once_to_console()

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
    exit_on_command_line_error("train")
    train_app()


# -- eval -----------------------------------------------------------------------------------------------
@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval")
def eval_app(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt_path``; returns the metrics (also written to ``metrics.json``)."""
    from siglip_dense.evaluate import run_eval

    require(cfg, "siglip-dense-eval ckpt_path=PATH [data.root=DIR] [save_predictions=true] [output_dir=DIR]")
    log_once_to_console()
    if cfg.get("zero_shot"):  # open vocabulary: ckpt_path is a SigLIP (2) image-text checkpoint
        from siglip_dense.evaluate import check_output_dir
        from siglip_dense.openvocab.run import run_zero_shot_eval

        def zero_shot(c: DictConfig) -> dict[str, Any]:
            if c.get("output_dir"):  # as run_eval: refused before the work, not after it
                check_output_dir(Path(c.output_dir))
            return run_zero_shot_eval(c)

        return report_data_errors(zero_shot, cfg)
    upgrade_legacy_targets(cfg)
    return report_data_errors(run_eval, cfg)


def evaluate(argv: Sequence[str] | None = None) -> None:
    """``siglip-dense-eval`` / ``python tools/eval.py``."""
    from siglip_dense.launch import argv_for_rank

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    sys.argv = argv_for_rank(sys.argv, os.environ)
    exit_on_command_line_error("eval")
    eval_app()


# -- predict --------------------------------------------------------------------------------------------
@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="predict")
def predict_app(cfg: DictConfig) -> list[Path]:
    """Predict ``cfg.input`` (an image or a folder) into ``cfg.output``; returns the files written."""
    from siglip_dense.predict import run_predict

    require(cfg, "siglip-dense-predict ckpt_path=PATH input=IMAGE_OR_DIR output=DIR [device=cuda]")
    log_once_to_console()
    if cfg.get("classes") is not None:  # open vocabulary: ckpt_path is a SigLIP (2) image-text checkpoint
        from siglip_dense.openvocab.run import run_open_vocab_predict

        return report_data_errors(  # bad classes / open_vocab values: one line, not a traceback
            lambda c: run_open_vocab_predict(
                c.ckpt_path, c.input, c.output, c.classes, c.device, c.open_vocab
            ),
            cfg,
        )
    message = closed_set_checkpoint_error(str(cfg.ckpt_path))
    if message:
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    thr = cfg.get("score_threshold")
    return report_data_errors(lambda c: run_predict(c.ckpt_path, c.input, c.output, c.device, thr), cfg)


def closed_set_checkpoint_error(ckpt_path: str) -> str | None:
    """Why ``ckpt_path`` cannot be predicted without ``classes=``, in one line, or None when it can.

    A SigLIP (2) image-text checkpoint (a transformers / open_clip directory, or a hub id in the local
    cache) segments the class names it is given: without them there is nothing to predict. A path that
    does not exist is named too (the hub cache looked in included).
    """
    from siglip_dense.models.weights import CheckpointError, resolve_source
    from siglip_dense.openvocab.zeroshot import is_image_text_checkpoint

    try:
        path = resolve_source(ckpt_path)
        if path.is_dir() and is_image_text_checkpoint(path):
            return (
                f"ckpt_path={ckpt_path} is a SigLIP image-text checkpoint (open vocabulary): name the classes "
                "to segment, e.g. 'classes=[cat,sofa,window]'"
            )
    except CheckpointError as exc:
        return str(exc)
    return None


def predict(argv: Sequence[str] | None = None) -> None:
    """``siglip-dense-predict`` / ``python tools/predict.py``."""
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    exit_on_command_line_error("predict")
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
    exit_on_command_line_error("export")
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
    exit_on_command_line_error("convert")
    convert_app()


def hydra_quote(value: str) -> str:
    """``value`` as a quoted Hydra override value (paths with spaces, ``=``, commas or brackets)."""
    # Hydra's rule: only backslashes before a quote (or the closing quote) are escapes
    escaped = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)
    escaped = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, escaped)
    return f"'{escaped}'"
