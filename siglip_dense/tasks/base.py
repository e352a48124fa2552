"""Pieces every task's LightningModule shares: optimiser groups, schedules, init_from, freezing.

A task is built from plain-dict configs (what Hydra composes), not from live objects, so that its
checkpoint is self-describing: ``Task.load_from_checkpoint(path)`` rebuilds the exact model from
the saved hyper-parameters, without Hydra and without the original pretrained weight file.
"""

from __future__ import annotations

import copy
import math
import random
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from siglip_dense.models.backbone import SigLIP2Backbone

INIT_FILTERS = ("backbone", "backbone+neck", "all")


# ---------------------------------------------------------------------------------------------
# optimiser parameter groups
# ---------------------------------------------------------------------------------------------
def param_groups_layer_decay(
    model: nn.Module,
    backbone: SigLIP2Backbone | None,
    weight_decay: float,
    layer_decay: float = 1.0,
    backbone_prefix: str = "backbone.",
    no_decay_names: Iterable[str] = (),
    shapes: dict[str, tuple[int, ...]] | None = None,
) -> list[dict[str, Any]]:
    """AdamW groups with BEiT-style layer-wise lr decay on the backbone.

    A backbone parameter at depth ``i`` (0 = embeddings, L+1 = final norm) gets
    ``lr_scale = layer_decay ** (L + 1 - i)``; necks and heads get 1. Norms, biases, position
    embeddings (any parameter with ndim <= 1, plus ``no_decay_names``) get no weight decay.

    Groups are decided by each parameter's original name (wrapper segments such as FSDP's
    ``_fsdp_wrapped_module.`` removed) and, given ``shapes`` (recorded before any wrapping), its
    original shape: FSDP with ``use_orig_params`` hands ``configure_optimizers`` flattened 1-D
    views, which ``p.ndim`` would all call no-decay.
    """
    skip = set(no_decay_names)
    if backbone is not None and shapes is not None:
        # timm's named exclusions only: the backbone's own ``ndim <= 1`` rule reads the (possibly
        # flattened) live parameters; the recorded shapes below apply that rule instead
        skip |= {f"{backbone_prefix}vit.{n}" for n in backbone.vit.no_weight_decay()}
    elif backbone is not None:
        skip |= {backbone_prefix + n for n in backbone.no_weight_decay()}
    num_layers = backbone.num_layers if backbone is not None else 0
    groups: dict[tuple[float, bool], dict[str, Any]] = {}
    for wrapped_name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        name = original_name(wrapped_name)
        if backbone is not None and name.startswith(backbone_prefix):
            lid = backbone.layer_id(name[len(backbone_prefix) :])
            scale = layer_decay ** (num_layers + 1 - lid)
        else:
            scale = 1.0
        ndim = len(shapes[name]) if shapes is not None and name in shapes else p.ndim
        no_decay = ndim <= 1 or name in skip
        key = (scale, no_decay)
        if key not in groups:
            groups[key] = {
                "params": [],
                "names": [],
                "lr_scale": scale,
                "weight_decay": 0.0 if no_decay else weight_decay,
            }
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return list(groups.values())


# segments that wrappers (FSDP, activation checkpointing, torch.compile) insert into parameter names
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def original_name(name: str) -> str:
    """A parameter's name as the unwrapped module has it."""
    for segment in WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


# ---------------------------------------------------------------------------------------------
# schedules
# ---------------------------------------------------------------------------------------------
def lr_lambda(
    total_steps: int,
    warmup_steps: int = 0,
    schedule: str = "cosine",
    warmup_start_factor: float = 1e-6,
    min_lr_ratio: float = 0.0,
    power: float = 1.0,
    milestones: tuple[float, ...] = (0.89, 0.96),
    gamma: float = 0.1,
) -> Callable[[int], float]:
    """Per-step multiplier: linear warmup, then ``cosine``, ``poly`` (mmseg), ``step`` or ``constant``.

    ``milestones`` for ``step`` are fractions of ``total_steps`` (the ViTDet 100-epoch recipe decays
    at 88.9% and 96.3%).
    """
    total_steps = max(int(total_steps), 1)
    warmup_steps = min(int(warmup_steps), total_steps - 1) if total_steps > 1 else 0
    if schedule not in ("cosine", "poly", "step", "constant"):
        raise ValueError(f"unknown lr schedule {schedule!r}: use cosine, poly, step or constant")

    def fn(step: int) -> float:
        if step < warmup_steps:
            alpha = step / max(warmup_steps, 1)
            return warmup_start_factor + (1.0 - warmup_start_factor) * alpha
        t = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        t = min(max(t, 0.0), 1.0)
        if schedule == "cosine":
            return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
        if schedule == "poly":
            return min_lr_ratio + (1 - min_lr_ratio) * (1 - t) ** power
        if schedule == "step":
            frac = step / total_steps
            return gamma ** sum(frac >= m for m in milestones)
        return 1.0

    return fn


