"""torch.compile of the backbone trains at several input sizes (dynamic shapes) like eager does.

``aot_eager`` runs the same AOT-autograd tracing as inductor without needing a C++ compiler, and
fails where inductor fails on untraceable ops (timm's antialiased bicubic position-table resample).
Inductor itself (what ``compile=true`` uses) is tested on the training path: its code generation
(layouts, strides, size specialisation) fails where ``aot_eager`` passes.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from siglip_dense.models import SigLIP2Backbone, build_backbone
from siglip_dense.models.compile_options import compile_kwargs
from siglip_dense.models.necks import MultiLevelNeck
from siglip_dense.train import build_task
from tests.conftest import compose_train_cfg


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


@pytest.mark.parametrize("mode", [None, "max-autotune"])
def test_compile_kwargs_turn_off_layout_optimisation_and_keep_the_mode(mode: str | None) -> None:
    """Inductor gets layout_optimization=False; a mode becomes its options (torch.compile refuses
    mode and options together), as torch._inductor.list_mode_options spells them."""
    from torch._inductor import list_mode_options

    kwargs = compile_kwargs({"backend": "inductor", "mode": mode, "dynamic": None})
    assert "mode" not in kwargs
    assert kwargs["options"] == {**list_mode_options(mode or "default"), "layout_optimization": False}
    torch.compile(torch.nn.Linear(2, 2), **kwargs)  # accepted (compiling happens at the first call)
    assert compile_kwargs({"backend": "aot_eager", "mode": mode}) == {"backend": "aot_eager", "mode": mode}


# -- the training path (DenseModule.compile_backbone) with inductor, the backend compile=true uses -------------
# H and W change separately; the last size reuses the graph compiled at the third (where torch 2.14's
# inductor used to fail a stride assertion in the compiled backward)
TRAIN_SIZES = [(64, 64), (64, 96), (96, 96), (96, 64)]
# toy_seg (UPerNet + FCN on a MultiLevelNeck) cut down: inductor compiles every kernel with a C++
# compiler on CPU, so two narrow blocks and two pyramid levels keep the compiles short
SMALL_TOY_SEG = [
    "experiment=toy_seg",
    "data.num_workers=0",
    "backbone.out_indices=[0,1]",
    "+backbone.depth=2",
    "+backbone.embed_dim=64",
    "+backbone.num_heads=2",
    "+neck.scale_factors=[2.0,0.5]",
    "task.head.in_keys=[p3,p5]",
    "task.head.channels=16",
    "task.aux_head.in_key=p5",
    "task.aux_head.channels=16",
]


def _entries(fn: object) -> int:
    """Graphs dynamo holds for ``fn``'s code (one per compile of it)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    return len(_debug_get_cache_entry_list(fn.__code__))


def _step(task: torch.nn.Module, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, dict]:
    (component,) = task.components.values()
    task.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout masks in both models
    loss = component.losses({"image": images, "mask": masks}, component.model(images))["loss"]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None}


@pytest.mark.slow
def test_compiled_training_at_sizes_changing_h_and_w_matches_eager(
    tmp_path: Path, toy_data_root: Path, hydra_cleanup: None
) -> None:
    """compile=true (inductor, dynamic=null): every training size gives eager's loss and gradients;
    the backbone compiles once for all of them, the neck at most once per size."""
    cfg = compose_train_cfg(SMALL_TOY_SEG, tmp_path / "run", data_dir=toy_data_root.parent)
    torch.manual_seed(0)
    task = build_task(cfg, instantiate(cfg.data, _convert_="all"))
    eager = copy.deepcopy(task)
    torch._dynamo.reset()
    options = OmegaConf.to_container(cfg.compile_options, resolve=True)
    assert task.compile_backbone(**options) == ["backbone", "neck"]
    for i, (h, w) in enumerate(TRAIN_SIZES):
        images = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(i))
        masks = torch.randint(0, 5, (2, h, w), generator=torch.Generator().manual_seed(i))
        loss_c, grads_c = _step(task, images, masks)
        loss_e, grads_e = _step(eager, images, masks)
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-4, atol=1e-5)
        assert grads_c.keys() == grads_e.keys()
        for name in grads_e:
            torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-5, msg=name)
    assert _entries(SigLIP2Backbone._encode) == 1
    # at most one per size: inductor specialises sizes in convolution backward (fewer when its cache
    # already holds a graph for this neck)
    neck_graphs = _entries(MultiLevelNeck.forward)
    assert 1 <= neck_graphs <= len(TRAIN_SIZES)
    # evaluation (no_grad) at new sizes: one more graph for all of them, one more for a batch of one;
    # also for the neck, whose sizes are dynamic by then (torch's automatic dynamic shapes saw them change)
    task.eval(), eager.eval()
    with torch.no_grad():
        for b, h, w in [(2, 128, 64), (2, 64, 160), (1, 96, 96)]:
            x = torch.randn(b, 3, h, w)
            torch.testing.assert_close(task(x), eager(x), rtol=1e-4, atol=1e-5)
    assert _entries(SigLIP2Backbone._encode) == 3
    assert _entries(MultiLevelNeck.forward) == neck_graphs + 2
