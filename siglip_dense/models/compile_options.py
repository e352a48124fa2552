"""``torch.compile`` keyword arguments that train correctly at every input size.

Inductor's layout optimisation stores conv activations channels-last. On CPU (mkldnn) it stays on
for dynamic-shape graphs, and the backward graph is then compiled with the saved activation's
strides of the size it was first run at: the next size fails an inductor stride assertion
(``expected size 2==2, stride 18432==27648``; torch 2.14, see ``_aot_stage2b_bw_compile``, which
assumes layout optimisation is off for dynamic shapes, as it is on GPU). It is turned off here; on
GPU it is off for dynamic graphs anyway, and ``channels_last=true`` is the switch for NHWC convs.
"""

from __future__ import annotations

from typing import Any

import torch

INDUCTOR_FIXES = {"layout_optimization": False}


def compile_kwargs(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` for ``torch.compile`` with :data:`INDUCTOR_FIXES` added when the backend is inductor.

    ``torch.compile`` takes ``mode`` or ``options``, not both: a ``mode`` is expanded into its
    options with ``torch._inductor.list_mode_options`` (what ``torch.compile`` itself does with it).
    Other backends (``aot_eager``, ``eager``, a callable) get ``options`` unchanged.
    """
    out = dict(options)
    if out.get("backend", "inductor") != "inductor":
        return out
    mode = out.pop("mode", None)
    merged: dict[str, Any] = {}
    if mode not in (None, "default"):
        from torch._inductor import list_mode_options

        merged.update(list_mode_options(mode, out.get("dynamic")))
    merged.update(out.get("options") or {})
    merged.update(INDUCTOR_FIXES)
    out["options"] = merged
    return out


def mark_dynamic(tensor: torch.Tensor | None, dims: tuple[int, ...]) -> None:
    """Mark ``dims`` of ``tensor`` dynamic for the next compiled call (a no-op for None or size 0/1).

    ``maybe_mark_dynamic``: a size that the graph must specialise (0 and 1 always are) just gets its
    own graph instead of an error.
    """
    if tensor is None:
        return
    for d in dims:
        torch._dynamo.maybe_mark_dynamic(tensor, d)


__all__ = ["INDUCTOR_FIXES", "compile_kwargs", "mark_dynamic"]
