"""Former home of the shared task code, kept for the names configs and checkpoints refer to.

``siglip_dense.tasks.base.warmup_schedule`` is the ``_target_`` of the task configs' schedulers (and
of every checkpoint's saved hyper-parameters); ``DenseTask`` is :class:`DenseModule`. The code lives
in one module per concept: :mod:`~siglip_dense.tasks.optim` (parameter groups, schedules),
:mod:`~siglip_dense.tasks.init_from`, :mod:`~siglip_dense.tasks.rng` (random states),
:mod:`~siglip_dense.tasks.component` (a task's network, loss and evaluator) and
:mod:`~siglip_dense.tasks.module` (the LightningModule).
"""

from __future__ import annotations

from siglip_dense.tasks.init_from import (
    INIT_FILTERS,
    InitReport,
    filter_prefixes,
    find_source_prefix,
    init_from_checkpoint,
    read_state_dict,
    source_layout,
    split_components,
)
from siglip_dense.tasks.module import DenseModule
from siglip_dense.tasks.optim import (
    WRAPPER_SEGMENTS,
    ScaledLambdaLR,
    lr_lambda,
    original_name,
    param_groups_layer_decay,
    warmup_schedule,
)
from siglip_dense.tasks.rng import (
    checkpoint_is_mid_epoch,
    collect_rng_states,
    gather_rng_states,
    rng_states_for_rank,
    set_rng_states,
)

DenseTask = DenseModule

__all__ = [
    "INIT_FILTERS",
    "WRAPPER_SEGMENTS",
    "DenseModule",
    "DenseTask",
    "InitReport",
    "ScaledLambdaLR",
    "checkpoint_is_mid_epoch",
    "collect_rng_states",
    "filter_prefixes",
    "find_source_prefix",
    "gather_rng_states",
    "init_from_checkpoint",
    "lr_lambda",
    "original_name",
    "param_groups_layer_decay",
    "read_state_dict",
    "rng_states_for_rank",
    "set_rng_states",
    "source_layout",
    "split_components",
    "warmup_schedule",
]
