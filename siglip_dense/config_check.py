"""Strict configs: a key the code does not know is an error naming it, not a silently ignored value.

Hydra's struct mode rejects unknown keys given on the command line, but an experiment file is merged
into the config as it is: a misspelt ``task: {layer_dacay: 0.5}`` would land in the config, be passed
nowhere (or swallowed) and the run would train with the default. :func:`check_train_config` closes
that hole for the composed ``train.yaml`` config before anything is built:

- every node with a ``_target_`` may hold only keys its callable accepts (read from its signature;
  callables taking ``**kwargs`` are open, except where :data:`FORWARDED` names where they go);
- a top-level key must be one ``train.yaml`` defines (its own keys and its config groups), or a
  recipe variable that some value interpolates (``res: 384`` used as ``${res}``).
"""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Callable, Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf

# callables whose ``**kwargs`` are passed on to another callable: their keys are that one's parameters
FORWARDED: dict[str, str] = {
    "siglip_dense.tasks.base.warmup_schedule": "siglip_dense.tasks.base.lr_lambda",
}
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
_INTERPOLATED = re.compile(r"\$\{([A-Za-z_][\w]*)")


class ConfigKeyError(ValueError):
    """A config key that no code reads (the message names it and the nearest valid key)."""


def unknown_key_message(key: str, path: str, valid: Iterable[str], owner: str) -> str:
    """``unknown key 'task.layer_dacay' ...; did you mean 'task.layer_decay'?`` (difflib's nearest)."""
    valid = sorted(set(valid))
    where = f"{path}.{key}" if path else key
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f"; did you mean '{(path + '.') if path else ''}{close[0]}'?" if close else ""
    shown = ", ".join(valid[:40]) + (" ..." if len(valid) > 40 else "")
    return f"unknown config key '{where}' ({owner} has no such setting){hint} Valid keys: {shown}"


def check_option_keys(options: Mapping[str, Any] | None, valid: Iterable[str], path: str, owner: str) -> None:
    """A dict option without ``_target_`` (``task.eval``, ``task.loss``) holds only keys its code reads.

    Raises:
        ConfigKeyError: naming the first unknown key as ``<path>.<key>`` and the nearest valid one.
    """
    valid = set(valid)
    for key in options or {}:
        if key not in valid:
            raise ConfigKeyError(unknown_key_message(str(key), path, valid, owner))


def option_keys_of(target: str) -> dict[str, set[str]]:
    """``{parameter: valid keys}`` for the dict parameters of ``target`` that declare them.

    A class declares them with a ``option_keys()`` classmethod (the tasks: their DEFAULT_EVAL,
    DEFAULT_LOSS, detector options); anything else declares none.
    """
    try:
        fn = get_method(target)
    except (ImportError, AttributeError, ValueError):
        return {}
    declared = getattr(fn, "option_keys", None)
    return {k: set(v) for k, v in declared().items()} if callable(declared) else {}


def accepted_keys(target: str) -> set[str] | None:
    """The keyword arguments ``target`` accepts; ``None`` when it takes arbitrary ``**kwargs``."""
    try:
        fn: Callable[..., Any] = get_method(target)
        params = inspect.signature(fn).parameters.values()
    except (ValueError, TypeError, ImportError, AttributeError):
        return None  # no introspectable signature (builtins, C types): nothing to check against
    keys = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if any(p.kind == p.VAR_KEYWORD for p in params):
        if target not in FORWARDED:
            return None
        forwarded = accepted_keys(FORWARDED[target])
        if forwarded is None:
            return None
        keys |= forwarded
    return keys


