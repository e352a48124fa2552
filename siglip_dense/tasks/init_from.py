"""init_from: start a run from another checkpoint's weights, component by component.

Each component this model asks for (backbone, neck, heads) is found in the source under whatever
key prefix it has there (a Lightning checkpoint of any task, a multi-task checkpoint, an export),
copied where shapes agree (position tables resampled by the caller's rule) and reported. Parts the
file does not hold stay as built (a new task's heads); the backbone must come whole unless allowed.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from siglip_dense.models.weights import key_groups

INIT_FILTERS = ("backbone", "backbone+neck", "all")


# ---------------------------------------------------------------------------------------------
# init_from: start a run from another checkpoint's weights
# ---------------------------------------------------------------------------------------------
@dataclass
class InitReport:
    source: str
    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # in the checkpoint, filtered out or unknown here
    mismatched: list[str] = field(default_factory=list)  # same name, other shape: re-initialised
    resampled: list[str] = field(default_factory=list)  # position tables resampled to this grid
    missing: list[str] = field(default_factory=list)  # here, absent from the checkpoint
    absent: list[str] = field(default_factory=list)  # components (key prefixes) the file does not hold

    def __str__(self) -> str:
        def head(keys: list[str]) -> str:
            return ", ".join(keys[:6]) + (" ..." if len(keys) > 6 else "")

        lines = [f"init_from {self.source}: loaded {len(self.loaded)} tensors"]
        if self.resampled:
            lines.append(
                f"  resampled (source's position-table rule) {len(self.resampled)}: {head(self.resampled)}"
            )
        if self.mismatched:
            lines.append(f"  re-initialised (shape differs) {len(self.mismatched)}: {head(self.mismatched)}")
        if self.absent:
            lines.append(f"  components not in checkpoint (kept fresh): {', '.join(self.absent)}")
        if self.missing:
            lines.append(f"  not in checkpoint (kept fresh) {len(self.missing)}: {head(self.missing)}")
        if self.skipped:
            lines.append(f"  skipped from checkpoint {len(self.skipped)}: {head(self.skipped)}")
        return "\n".join(lines)


class IncompleteInitError(ValueError):
    """init_from would leave part of the backbone random (the message names the file and the keys)."""


def check_complete(
    report: InitReport, prefixes: tuple[str, ...], filter_name: str, allow: bool = False
) -> None:
    """Raise (``allow``: warn) when tensors under ``prefixes`` were not loaded (absent from the file,
    or re-initialised because their shape differs); their blocks are named, as is the way out."""
    if not prefixes:
        return
    mismatched = [m.split(" ")[0] for m in report.mismatched]
    left = [k for k in report.missing + mismatched if k.startswith(prefixes)]
    if not left:
        return
    prefix = next(p for p in prefixes if left[0].startswith(p))
    groups = key_groups(k[len(prefix) :] for k in left if k.startswith(prefix))
    shown = ", ".join(groups[:8]) + (f", ... (+{len(groups) - 8})" if len(groups) > 8 else "")
    what = (
        f"init_from {report.source} (init_from_filter={filter_name}) does not hold {len(left)} tensors of "
        f"this model's backbone under '{prefix}' ({shown})"
    )
    if allow:
        warnings.warn(f"{what}: kept random (backbone.strict=false)", stacklevel=3)
        return
    raise IncompleteInitError(
        f"{what}: they would stay random. Start from a checkpoint with the whole backbone, or allow a "
        "partly random backbone with +backbone.strict=false"
    )


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Model weights from any artefact the project writes, keys as stored.

    A Lightning checkpoint (``state_dict``, keys ``model.*``), a ``tools/export.py`` directory (its
    ``model.safetensors``) or that exported ``model.safetensors`` (keys without ``model.``).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"init_from checkpoint not found: {path}")
    if path.is_dir():
        if not (path / "model.safetensors").is_file():
            raise FileNotFoundError(
                f"init_from {path} is a directory without model.safetensors: not an export"
            )
        path = path / "model.safetensors"
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"could not read checkpoint {path}: {e}") from e
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds no state_dict")
    return state


def filter_prefixes(
    filter_name: str, backbone_prefix: str = "model.backbone.", neck_prefix: str = "model.neck."
) -> tuple[str, ...]:
    """This model's key prefixes that ``init_from_filter`` selects."""
    if filter_name not in INIT_FILTERS:
        raise ValueError(f"init_from_filter must be one of {INIT_FILTERS}, got {filter_name!r}")
    if filter_name == "backbone":
        return (backbone_prefix,)
    if filter_name == "backbone+neck":
        return (backbone_prefix, neck_prefix)
    return ("",)


