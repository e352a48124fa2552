"""torch.compile of the backbone trains at several input sizes (dynamic shapes) like eager does.

``aot_eager`` runs the same AOT-autograd tracing as inductor without needing a C++ compiler, and
fails where inductor fails on untraceable ops (timm's antialiased bicubic position-table resample).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from siglip_dense.models import build_backbone


def _loss_and_grads(model: torch.nn.Module, x: torch.Tensor) -> tuple[dict, dict]:
    model.zero_grad(set_to_none=True)
    out = model(x)
    sum((o * o).mean() for o in out.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in out.items()}, grads


@pytest.mark.slow
@pytest.mark.parametrize("window_size", [None, 4], ids=["global", "windowed"])
def test_compiled_backbone_trains_at_new_sizes_like_eager(window_size: int | None) -> None:
    torch.manual_seed(0)
    eager = build_backbone("tiny", img_size=64, out_indices=(2, 5), window_size=window_size)
    compiled = build_backbone("tiny", img_size=64, out_indices=(2, 5), window_size=window_size)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile(backend="aot_eager", dynamic=True)
    compiled.compile(backend="aot_eager", dynamic=True)  # compiling twice keeps one eager wrapper
    for size in (96, 80):  # both differ from img_size: the position table is resampled each step
        x = torch.randn(2, 3, size, size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out_c, grads_c = _loss_and_grads(compiled, x)
        out_e, grads_e = _loss_and_grads(eager, x)
        for key in out_e:
            torch.testing.assert_close(out_c[key], out_e[key], rtol=1e-4, atol=1e-5)
        assert grads_c.keys() == grads_e.keys() and "vit.pos_embed" in grads_e
        for name in grads_e:
            torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-5, msg=name)
    assert compiled.state_dict().keys() == eager.state_dict().keys()