class ScaledLambdaLR(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR that also honours each group's ``lr_scale`` (layer-wise decay)."""

    def __init__(self, optimizer: torch.optim.Optimizer, fn: Callable[[int], float]) -> None:
        scales = [g.get("lr_scale", 1.0) for g in optimizer.param_groups]
        super().__init__(optimizer, [(lambda s, k=k: fn(s) * k) for k in scales])


def warmup_schedule(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int | None = None,
    warmup_ratio: float = 0.0,
    **schedule: Any,
) -> ScaledLambdaLR:
    """The per-step scheduler the configs name (``_partial_``; total steps known only at fit time)."""
    if warmup_steps is None:
        warmup_steps = int(float(warmup_ratio) * total_steps)
    return ScaledLambdaLR(optimizer, lr_lambda(int(total_steps), int(warmup_steps), **schedule))


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
) -> InitReport:
    """Copy the tensors ``filter_name`` selects from ``path`` into ``module``: mapped, checked, reported.

    ``components`` maps this module's key prefixes (``"model.backbone."``) to the sub-modules the
    filter asks for; each is found in the source under whatever prefix it has there (a Lightning
    checkpoint, an export, another task's layout). ``None``: the whole module, as named. ``resample``
    (name, source tensor) may fit a tensor of another shape (a position table); None re-initialises it.

    Raises:
        ValueError: nothing the filter asks for is in the file (naming it and the prefixes).
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
    if not to_load:
        raise ValueError(
            f"init_from {path} (init_from_filter={filter_name}) matches no tensor of this model: looked for "
            f"{', '.join(looked)} under any prefix; the file holds {source_layout(src)}"
        )
    module.load_state_dict(to_load, strict=False)
    return report


# ---------------------------------------------------------------------------------------------
# random states in checkpoints (plain tensors and lists: loadable with weights_only=True)
# ---------------------------------------------------------------------------------------------
def collect_rng_states() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos)},
        "numpy_gauss": [int(has_gauss), float(cached)],
        "python": [int(version), list(internal), gauss_next],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _world() -> tuple[int, int]:
    """(global rank, world size) of the initialised process group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def gather_rng_states() -> dict[str, Any]:
    """Every rank's random states, indexed by global rank: ``{"world_size": W, "ranks": [states_0, ...]}``.

    Under DDP each rank's streams differ (e.g. Mask R-CNN's proposal and mask samplers draw from the
    global torch generator on each rank), so an exact resume restores each rank's own states. A
    collective: every rank must call it (Lightning dumps checkpoints on every rank, rank 0 writes).
    """
    states = collect_rng_states()
    rank, world = _world()
    if world == 1:
        return {"world_size": 1, "ranks": [states]}
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, states)
    return {"world_size": world, "ranks": gathered}


def rng_states_for_rank(saved: dict[str, Any], mid_epoch: bool) -> dict[str, Any]:
    """This rank's states from a checkpoint's ``rng_states`` (per-rank layout or the older rank-0-only one).

    Raises:
        ValueError: a mid-epoch checkpoint written with another number of processes (the random
            streams of the missing or extra ranks cannot be continued exactly).
    """
    if "ranks" not in saved:  # checkpoints written before per-rank states: rank 0's, on every rank
        return saved
    rank, world = _world()
    saved_world = int(saved["world_size"])
    if saved_world != world and mid_epoch:
        raise ValueError(
            f"cannot resume mid-epoch: the checkpoint holds the random states of {saved_world} process(es), "
            f"this run has {world}. Resume with the same number of processes, or from an end-of-epoch "
            "checkpoint."
        )
    return saved["ranks"][rank % saved_world]


def checkpoint_is_mid_epoch(checkpoint: dict[str, Any]) -> bool:
    """Whether a Lightning checkpoint was written before its epoch's last training batch."""
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress", {})
    return not bool(progress.get("is_last_batch", True))


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    keys = states["numpy"]["keys"].numpy().astype(np.uint32)
    has_gauss, cached = states["numpy_gauss"]
    np.random.set_state(("MT19937", keys, states["numpy"]["pos"], has_gauss, cached))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# ---------------------------------------------------------------------------------------------