def find_source_prefix(src: dict[str, torch.Tensor], rel_keys: list[str], own_prefix: str) -> str | None:
    """Where the source keeps a component whose keys (relative to it) are ``rel_keys``.

    Tasks keep the backbone under different prefixes (``model.backbone.``, detection's
    ``model.backbone.body.``, an export's ``backbone.``): every source prefix ``P`` under which a few
    anchor keys appear is a candidate; the one holding most of ``rel_keys`` wins (ties: this model's
    own prefix, else the shortest). ``None``: the source has no such component.
    """
    candidates: set[str] = set()
    for anchor in rel_keys[:3]:
        for key in src:
            if key.endswith(anchor) and (len(key) == len(anchor) or key[-len(anchor) - 1] == "."):
                candidates.add(key[: len(key) - len(anchor)])
    if not candidates:
        return None
    score = {p: sum(p + k in src for k in rel_keys) for p in candidates}
    return max(candidates, key=lambda p: (score[p], p == own_prefix, -len(p)))


def split_components(module: nn.Module, prefix: str, taken: set[str]) -> dict[str, nn.Module]:
    """``module``'s children by key prefix, descending into those that contain a ``taken`` prefix.

    With ``taken`` = the backbone and neck prefixes this yields the remaining parts (heads, RPN,
    RoI heads, extra pyramid levels), each a component :func:`init_from_checkpoint` locates on its own.
    """
    out: dict[str, nn.Module] = {}
    for name, child in module.named_children():
        child_prefix = f"{prefix}{name}."
        if child_prefix in taken:
            continue
        if any(t.startswith(child_prefix) for t in taken):
            out.update(split_components(child, child_prefix, taken))
        elif any(True for _ in child.state_dict()):
            out[child_prefix] = child
    return out


def source_layout(src: dict[str, torch.Tensor]) -> list[str]:
    """The first two key levels of a state dict (error messages show what a file holds)."""
    return sorted({".".join(k.split(".")[:2]) + "." for k in src})[:12]


def init_from_checkpoint(
    module: nn.Module,
    path: str | Path,
    filter_name: str = "all",
    components: dict[str, nn.Module] | None = None,
    resample: Callable[[str, torch.Tensor], torch.Tensor | None] | None = None,
    complete: Sequence[str] = (),
    allow_incomplete: bool = False,
) -> InitReport:
    """Copy the tensors ``filter_name`` selects from ``path`` into ``module``: mapped, checked, reported.

    ``components`` maps this module's key prefixes (``"model.backbone."``) to the sub-modules the
    filter asks for; each is found in the source under whatever prefix it has there (a Lightning
    checkpoint, an export, another task's layout). ``None``: the whole module, as named. ``resample``
    (name, source tensor) may fit a tensor of another shape (a position table); None re-initialises it.
    ``complete``: key prefixes (the backbone's) whose tensors must all load: a part that would stay
    partly random is an error, not a line of the report (a warning with ``allow_incomplete``).

    Raises:
        ValueError: nothing the filter asks for is in the file (naming it and the prefixes).
        IncompleteInitError: tensors under a ``complete`` prefix absent from the file or of another
            shape (naming the file, the blocks and the option that allows it).
    """
    src = read_state_dict(path)
    components = components if components is not None else {"": module}
    own = module.state_dict()
    report = InitReport(source=str(path))
    to_load: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    looked: list[str] = []
    for own_prefix, component in components.items():
        # a component's own state dict may hold keys the module drops (multitask backbone aliases)
        rel_keys = [k for k in component.state_dict() if own_prefix + k in own]
        if not rel_keys:
            continue
        src_prefix = find_source_prefix(src, rel_keys, own_prefix)
        if src_prefix is None:
            report.absent.append(own_prefix)
        looked.append(f"'{own_prefix or '<all>'}' (keys such as '{rel_keys[0] if rel_keys else '?'}')")
        for rel in rel_keys:
            name, key = own_prefix + rel, (src_prefix or "") + rel
            if src_prefix is None or key not in src:
                report.missing.append(name)
            elif own[name].shape != src[key].shape:
                fitted = resample(name, src[key]) if resample is not None else None
                if fitted is not None and fitted.shape == own[name].shape:
                    to_load[name] = fitted
                    report.resampled.append(f"{name} {tuple(src[key].shape)} -> {tuple(own[name].shape)}")
                else:
                    report.mismatched.append(f"{name} {tuple(src[key].shape)} -> {tuple(own[name].shape)}")
                used.add(key)
            else:
                to_load[name] = src[key]
                used.add(key)
    report.loaded = sorted(to_load)
    report.skipped = sorted(k for k in src if k not in used)
    check_complete(report, tuple(complete), filter_name, allow_incomplete)
    if not to_load:
        raise ValueError(
            f"init_from {path} (init_from_filter={filter_name}) matches no tensor of this model: looked for "
            f"{', '.join(looked)} under any prefix; the file holds {source_layout(src)}"
        )
    module.load_state_dict(to_load, strict=False)
    return report


__all__ = [
    "INIT_FILTERS",
    "IncompleteInitError",
    "InitReport",
    "check_complete",
    "filter_prefixes",
    "find_source_prefix",
    "init_from_checkpoint",
    "read_state_dict",
    "source_layout",
    "split_components",
]
