"""The timm contract of every architecture siglip_dense registers in timm.

timm's own model tests (``tests/test_models.py`` in huggingface/pytorch-image-models) run on every
registered ``vit_*`` name: a forward/backward at the pretrained_cfg's input size, the "non-standard"
cfg check (``forward_features`` / ``forward_head`` widths, ``reset_classifier``, ``first_conv`` and
``classifier`` naming real weights), ``forward_intermediates`` and the ``features_only`` getter,
TorchScript and FX. The same properties are asserted here, written against timm's public API, so a
model we register behaves like one of timm's own. Where timm only checks a shape, these tests also
compare values (scripted/traced output, intermediates vs. the blocks' own outputs).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pytest
import timm
import torch
from timm.data import resolve_data_config
from timm.layers import create_feature_extractor, get_graph_node_names
from timm.models import model_entrypoint

from siglip_dense.models import arch

OURS = sorted(n for n in timm.list_models() if model_entrypoint(n).__module__ == arch.__name__)
# timm feeds the features_only / forward_intermediates tests at most this size unless the cfg says
# fixed_input_size (TARGET_FFEAT_SIZE in timm's tests)
FEATURE_TARGET = 96
REQUIRED_CFG_KEYS = (
    "input_size",
    "fixed_input_size",
    "mean",
    "std",
    "num_classes",
    "first_conv",
    "classifier",
)


def _input_size(cfg: Mapping[str, Any], target: int | None = None) -> tuple[int, int, int]:
    """The C×H×W timm's tests feed a model: the cfg size, capped at ``target`` unless fixed."""
    size = tuple(cfg["input_size"])
    if cfg.get("fixed_input_size") or target is None:
        return size
    return tuple(min(s, target) for s in size)


def cfg_problems(cfg: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """What in a pretrained_cfg timm's tests and data pipeline would trip on (empty: none).

    ``state_dict`` is that of the model built with a classifier (num_classes > 0), so the
    ``classifier`` name can be checked even when the cfg's own num_classes is 0.
    """
    problems = [f"missing {k}" for k in REQUIRED_CFG_KEYS if cfg.get(k) is None]
    if problems:
        return problems
    size = cfg["input_size"]
    if len(size) != 3 or size[0] != 3 or min(size) <= 0:
        problems.append(f"input_size {size} is not (3, H, W)")
    for key in ("mean", "std"):
        if len(cfg[key]) != 3:
            problems.append(f"{key} {cfg[key]} has not 3 channels")
    if not isinstance(cfg["fixed_input_size"], bool):
        problems.append("fixed_input_size is not a bool")
    for key in ("first_conv", "classifier"):
        names = (cfg[key],) if isinstance(cfg[key], str) else tuple(cfg[key])
        problems += [f"{key} {n!r} names no weight" for n in names if f"{n}.weight" not in state_dict]
    return problems


def test_every_registered_model_is_found_and_has_its_own_cfg() -> None:
    assert OURS, "siglip_dense registers no timm model (import of siglip_dense.models.arch?)"
    assert set(OURS) == {name.split(".")[0] for name in arch.default_cfgs}


def test_cfg_problems_rejects_an_incomplete_cfg() -> None:
    """The checker itself: each key removed or pointing at a missing weight is reported."""
    name = OURS[0]
    cfg = timm.get_pretrained_cfg(name).to_dict()
    state = timm.create_model(name, num_classes=5).state_dict()
    assert cfg_problems(cfg, state) == []
    for key in REQUIRED_CFG_KEYS:
        assert cfg_problems({k: v for k, v in cfg.items() if k != key}, state) == [f"missing {key}"]
    assert cfg_problems(dict(cfg, first_conv="stem.conv"), state) == [
        "first_conv 'stem.conv' names no weight"
    ]
    assert cfg_problems(dict(cfg, classifier="fc"), state) == ["classifier 'fc' names no weight"]


@pytest.mark.parametrize("name", OURS)
def test_pretrained_cfg_complete_and_resolved_by_timm_data(name: str) -> None:
    model = timm.create_model(name)
    cfg = model.pretrained_cfg
    assert cfg["architecture"] == name
    assert cfg_problems(cfg, timm.create_model(name, num_classes=5).state_dict()) == []
    assert cfg["num_classes"] == model.num_classes
    data = resolve_data_config(model=model)
    assert data["input_size"] == tuple(cfg["input_size"])
    assert (data["mean"], data["std"]) == (tuple(cfg["mean"]), tuple(cfg["std"]))
    assert 0 < data["crop_pct"] <= 1 and data["interpolation"] in ("bilinear", "bicubic")


@pytest.mark.parametrize("name", OURS)
def test_fixed_input_size_tells_the_truth(name: str) -> None:
    """timm's tests feed a smaller image unless fixed_input_size: the flag must match the model."""
    model = timm.create_model(name).eval()
    cfg = model.pretrained_cfg
    with torch.no_grad():
        assert model(torch.randn(1, *_input_size(cfg))).shape == (1, model.num_features)
        other = (3, cfg["input_size"][1] - model.patch_embed.patch_size[0], cfg["input_size"][2])
        if cfg["fixed_input_size"]:
            with pytest.raises(AssertionError):
                model(torch.randn(1, *other))
        else:
            model(torch.randn(1, *other))


@pytest.mark.parametrize("name", OURS)
def test_forward_backward_at_cfg_size(name: str) -> None:
    cfg = timm.get_pretrained_cfg(name).to_dict()
    model = timm.create_model(name, num_classes=42).train()
    out = model(torch.randn(2, *_input_size(cfg, 128)))
    assert out.shape == (2, 42) and not out.isnan().any()
    out.mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert no_grad == []


@pytest.mark.parametrize("name", OURS)
def test_features_head_and_reset_classifier(name: str) -> None:
    """timm's non-standard cfg check: widths of forward_features / forward_head / a headless model."""
    model = timm.create_model(name).eval()
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    x = torch.randn(1, *_input_size(model.pretrained_cfg, 320))
    with torch.no_grad():
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        assert feats.shape[-1] == model.num_features and pre.shape == (1, model.head_hidden_size)
        model.reset_classifier(0)
        assert model.num_classes == 0
        torch.testing.assert_close(model(x), pre)
        headless = timm.create_model(name, num_classes=0).eval()
        assert headless(x).shape == (1, headless.num_features)


def _block_outputs(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Each block's output tokens (B×N×C) during a plain forward_features, via forward hooks."""
    outs: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda _m, _a, o: outs.append(o)) for b in model.blocks]
    model.forward_features(x)
    for h in hooks:
        h.remove()
    return outs