# the shared LightningModule
# ---------------------------------------------------------------------------------------------
class DenseTask(L.LightningModule):
    """Base LightningModule: builds the model from configs, owns optimisation and init_from.

    Subclasses implement ``build_model`` plus the steps. Hyper-parameters are plain dicts, so the
    checkpoint rebuilds the model with ``load_from_checkpoint`` and loads with ``weights_only=True``.
    """

    task_name: str = "base"
    # where the SigLIP backbone and the neck live inside ``self.model`` (layer decay, init_from filters)
    backbone_prefix: str = "backbone."
    neck_prefix: str = "neck."

    def __init__(
        self,
        backbone: dict[str, Any],
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        layer_decay: float = 1.0,
        freeze_backbone: bool = False,
        init_from: str | None = None,
        init_from_filter: str = "all",
    ) -> None:
        super().__init__()
        self.optimizer_cfg = dict(optimizer or {"_target_": "torch.optim.AdamW", "lr": 1e-4})
        self.scheduler_cfg = dict(scheduler or {})
        self.layer_decay = float(layer_decay)
        self.backbone_cfg = dict(backbone)
        # the data config the model was trained with (stored in checkpoints; eval.py reuses it)
        self.data_config: dict[str, Any] | None = None
        # set by tools/eval.py: write predictions in the dataset's own convention here
        self.predictions_dir: Path | None = None

    # -- model pieces ---------------------------------------------------------------------------
    @staticmethod
    def build_backbone(cfg: dict[str, Any]) -> SigLIP2Backbone:
        cfg = {k: v for k, v in cfg.items() if k not in ("mean", "std")}
        return instantiate(cfg, _convert_="all")

    def finish_init(self, freeze_backbone: bool, init_from: str | None, init_from_filter: str) -> None:
        """Call at the end of a subclass __init__, once ``self.model`` exists."""
        # original shapes, before any strategy wraps or flattens parameters (optimizer groups use them)
        self.param_shapes = {n: tuple(p.shape) for n, p in self.model.named_parameters()}
        if freeze_backbone:
            self.model.backbone.freeze(None)
        if init_from:
            self.check_init_source(init_from)
            report = init_from_checkpoint(
                self,
                init_from,
                init_from_filter,
                self.init_components(init_from_filter),
                resample=self.backbone.init_pos_resampler(init_from),
            )
            print(report)
            self.init_report = report

    def init_components(self, filter_name: str) -> dict[str, nn.Module]:
        """This model's parts ``init_from_filter`` selects, by their key prefix in this module.

        ``all``: the backbone, the neck and every other part (heads) separately, so that each is
        found in the source under its own prefix (another task's or a multi-task checkpoint).
        """
        prefixes = filter_prefixes(filter_name, f"model.{self.backbone_prefix}", f"model.{self.neck_prefix}")
        if prefixes == ("",):
            parts = self.init_components("backbone+neck")
            return {**parts, **split_components(self.model, "model.", set(parts))}
        out = {}
        for prefix in prefixes:
            try:
                out[prefix] = self.get_submodule(prefix.rstrip("."))
            except AttributeError:
                continue  # no neck here (neck=none, or each multi-task head keeps its own)
        return out

    def check_init_source(self, path: str | Path) -> None:
        """Refuse weights trained on another backbone variant (the message names both)."""
        from siglip_dense.checkpoints import check_same_backbone, read_meta

        path = Path(path)
        if path.is_file() and path.suffix == ".safetensors":
            return  # a bare weight file carries no description; shapes are checked key by key
        try:
            meta = read_meta(path)
        except (ValueError, KeyError):
            return  # not ours: nothing to compare, the key-by-key report still applies
        check_same_backbone(meta, self.backbone.arch_config.to_dict(), path)

    def compile_backbone(self, **options: Any) -> list[str]:
        """``torch.compile`` the backbone and neck in place (state-dict keys unchanged).

        Only these run the same shapes every step; heads and detector post-processing (NMS, variable
        box counts) stay eager, where compiling would mostly recompile.
        """
        compiled = []
        for prefix in (self.backbone_prefix, self.neck_prefix):
            try:
                module = self.model.get_submodule(prefix.rstrip("."))
            except AttributeError:
                continue
            if module is not None:
                module.compile(**options)
                compiled.append(prefix.rstrip("."))
        return compiled

    # -- memory layout and DDP ---------------------------------------------------------------------
    def use_channels_last(self) -> None:
        """Store conv weights (patch embedding, necks, heads) channels-last (NHWC).

        The backbone's NCHW maps are already NHWC in memory (token grids permuted), so necks and
        conv heads then run NHWC kernels without layout copies; tensor-core convs prefer it. Inputs
        need no conversion: a conv with a channels-last weight picks the layout itself.
        """
        self.to(memory_format=torch.channels_last)

    def unused_parameter_reasons(self) -> list[str]:
        """Why some trainable parameters get no gradient in a training step (empty: none do).

        DDP assumes every trainable parameter gets a gradient each step and fails on the next step
        otherwise; searching for unused ones costs a graph traversal per step, so train.py turns
        ``find_unused_parameters`` on only when this names a reason. Frozen parameters are fine.
        """
        reasons = []
        bb = self.backbone
        last = max(bb.out_indices)
        if last < bb.num_layers - 1 and _trainable(bb.vit.blocks[last + 1 :]):
            reasons.append(
                f"backbone blocks {last + 1}..{bb.num_layers - 1} come after the last out_index {last} "
                "(the forward stops early)"
            )
        if not bb.norm_intermediates and _trainable(bb.vit.norm):
            reasons.append("the backbone's final norm is unused (norm_intermediates=false)")
        if bb.vit.attn_pool is not None and _trainable(bb.vit.attn_pool):
            reasons.append("the backbone's MAP head (keep_head=true) is unused by dense heads")
        return reasons

    @property
    def backbone(self) -> SigLIP2Backbone:
        return self.model.backbone

    @property
    def mean(self) -> tuple[float, ...]:
        return self.backbone.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.backbone.std

    # -- checkpoints are self-describing ----------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the backbone's resolved architecture and drop its pretrained-weights path.

        The saved weights already contain the backbone, so reloading must not need (or re-read) the
        original pretrained file, and must rebuild exactly the numerics it was trained with.
        """
        hp = copy.deepcopy(dict(checkpoint.get("hyper_parameters", {})))
        bb = dict(hp.get("backbone", {}))
        bb["checkpoint"] = None
        bb["arch_config"] = self.backbone.arch_config.to_dict()
        hp["backbone"] = bb
        hp["init_from"] = None
        checkpoint["hyper_parameters"] = hp
        checkpoint["siglip_dense"] = {
            "task": self.task_name,
            "arch": self.backbone.arch,
            "arch_config": self.backbone.arch_config.to_dict(),
            "mean": list(self.mean),
            "std": list(self.std),
            "data": copy.deepcopy(self.data_config),
        }

        trainer = self._trainer
        # once per checkpoint: a multitask model's sub-tasks share its trainer and are not its module
        if trainer is not None and trainer.lightning_module is self:
            checkpoint["rng_states"] = gather_rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.on_load_meta(checkpoint.get("siglip_dense", {}))
        trainer = self._trainer
        if trainer is not None and trainer.state.fn == TrainerFn.FITTING and "rng_states" in checkpoint:
            # resuming a fit: continue the random streams (shuffle, augmentation, dropout) exactly
            set_rng_states(rng_states_for_rank(checkpoint["rng_states"], checkpoint_is_mid_epoch(checkpoint)))

    def on_load_meta(self, meta: dict[str, Any]) -> None:
        """Restore what the checkpoint says beyond the weights (the data config)."""
        self.data_config = meta.get("data")

    # -- evaluation on any data (tools/eval.py) -------------------------------------------------------
    def bind_data(self, datamodule: L.LightningDataModule) -> None:
        """Check the data fits the trained model (e.g. the class list) and adopt its conventions."""

    def set_tta(self, tta: str | dict[str, Any]) -> None:
        raise ValueError(f"{type(self).__name__} has no test-time augmentation; drop tta=")

    def finalize_predictions(self, out_dir: Path) -> None:
        """Write whole-set prediction files (rank 0, after evaluation); per-image files need nothing."""

    # -- inference without Hydra or a datamodule (tools/predict.py, load_model) ---------------------
    def predict(self, images: list[Any]) -> list[Any]:
        """Predictions for RGB images (H×W×3 uint8 arrays of any size) in the task's raw form."""
        raise NotImplementedError(f"{type(self).__name__} has no predict()")

    def write_outputs(self, image: Any, prediction: Any, out_dir: Path, stem: str) -> list[Path]:
        """Raw output file(s) and a PNG visualisation for one image (tools/predict.py)."""
        raise NotImplementedError(f"{type(self).__name__} has no write_outputs()")

    def normalize_images(self, images: list[Any]) -> list[torch.Tensor]:
        """H×W×3 uint8 (numpy or tensor) -> 1×3×H×W float on this device, backbone mean/std."""
        mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)
        out = []
        for img in images:
            t = torch.as_tensor(img, device=self.device)
            if t.ndim != 3 or t.shape[-1] != 3:
                raise ValueError(f"expected an H×W×3 RGB image, got shape {tuple(t.shape)}")
            t = t.permute(2, 0, 1)[None].float() / 255.0
            out.append((t - mean) / std)
        return out

    # -- optimisation -----------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        opt_cfg = dict(self.optimizer_cfg)
        weight_decay = float(opt_cfg.pop("weight_decay", 0.05))
        groups = param_groups_layer_decay(
            self.model,
            self.backbone,
            weight_decay,
            self.layer_decay,
            backbone_prefix=self.backbone_prefix,
            shapes=getattr(self, "param_shapes", None),
        )
        if not groups:
            raise ValueError("no trainable parameters: everything is frozen")
        for g in groups:
            g.pop("names")
        target = opt_cfg.pop("_target_", "torch.optim.AdamW")
        opt_cfg.pop("_partial_", None)
        optimizer = instantiate({"_target_": target, "_partial_": True, **opt_cfg})(groups)
        sch = dict(self.scheduler_cfg)
        sch.setdefault("_target_", f"{__name__}.warmup_schedule")
        sch["_partial_"] = True
        total = sch.pop("total_steps", None) or self.trainer.estimated_stepping_batches
        scheduler = instantiate(sch)(optimizer, total_steps=int(total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- training without host syncs ----------------------------------------------------------------
    def check_batch(self, batch: Any) -> None:
        """Validate a training batch on the host, before it moves to the device (no GPU sync)."""

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self._trainer
        if trainer is not None and trainer.training:
            self.check_batch(batch)
        return batch

    def track_finite(self, name: str, loss: torch.Tensor) -> None:
        """Record, on the device, the first step whose ``name`` loss is not finite (no host sync).

        :meth:`raise_if_not_finite` reads it every ``log_every_n_steps`` (where Lightning's logging
        reads values anyway), before each validation (so no checkpoint of a diverged run is written)
        and at the end of training.
        """
        first: dict[str, torch.Tensor] = self.__dict__.setdefault("_first_nonfinite", {})
        step = torch.full((), self.global_step, dtype=torch.long, device=loss.device)
        seen = first.get(name, torch.full_like(step, -1))
        first[name] = torch.where(~torch.isfinite(loss.detach()) & (seen < 0), step, seen)

    def raise_if_not_finite(self) -> None:
        """One host read of the recorded steps; raises naming the loss and the step."""
        for name, step in self.__dict__.get("_first_nonfinite", {}).items():
            s = int(step)
            if s >= 0:
                raise FloatingPointError(
                    f"non-finite {name} loss at step {s}: lower the lr, enable gradient clipping "
                    "(trainer.gradient_clip_val) or check the data"
                )

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        trainer = self._trainer
        every = max(1, int(getattr(trainer, "log_every_n_steps", 1) or 1)) if trainer is not None else 1
        if self.global_step % every == 0 or (trainer is not None and trainer.is_last_batch):
            self.raise_if_not_finite()

    def on_validation_start(self) -> None:
        self.raise_if_not_finite()

    def on_train_end(self) -> None:
        self.raise_if_not_finite()

    # -- results a run writes (train.py and tools/eval.py call these) -------------------------------
    def summarize(self, metrics: dict[str, Any]) -> str:
        """A readable summary of final metrics for the console."""
        return "\n".join(f"{k}: {v:.4f}" for k, v in metrics.items() if isinstance(v, float))

    def save_visualization(self, datamodule: L.LightningDataModule, path: Path, num: int) -> Path | None:
        """A picture of predictions vs ground truth on validation samples; ``None`` if unsupported."""
        return None

    def warn_once(self, message: str) -> None:
        if not getattr(self, "_warned", None):
            self._warned = set()
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, stacklevel=2)


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())
