"""Checks of stored evaluation settings, deferred while a trained task is rebuilt from a file.

A checkpoint written before a check existed may store a setting the check refuses (a sliding-window
stride larger than the crop, a non-square detector size under ViTDet's square pad). It must still
load, so that ``tools/eval.py`` can override the setting (``tta=...``, ``test_protocol=...``); the
effective setting is checked where it is used. Training constructs tasks outside this context and
is checked at construction.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

_DEFERRED: contextvars.ContextVar[bool] = contextvars.ContextVar("eval_checks_deferred", default=False)


@contextlib.contextmanager
def defer_eval_checks() -> Iterator[None]:
    """Rebuild a checkpoint's task without checking its stored evaluation settings at construction."""
    token = _DEFERRED.set(True)
    try:
        yield
    finally:
        _DEFERRED.reset(token)


def eval_checks_deferred() -> bool:
    """True inside :func:`defer_eval_checks` (a task rebuilt from a checkpoint or an export)."""
    return _DEFERRED.get()


__all__ = ["defer_eval_checks", "eval_checks_deferred"]