def check_targets(node: Any, path: str = "") -> None:
    """Every ``_target_`` node (at any depth) holds only keys its callable accepts.

    Raises:
        ConfigKeyError: naming the first unknown key by its full dotted path.
    """
    if isinstance(node, Mapping):
        target = node.get("_target_")
        if isinstance(target, str) and "${" not in target:
            valid = accepted_keys(target)
            if valid is not None:
                for key in node:
                    if not str(key).startswith("_") and key not in valid:
                        raise ConfigKeyError(unknown_key_message(str(key), path, valid, target))
            for param, keys in option_keys_of(target).items():
                options = node.get(param)
                if isinstance(options, Mapping) and "_target_" not in options:
                    where = f"{path}.{param}" if path else param
                    check_option_keys(options, keys, where, target)
        for key, value in node.items():
            check_targets(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            check_targets(value, f"{path}[{i}]")


def primary_config_file(config_name: str = "train") -> Path:
    """The entry config file Hydra composed (its search path's first match), else the repo's own."""
    try:
        from hydra.core.hydra_config import HydraConfig

        sources = HydraConfig.get().runtime.config_sources
        for source in sources:
            if source.schema in ("file", "pkg"):  # pkg: an installed wheel's siglip_dense.configs
                base = source.path if source.schema == "file" else str(resources.files(source.path))
                candidate = Path(base) / f"{config_name}.yaml"
                if candidate.is_file():
                    return candidate
    except (ValueError, AttributeError, ModuleNotFoundError):  # outside a Hydra app
        pass
    return CONFIG_DIR / f"{config_name}.yaml"


def defined_top_level_keys(config_file: Path) -> set[str]:
    """Keys the entry config defines itself plus the groups its defaults list composes."""
    raw = OmegaConf.to_container(OmegaConf.load(config_file), resolve=False)
    assert isinstance(raw, dict)
    keys = {str(k) for k in raw if k != "defaults"}
    for entry in raw.get("defaults") or []:
        if isinstance(entry, Mapping):
            for group in entry:
                name = str(group).split("@")[-1].removeprefix("override ").strip("/")
                keys.add(name.split("/")[0])
    return keys | {"hydra"}


def interpolated_names(node: Any) -> set[str]:
    """Top-level names referenced as ``${name...}`` anywhere in the (unresolved) config."""
    if isinstance(node, Mapping):
        return set().union(*(interpolated_names(v) for v in node.values())) if node else set()
    if isinstance(node, list):
        return set().union(*(interpolated_names(v) for v in node)) if node else set()
    if isinstance(node, str):
        return set(_INTERPOLATED.findall(node))
    return set()


def check_top_level(raw: Mapping[str, Any], config_file: Path) -> None:
    """A top-level key ``train.yaml`` does not define is a typo unless some value interpolates it."""
    valid = defined_top_level_keys(config_file)
    used = interpolated_names(raw)
    for key in raw:
        if key not in valid and key not in used:
            raise ConfigKeyError(
                unknown_key_message(str(key), "", valid, f"the top-level config ({config_file.name})")
            )


def compile_option_keys() -> set[str]:
    """What ``compile_options`` may hold: ``torch.compile``'s keyword arguments (its model is ours)."""
    import torch

    return set(inspect.signature(torch.compile).parameters) - {"model"}


def check_section_keys(raw: Mapping[str, Any], config_file: Path) -> None:
    """``paths`` holds only the keys ``configs/paths`` defines; ``compile_options`` only torch.compile's."""
    paths = raw.get("paths")
    if isinstance(paths, Mapping):
        defined = OmegaConf.to_container(OmegaConf.load(config_file.parent / "paths" / "default.yaml"))
        assert isinstance(defined, dict)
        check_option_keys(paths, defined, "paths", "configs/paths/default.yaml")
    options = raw.get("compile_options")
    if isinstance(options, Mapping):
        check_option_keys(options, compile_option_keys(), "compile_options", "torch.compile")


def check_train_config(cfg: DictConfig, config_name: str = "train") -> None:
    """Refuse keys no code reads, in the composed train config (call first in ``run_train``).

    Raises:
        ConfigKeyError: naming the key (full dotted path) and the nearest valid one.
    """
    raw = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(raw, dict)
    config_file = primary_config_file(config_name)
    check_top_level(raw, config_file)
    if (config_file.parent / "paths" / "default.yaml").is_file():
        check_section_keys(raw, config_file)
    else:  # an entry config elsewhere (tests, user dirs): the repository's paths group
        check_section_keys(raw, CONFIG_DIR / "train.yaml")
    check_targets(raw)
