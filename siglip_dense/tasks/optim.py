"""Optimiser parameter groups (layer-wise lr decay by original parameter names) and lr schedules.

The schedule a config names (``_target_: siglip_dense.tasks.optim.warmup_schedule``, or the older
``siglip_dense.tasks.base.warmup_schedule``) is built with the optimizer once the total number of
steps is known.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_warn
from torch import nn

from siglip_dense.models.backbone import SigLIP2Backbone


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
    """The per-step scheduler the configs name (``_partial_``; total steps known only at fit time).

    A warmup at least as long as the run (``warmup_steps >= total_steps``) is warned about before
    the first step, naming both numbers: the learning rate would rise for the whole run.
    """
    if warmup_steps is None:
        warmup_steps = int(float(warmup_ratio) * total_steps)
    if int(warmup_steps) >= int(total_steps) > 0:
        rank_zero_warn(
            f"lr warmup of {int(warmup_steps)} steps (task.scheduler.warmup_steps / warmup_ratio) is not "
            f"shorter than the run's {int(total_steps)} optimizer steps: the learning rate rises for the "
            "whole run and never reaches task.optimizer.lr. Shorten the warmup or train longer "
            "(trainer.max_steps / trainer.max_epochs)"
        )
    return ScaledLambdaLR(optimizer, lr_lambda(int(total_steps), int(warmup_steps), **schedule))