@pytest.mark.parametrize("name", OURS)
def test_forward_intermediates(name: str) -> None:
    model = timm.create_model(name).eval()
    info = model.feature_info
    assert len(info) >= 3
    size = _input_size(model.pretrained_cfg, FEATURE_TARGET)
    x = torch.randn(1, *size)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, output_fmt="NCHW")
        assert len(inter) == len(info)
        for f, o in zip(info, inter):
            grid = [math.ceil(s / f["reduction"]) for s in size[1:]]
            assert list(o.shape) == [1, f["num_chs"], *grid] and not o.isnan().any()
        torch.testing.assert_close(final, model.forward_features(x))
        # intermediates are the blocks' own outputs, as an NCHW map
        for o, ref in zip(inter, _block_outputs(model, x)):
            torch.testing.assert_close(o, ref.transpose(1, 2).reshape(o.shape))
        only = model.forward_intermediates(x, intermediates_only=True)
        assert len(only) == len(inter)
        for a, b in zip(only, inter):
            torch.testing.assert_close(a, b)
        model.set_grad_checkpointing()
        torch.testing.assert_close(model.forward_intermediates(x)[0], final, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", OURS)
def test_prune_intermediate_layers(name: str) -> None:
    model = timm.create_model(name).eval()
    keep = [1, 3]
    x = torch.randn(1, *_input_size(model.pretrained_cfg, FEATURE_TARGET))
    with torch.no_grad():
        ref = model.forward_intermediates(x, indices=keep, intermediates_only=True)
        assert model.prune_intermediate_layers(keep) == keep
        assert len(model.blocks) == max(keep) + 1
        pruned = model.forward_intermediates(x, indices=keep, intermediates_only=True)
        assert len(pruned) == len(ref) == len(keep)
        for a, b in zip(pruned, ref):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", OURS)
def test_features_only_getter(name: str) -> None:
    model = timm.create_model(name, features_only=True, feature_cls="getter").eval()
    size = _input_size(model.pretrained_cfg, FEATURE_TARGET)
    with torch.no_grad():
        outs = model(torch.randn(1, *size))
    assert len(outs) == len(model.feature_info.channels())
    for c, r, o in zip(model.feature_info.channels(), model.feature_info.reduction(), outs):
        assert list(o.shape) == [1, c, *(math.ceil(s / r) for s in size[1:])] and not o.isnan().any()


@pytest.mark.parametrize("name", OURS)
def test_torchscript_matches_eager(name: str) -> None:
    with timm.layers.set_scriptable(True):
        model = timm.create_model(name).eval()
    x = torch.randn(1, *_input_size(model.pretrained_cfg, 128))
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(model)(x), model(x))


@pytest.mark.parametrize("name", OURS)
def test_fx_trace_matches_eager(name: str) -> None:
    model = timm.create_model(name).eval()
    _, eval_nodes = get_graph_node_names(model)
    traced = create_feature_extractor(model, [eval_nodes[-1]])
    x = torch.randn(1, *_input_size(model.pretrained_cfg, 128))
    with torch.inference_mode():
        (out,) = traced(x).values()
        assert torch.equal(out, model(x))
