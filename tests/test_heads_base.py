"""The decode-head base (MMSeg's ``BaseDecodeHead`` contract) and the heads built on it.

Checked against independent references: state-dict layouts recorded from the heads before the base
existed (old checkpoints must load), direct torch computations of the linear probes, and MMSeg's
classifier init N(0, 0.01²) / bias 0.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from siglip_dense.models.heads.base import BaseDecodeHead, init_classifier
from siglip_dense.models.heads.depth import LinearBinsHead
from siglip_dense.models.heads.segmentation import FCNHead, LinearHead, UPerHead

KEYS4 = ["a", "b", "c", "d"]
CONFIGS = {
    "linear_lin1": (LinearHead, dict(in_channels=8, num_classes=3)),
    "linear_lin4_pooled": (LinearHead, dict(in_channels=8, num_classes=3, in_keys=KEYS4, concat_pooled=True)),
    "linear_no_bn": (LinearHead, dict(in_channels=8, num_classes=3, use_bn=False)),
    "uper": (UPerHead, dict(in_channels=8, num_classes=3, channels=4, pool_scales=(1, 2))),
    "fcn": (FCNHead, dict(in_channels=8, num_classes=3, channels=4, concat_input=True)),
    "bins_lin4_pooled": (LinearBinsHead, dict(in_channels=8, in_keys=KEYS4, num_bins=6)),
    "bins_lin1_plain": (LinearBinsHead, dict(in_channels=8, num_bins=6, concat_pooled=False, use_bn=False)),
}

# State-dict keys → shapes of each config above, printed once from main at 1d3e3e9 (the heads before
# BaseDecodeHead existed) by building the same configs there and dumping `state_dict()`. Checkpoints
# written by that code hold exactly these entries, so equality here means they load with strict=True
# (a module-level literal, not computed now: the old classes no longer exist to compare against).
MAIN_STATE_DICTS = {
    "linear_lin1": {
        "bn.weight": (8,),
        "bn.bias": (8,),
        "bn.running_mean": (8,),
        "bn.running_var": (8,),
        "bn.num_batches_tracked": (),
        "conv_seg.weight": (3, 8, 1, 1),
        "conv_seg.bias": (3,),
    },
    "linear_lin4_pooled": {
        "bn.weight": (64,),
        "bn.bias": (64,),
        "bn.running_mean": (64,),
        "bn.running_var": (64,),
        "bn.num_batches_tracked": (),
        "conv_seg.weight": (3, 64, 1, 1),
        "conv_seg.bias": (3,),
    },
    "linear_no_bn": {
        "conv_seg.weight": (3, 8, 1, 1),
        "conv_seg.bias": (3,),
    },
    "uper": {
        "psp_modules.0.1.0.weight": (4, 8, 1, 1),
        "psp_modules.0.1.1.weight": (4,),
        "psp_modules.0.1.1.bias": (4,),
        "psp_modules.0.1.1.running_mean": (4,),
        "psp_modules.0.1.1.running_var": (4,),
        "psp_modules.0.1.1.num_batches_tracked": (),
        "psp_modules.1.1.0.weight": (4, 8, 1, 1),
        "psp_modules.1.1.1.weight": (4,),
        "psp_modules.1.1.1.bias": (4,),
        "psp_modules.1.1.1.running_mean": (4,),
        "psp_modules.1.1.1.running_var": (4,),
        "psp_modules.1.1.1.num_batches_tracked": (),
        "bottleneck.0.weight": (4, 16, 3, 3),
        "bottleneck.1.weight": (4,),
        "bottleneck.1.bias": (4,),
        "bottleneck.1.running_mean": (4,),
        "bottleneck.1.running_var": (4,),
        "bottleneck.1.num_batches_tracked": (),
        "lateral_convs.0.0.weight": (4, 8, 1, 1),
        "lateral_convs.0.1.weight": (4,),
        "lateral_convs.0.1.bias": (4,),
        "lateral_convs.0.1.running_mean": (4,),
        "lateral_convs.0.1.running_var": (4,),
        "lateral_convs.0.1.num_batches_tracked": (),
        "lateral_convs.1.0.weight": (4, 8, 1, 1),
        "lateral_convs.1.1.weight": (4,),
        "lateral_convs.1.1.bias": (4,),
        "lateral_convs.1.1.running_mean": (4,),
        "lateral_convs.1.1.running_var": (4,),
        "lateral_convs.1.1.num_batches_tracked": (),
        "lateral_convs.2.0.weight": (4, 8, 1, 1),
        "lateral_convs.2.1.weight": (4,),
        "lateral_convs.2.1.bias": (4,),
        "lateral_convs.2.1.running_mean": (4,),
        "lateral_convs.2.1.running_var": (4,),
        "lateral_convs.2.1.num_batches_tracked": (),
        "fpn_convs.0.0.weight": (4, 4, 3, 3),
        "fpn_convs.0.1.weight": (4,),
        "fpn_convs.0.1.bias": (4,),
        "fpn_convs.0.1.running_mean": (4,),
        "fpn_convs.0.1.running_var": (4,),
        "fpn_convs.0.1.num_batches_tracked": (),
        "fpn_convs.1.0.weight": (4, 4, 3, 3),
        "fpn_convs.1.1.weight": (4,),
        "fpn_convs.1.1.bias": (4,),
        "fpn_convs.1.1.running_mean": (4,),
        "fpn_convs.1.1.running_var": (4,),
        "fpn_convs.1.1.num_batches_tracked": (),
        "fpn_convs.2.0.weight": (4, 4, 3, 3),
        "fpn_convs.2.1.weight": (4,),
        "fpn_convs.2.1.bias": (4,),
        "fpn_convs.2.1.running_mean": (4,),
        "fpn_convs.2.1.running_var": (4,),
        "fpn_convs.2.1.num_batches_tracked": (),
        "fpn_bottleneck.0.weight": (4, 16, 3, 3),
        "fpn_bottleneck.1.weight": (4,),
        "fpn_bottleneck.1.bias": (4,),
        "fpn_bottleneck.1.running_mean": (4,),
        "fpn_bottleneck.1.running_var": (4,),
        "fpn_bottleneck.1.num_batches_tracked": (),
        "conv_seg.weight": (3, 4, 1, 1),
        "conv_seg.bias": (3,),
    },
    "fcn": {
        "convs.0.0.weight": (4, 8, 3, 3),
        "convs.0.1.weight": (4,),
        "convs.0.1.bias": (4,),
        "convs.0.1.running_mean": (4,),
        "convs.0.1.running_var": (4,),
        "convs.0.1.num_batches_tracked": (),
        "conv_cat.0.weight": (4, 12, 3, 3),
        "conv_cat.1.weight": (4,),
        "conv_cat.1.bias": (4,),
        "conv_cat.1.running_mean": (4,),
        "conv_cat.1.running_var": (4,),
        "conv_cat.1.num_batches_tracked": (),
        "conv_seg.weight": (3, 4, 1, 1),
        "conv_seg.bias": (3,),
    },
    "bins_lin4_pooled": {
        "bn.weight": (64,),
        "bn.bias": (64,),
        "bn.running_mean": (64,),
        "bn.running_var": (64,),
        "bn.num_batches_tracked": (),
        "conv_depth.weight": (6, 64, 1, 1),
        "conv_depth.bias": (6,),
    },
    "bins_lin1_plain": {
        "conv_depth.weight": (6, 8, 1, 1),
        "conv_depth.bias": (6,),
    },
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_dict_layout_equals_the_pre_base_heads(name: str) -> None:
    cls, kwargs = CONFIGS[name]
    head = cls(**kwargs)
    got = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert got == MAIN_STATE_DICTS[name]
    old = {k: torch.randn(shape) if shape else torch.tensor(3) for k, shape in MAIN_STATE_DICTS[name].items()}
    head.load_state_dict(old, strict=True)
    torch.testing.assert_close(head.state_dict(), old)


def _bn_eval(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def _randomise_bn(bn: nn.BatchNorm2d) -> None:
    with torch.no_grad():
        for t in (bn.weight, bn.bias, bn.running_mean):
            t.normal_()
        bn.running_var.uniform_(0.5, 2.0)


@torch.no_grad()
@pytest.mark.parametrize("pooled", [False, True])
def test_linear_head_equals_bn_conv_on_resized_concat(pooled: bool) -> None:
    """BN + 1×1 conv on [map_i (bilinear to the first size), its mean]_i, written out with torch ops."""
    torch.manual_seed(0)
    feats = {"a": torch.randn(2, 8, 6, 10), "b": torch.randn(2, 6, 3, 5), "c": torch.randn(2, 4, 6, 10)}
    keys = ["a", "b", "c"]  # per-level widths 8 / 6 / 4 (MMSeg's in_channels list)
    head = LinearHead(in_channels=[8, 6, 4], num_classes=5, in_keys=keys, concat_pooled=pooled).eval()
    assert head.conv_seg.in_channels == 18 * (2 if pooled else 1)
    _randomise_bn(head.bn)
    head.conv_seg.bias.normal_()
    parts = []
    for key in ("a", "b", "c"):
        m = F.interpolate(feats[key], size=(6, 10), mode="bilinear", align_corners=False)
        parts += [m, m.mean(dim=(2, 3), keepdim=True).expand_as(m)] if pooled else [m]
    x = _bn_eval(torch.cat(parts, dim=1), head.bn)
    expected = F.conv2d(x, head.conv_seg.weight, head.conv_seg.bias)
    torch.testing.assert_close(head(feats), expected)


@torch.no_grad()
def test_linear_bins_head_equals_direct_computation() -> None:
    torch.manual_seed(0)
    feats = {"a": torch.randn(2, 4, 3, 5), "b": torch.randn(2, 4, 6, 10)}
    head = LinearBinsHead(in_channels=4, in_keys=["a", "b"], num_bins=7, min_depth=0.5, max_depth=4.0).eval()
    _randomise_bn(head.bn)
    head.conv_depth.weight.normal_()
    parts = []
    for key in ("a", "b"):
        m = F.interpolate(feats[key], size=(3, 5), mode="bilinear", align_corners=False)
        parts += [m, m.mean(dim=(2, 3), keepdim=True).expand_as(m)]
    logits = F.conv2d(
        _bn_eval(torch.cat(parts, dim=1), head.bn), head.conv_depth.weight, head.conv_depth.bias
    )
    logits = F.interpolate(logits, scale_factor=4, mode="bilinear", align_corners=False)
    weights = F.relu(logits) + 0.1
    weights = weights / weights.sum(dim=1, keepdim=True)
    expected = (weights * torch.linspace(0.5, 4.0, 7)[None, :, None, None]).sum(dim=1, keepdim=True)
    torch.testing.assert_close(head(feats), expected)


@pytest.mark.parametrize(
    ("head", "attr"),
    [
        (lambda: LinearHead(in_channels=1024, num_classes=150), "conv_seg"),
        (lambda: UPerHead(in_channels=8, num_classes=150, channels=1024, pool_scales=(1,)), "conv_seg"),
        (lambda: FCNHead(in_channels=8, num_classes=150, channels=1024), "conv_seg"),
        (lambda: LinearBinsHead(in_channels=512, num_bins=150), "conv_depth"),
    ],
)
def test_classifier_init_default_and_mmseg(head, attr: str) -> None:
    """Heads keep PyTorch's default classifier init (kaiming-uniform, a=sqrt(5): std = 1/sqrt(3·fan_in),
    bias ≠ 0; what the toy recipes are tuned for); ``init_std=0.01`` gives MMSeg's ``Normal(std=0.01)``,
    bias 0. 153,600 weights: the sample std is within ~0.2 % of the true one, a 20 % band only rejects
    a different init."""
    torch.manual_seed(0)
    conv = getattr(head(), attr)
    assert conv.weight.numel() >= 150 * 1024
    expected = 1.0 / math.sqrt(3 * conv.weight[0].numel())
    assert abs(conv.weight.std().item() - expected) < 0.2 * expected
    assert conv.bias.abs().sum() > 0
    mmseg = nn.Conv2d(conv.in_channels, conv.out_channels, 1)
    init_classifier(mmseg, 0.01)
    assert abs(mmseg.weight.std().item() - 0.01) < 0.002
    assert abs(mmseg.weight.mean().item()) < 1e-3
    assert torch.equal(mmseg.bias, torch.zeros_like(mmseg.bias))


@torch.no_grad()
def test_uper_head_per_level_in_channels() -> None:
    """MMSeg's per-level ``in_channels`` list (a CNN-like pyramid): laterals/PPM sized per level."""
    widths = [4, 6, 8, 10]
    levels = ["p2", "p3", "p4", "p5"]
    pyramid = {k: torch.randn(2, c, 16 // 2**i, 16 // 2**i) for i, (k, c) in enumerate(zip(levels, widths))}
    head = UPerHead(in_channels=widths, num_classes=3, channels=8, pool_scales=(1, 2)).eval()
    assert [conv[0].in_channels for conv in head.lateral_convs] == widths[:3]
    assert head.psp_modules[0][1][0].in_channels == 10
    assert head.bottleneck[0].in_channels == 10 + 2 * 8
    assert head(pyramid).shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="in_channels"):
        UPerHead(in_channels=[4, 6, 8], num_classes=3)  # three widths for four in_keys
    with pytest.raises(ValueError, match="'p2' has 4 channels"):
        UPerHead(in_channels=8, num_classes=3, channels=8)(pyramid)


class _Probe(BaseDecodeHead):
    """A head that returns its transformed inputs (to test the base's selection on its own)."""

    def forward(self, features: dict[str, torch.Tensor]):
        return self._transform_inputs(features)


def test_base_input_selection_and_transforms() -> None:
    feats = {"x": torch.randn(1, 2, 4, 4), "y": torch.randn(1, 3, 2, 2), "z": torch.randn(1, 5, 2, 2)}
    one = _Probe(3, 4, 2, in_keys=["y"])
    assert one(feats) is feats["y"] and one.in_channels == 3
    by_index = _Probe([3, 5], 4, 2, in_index=[1, 2], input_transform="multiple_select")
    assert [t.shape[1] for t in by_index(feats)] == [3, 5] and by_index.in_channels == [3, 5]
    cat = _Probe([2, 5], 4, 2, in_index=(0, 2), input_transform="resize_concat")
    assert cat.in_channels == 7 and cat(feats).shape == (1, 7, 4, 4)
    torch.testing.assert_close(cat(feats)[:, 2:], F.interpolate(feats["z"], size=(4, 4), mode="bilinear"))
    aligned = _Probe([2, 5], 4, 2, in_index=(0, 2), input_transform="resize_concat", align_corners=True)
    expected = F.interpolate(feats["z"], size=(4, 4), mode="bilinear", align_corners=True)
    torch.testing.assert_close(aligned(feats)[:, 2:], expected)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(input_transform="concat"), "input_transform"),
        (dict(in_keys=["x"], in_index=0), "not both"),
        (dict(in_channels=[2, 3]), "one map"),
        (dict(concat_pooled=True), "resize_concat"),
        (dict(in_channels=[2, 3], input_transform="multiple_select", channels=None), "channels=None"),
    ],
)
def test_base_rejects_bad_settings(kwargs: dict, match: str) -> None:
    args = dict(in_channels=2, channels=4, num_classes=2) | kwargs
    with pytest.raises(ValueError, match=match):
        _Probe(**args)


def test_base_reports_missing_or_out_of_range_maps() -> None:
    feats = {"x": torch.randn(1, 2, 4, 4)}
    with pytest.raises(ValueError, match=r"reads \['q'\]"):
        _Probe(2, 4, 2, in_keys=["q"])(feats)
    with pytest.raises(ValueError, match="in_index"):
        _Probe(2, 4, 2, in_index=3)(feats)
