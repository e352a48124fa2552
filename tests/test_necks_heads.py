"""Necks (pyramid strides, patch-14 rule, p6), segmentation heads and the Segmentor's size handling."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from siglip_dense.models.backbone import SigLIP2Backbone, build_backbone
from siglip_dense.models.heads.depth import LinearBinsHead
from siglip_dense.models.heads.normals import LinearNormalsHead
from siglip_dense.models.heads.segmentation import FCNHead, LinearHead, UPerHead
from siglip_dense.models.necks import MultiLevelNeck, SimpleFeaturePyramid, to_stride16_grid
from siglip_dense.models.segmentor import Segmentor
from siglip_dense.train import run_train
from tests.conftest import compose_train_cfg

KEYS = ["blocks.1", "blocks.2", "blocks.3", "blocks.5"]
LEVELS = ["p2", "p3", "p4", "p5"]


@pytest.fixture(scope="module")
def bb16() -> SigLIP2Backbone:
    torch.manual_seed(0)
    return build_backbone(arch="tiny", out_indices=[1, 2, 3, 5], verbose=False).eval()


@pytest.fixture(scope="module")
def bb14() -> SigLIP2Backbone:
    torch.manual_seed(0)
    return build_backbone(arch="tiny", out_indices=[1, 2, 3, 5], patch_size=14, verbose=False).eval()


def _shapes(out: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in out.items()}


@torch.no_grad()
def test_simple_feature_pyramid_patch16_exact_strides(bb16: SigLIP2Backbone) -> None:
    neck = SimpleFeaturePyramid(bb16.embed_dim, bb16.patch_size, out_channels=32).eval()
    assert list(neck.strides) == LEVELS and list(neck.strides.values()) == [4, 8, 16, 32]
    assert neck.size_divisibility == 32 and neck.out_channels == 32
    h, w = 96, 160  # non-square, multiples of 32
    out = neck(bb16(torch.randn(2, 3, h, w)))
    assert list(out) == LEVELS
    assert _shapes(out) == {k: (2, 32, h // s, w // s) for k, s in neck.strides.items()}


@torch.no_grad()
def test_simple_feature_pyramid_top_block_p6(bb16: SigLIP2Backbone) -> None:
    neck = SimpleFeaturePyramid(bb16.embed_dim, bb16.patch_size, out_channels=16, top_block=True).eval()
    assert list(neck.strides) == [*LEVELS, "p6"] and neck.strides["p6"] == 64
    assert neck.size_divisibility == 64
    h, w = 128, 192
    out = neck(bb16(torch.randn(1, 3, h, w)))
    assert _shapes(out) == {k: (1, 16, h // s, w // s) for k, s in neck.strides.items()}
    # detectron2 LastLevelMaxPool: p6 is p5 subsampled by 2
    torch.testing.assert_close(out["p6"], out["p5"][:, :, ::2, ::2])


@torch.no_grad()
def test_simple_feature_pyramid_reads_last_or_named_key(bb16: SigLIP2Backbone) -> None:
    feats = bb16(torch.randn(1, 3, 64, 64))
    torch.manual_seed(1)
    neck = SimpleFeaturePyramid(bb16.embed_dim, 16, out_channels=8).eval()
    last = neck(feats)["p4"]
    torch.testing.assert_close(neck({"blocks.5": feats["blocks.5"]})["p4"], last)
    named = SimpleFeaturePyramid(bb16.embed_dim, 16, out_channels=8, in_keys=["blocks.2"])
    named.load_state_dict(neck.state_dict())
    torch.testing.assert_close(
        named.eval()({"blocks.2": feats["blocks.2"]})["p4"], neck({"x": feats["blocks.2"]})["p4"]
    )


@torch.no_grad()
def test_patch14_maps_are_resized_to_the_stride16_grid(bb14: SigLIP2Backbone) -> None:
    assert bb14.patch_size == 14
    h, w = 266, 378
    feats = bb14(torch.randn(1, 3, h, w))
    assert feats["blocks.5"].shape[-2:] == (19, 27)
    gh, gw = math.ceil(19 * 14 / 16), math.ceil(27 * 14 / 16)
    assert (gh, gw) == (17, 24) == (math.ceil(h / 16), math.ceil(w / 16))
    expected = {"p2": (4 * gh, 4 * gw), "p3": (2 * gh, 2 * gw), "p4": (gh, gw), "p5": (9, 12)}
    for neck in (
        SimpleFeaturePyramid(bb14.embed_dim, 14, out_channels=16).eval(),
        MultiLevelNeck(bb14.embed_dim, 14, in_keys=bb14.out_keys).eval(),
    ):
        assert list(neck.strides.values()) == [4, 8, 16, 32]
        assert neck.size_divisibility == 14 and neck.exact_size_divisibility == 224
        out = neck(feats)
        assert list(out) == LEVELS
        assert {k: tuple(v.shape[-2:]) for k, v in out.items()} == expected
    # the identity level of MultiLevelNeck is exactly the bilinear resize of the block map
    out = MultiLevelNeck(bb14.embed_dim, 14, in_keys=bb14.out_keys).eval()(feats)
    ref = F.interpolate(feats["blocks.3"], size=(gh, gw), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out["p4"], ref)


@torch.no_grad()
def test_patch14_exact_levels_at_exact_size_divisibility(bb14: SigLIP2Backbone) -> None:
    h, w = 224, 448
    neck = MultiLevelNeck(bb14.embed_dim, 14, in_keys=bb14.out_keys).eval()
    out = neck(bb14(torch.randn(1, 3, h, w)))
    assert {k: tuple(v.shape[-2:]) for k, v in out.items()} == {
        k: (h // s, w // s) for k, s in neck.strides.items()
    }


def test_stride16_grid_is_a_noop_for_patch16() -> None:
    x = torch.randn(1, 4, 5, 7)
    assert to_stride16_grid(x, 16) is x
    assert to_stride16_grid(x, 32).shape[-2:] == (10, 14)


@torch.no_grad()
def test_multilevel_neck_shapes_channels_and_keys(bb16: SigLIP2Backbone) -> None:
    h, w = 64, 96
    feats = bb16(torch.randn(2, 3, h, w))
    neck = MultiLevelNeck(bb16.embed_dim, 16, in_keys=bb16.out_keys).eval()
    assert neck.out_channels == bb16.embed_dim and neck.size_divisibility == 32
    out = neck(feats)
    assert _shapes(out) == {k: (2, bb16.embed_dim, h // s, w // s) for k, s in neck.strides.items()}
    # level i comes from block i: the identity level is blocks.3, the pooled one blocks.5
    torch.testing.assert_close(out["p4"], feats["blocks.3"])
    torch.testing.assert_close(out["p5"], F.max_pool2d(feats["blocks.5"], 2))
    proj = MultiLevelNeck(bb16.embed_dim, 16, in_keys=bb16.out_keys, out_channels=24).eval()
    assert proj.out_channels == 24
    assert all(v.shape[1] == 24 for v in proj(feats).values())
    with pytest.raises(ValueError, match="one input key per scale"):
        MultiLevelNeck(bb16.embed_dim, 16, in_keys=["blocks.5"])


def _conv_seg_ok(head: nn.Module, num_classes: int) -> None:
    assert isinstance(head.conv_seg, nn.Conv2d)
    assert head.conv_seg.kernel_size == (1, 1) and head.conv_seg.out_channels == num_classes


@torch.no_grad()
def test_linear_head_lin1_lin4_and_pooled(bb16: SigLIP2Backbone) -> None:
    feats = bb16(torch.randn(2, 3, 48, 80))
    c, k = bb16.embed_dim, 5
    lin1 = LinearHead(in_channels=c, num_classes=k).eval()
    _conv_seg_ok(lin1, k)
    assert lin1({"blocks.5": feats["blocks.5"]}).shape == (2, k, 3, 5)
    with pytest.raises(ValueError, match="in_keys"):
        lin1(feats)  # four maps but built for one
    lin4 = LinearHead(in_channels=c, num_classes=k, in_keys=KEYS, concat_pooled=True).eval()
    assert lin4.conv_seg.in_channels == c * 4 * 2
    assert lin4(feats).shape == (2, k, 3, 5)
    # the pooled half is a per-map global average: with only its weights set, logits are constant
    plain = LinearHead(in_channels=c, num_classes=k, in_keys=KEYS, concat_pooled=True, use_bn=False).eval()
    weight = plain.conv_seg.weight.view(k, 4, 2, c).clone()
    weight[:, :, 0] = 0
    plain.conv_seg.weight.copy_(weight.view_as(plain.conv_seg.weight))
    logits = plain(feats)
    expected = (
        sum(
            torch.einsum("kc,bc->bk", weight[:, i, 1], feats[key].mean(dim=(2, 3)))
            for i, key in enumerate(KEYS)
        )
        + plain.conv_seg.bias
    )
    torch.testing.assert_close(logits, expected[:, :, None, None].expand_as(logits), rtol=1e-4, atol=1e-4)


def test_linear_head_resizes_maps_to_the_first() -> None:
    head = LinearHead(in_channels=3, num_classes=2, in_keys=["a", "b"], use_bn=False)
    out = head({"a": torch.randn(1, 3, 6, 8), "b": torch.randn(1, 3, 3, 4)})
    assert out.shape == (1, 2, 6, 8)


@torch.no_grad()
def test_uper_and_fcn_heads_on_a_pyramid(bb16: SigLIP2Backbone) -> None:
    feats = bb16(torch.randn(2, 3, 64, 96))
    neck = MultiLevelNeck(bb16.embed_dim, 16, in_keys=bb16.out_keys).eval()
    pyramid = neck(feats)
    k = 7
    uper = UPerHead(in_channels=neck.out_channels, num_classes=k, channels=32).eval()
    _conv_seg_ok(uper, k)
    assert uper(pyramid).shape == (2, k, 16, 24)  # p2 resolution
    for concat in (False, True):
        fcn = FCNHead(in_channels=neck.out_channels, num_classes=k, channels=16, concat_input=concat).eval()
        _conv_seg_ok(fcn, k)
        assert fcn(pyramid).shape == (2, k, 4, 6)  # p4 resolution
    fcn2 = FCNHead(in_channels=neck.out_channels, num_classes=k, in_key="p3", channels=16, num_convs=2)
    assert fcn2.eval()(pyramid).shape == (2, k, 8, 12)


def test_uper_head_trains() -> None:
    torch.manual_seed(0)
    pyramid = {k: torch.randn(2, 8, 16 // 2**i, 16 // 2**i) for i, k in enumerate(LEVELS)}
    head = UPerHead(in_channels=8, num_classes=3, channels=8, dropout=0.0)
    target = torch.randint(0, 3, (2, 16, 16))
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    losses = []
    for _ in range(5):
        loss = F.cross_entropy(head(pyramid), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def _torch_batchnorm(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose BatchNorm2d layers are torch's own class, with the same state."""
    ref = copy.deepcopy(module)
    for parent in list(ref.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.BatchNorm2d) and type(child) is not nn.BatchNorm2d:
                plain = nn.BatchNorm2d(child.num_features, child.eps, child.momentum)
                plain.load_state_dict(child.state_dict())
                setattr(parent, name, plain.train(child.training))
    return ref


def _outputs_grads_state(head: nn.Module, inputs: dict[str, torch.Tensor], cotangent: torch.Tensor) -> tuple:
    head.zero_grad(set_to_none=True)
    out = head(inputs)
    (out * cotangent).sum().backward()
    grads = {n: p.grad.clone() for n, p in head.named_parameters()}
    return out.detach(), grads, {k: v.clone() for k, v in head.state_dict().items()}


@pytest.mark.parametrize("batch", [2, 1])
def test_uper_head_trains_at_batch_one_and_two_as_torch_batchnorm(batch: int) -> None:
    """Batch 2: exactly torch's BatchNorm2d (outputs, gradients, running statistics). Batch 1: the 1×1
    pyramid-pooling branch (one value per channel) is normalised as torch's BatchNorm2d in eval mode
    (running statistics, left unchanged); every other BN still uses the batch's statistics."""
    torch.manual_seed(0)
    head = UPerHead(in_channels=8, num_classes=3, channels=8, dropout=0.0)
    with torch.no_grad():  # running statistics other than the initial 0 / 1
        for m in head.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
    pyramid = {k: torch.randn(batch, 8, 16 // 2**i, 24 // 2**i) for i, k in enumerate(LEVELS)}
    ref = _torch_batchnorm(head)
    if batch == 1:
        ref.psp_modules[0][1][1].eval()  # pool scale 1 → Sequential(pool, ConvBNReLU(conv, bn, relu))
    cotangent = torch.randn(batch, 3, 16, 24)
    out, grads, state = _outputs_grads_state(head, pyramid, cotangent)
    out_ref, grads_ref, state_ref = _outputs_grads_state(ref, pyramid, cotangent)
    torch.testing.assert_close(out, out_ref)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], msg=name)
    assert state.keys() == state_ref.keys()
    for key in state_ref:
        torch.testing.assert_close(state[key], state_ref[key], msg=key)


@pytest.mark.parametrize("head_class", [LinearHead, LinearBinsHead, LinearNormalsHead])
def test_linear_probe_bn_keeps_pooled_channels_at_batch_one(head_class: type[nn.Module]) -> None:
    """concat_pooled at batch 1: the pooled channels hold one value per channel (broadcast over the
    map), so they are normalised as torch's BatchNorm2d in eval mode and keep their running
    statistics; the patch-feature channels are torch's training-mode BatchNorm2d."""
    torch.manual_seed(0)
    kwargs = {"num_classes": 3} if head_class is LinearHead else {}
    head = head_class(in_channels=4, in_keys=["a", "b"], concat_pooled=True, **kwargs)
    bn = head.bn
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-1, 1)
    x = head._transform_inputs({"a": torch.randn(1, 4, 4, 6), "b": torch.randn(1, 4, 2, 3)})
    pooled = torch.tensor([False] * 4 + [True] * 4 + [False] * 4 + [True] * 4)  # a, mean(a), b, mean(b)
    parts = {}
    for is_pooled in (False, True):
        idx = pooled.eq(is_pooled).nonzero().squeeze(1)
        ref = nn.BatchNorm2d(len(idx), bn.eps, bn.momentum).train(not is_pooled)
        ref.load_state_dict({k: v[idx] for k, v in bn.state_dict().items() if v.ndim == 1}, strict=False)
        parts[is_pooled] = (idx, ref(x[:, idx]), ref)
    expected = torch.empty_like(x)
    for idx, out, _ in parts.values():
        expected[:, idx] = out
    torch.testing.assert_close(bn(x), expected)
    for idx, _, ref in parts.values():
        torch.testing.assert_close(bn.running_mean[idx], ref.running_mean)
        torch.testing.assert_close(bn.running_var[idx], ref.running_var)


@pytest.mark.slow
def test_toy_seg_trains_with_one_image_per_batch(
    tmp_path: Path, toy_data_root: Path, hydra_cleanup: None
) -> None:
    """data.batch_size=1 (a single-GPU So400m/g run at 512 px): UPerNet + FCN train a step."""
    overrides = ["experiment=toy_seg", "debug=fdr", "data.num_workers=0", "data.batch_size=1"]
    cfg = compose_train_cfg(overrides, tmp_path / "run", data_dir=toy_data_root.parent)
    logged: dict[str, float] = {}
    run_train(cfg, logged)
    assert math.isfinite(logged["train/loss"])


def _uper_segmentor(backbone: SigLIP2Backbone, k: int) -> Segmentor:
    neck = MultiLevelNeck(backbone.embed_dim, backbone.patch_size, in_keys=backbone.out_keys)
    head = UPerHead(in_channels=neck.out_channels, num_classes=k, channels=16)
    aux = FCNHead(in_channels=neck.out_channels, num_classes=k, channels=8)
    return Segmentor(backbone, neck, head, aux)


def test_segmentor_output_is_input_size_and_aux_only_in_train(bb16: SigLIP2Backbone) -> None:
    torch.manual_seed(0)
    model = _uper_segmentor(bb16, 4)
    x = torch.randn(2, 3, 130, 97)
    model.train()
    out = model(x)
    assert set(out) == {"logits", "aux_logits"}
    assert out["logits"].shape == out["aux_logits"].shape == (2, 4, 130, 97)
    model.eval()
    with torch.no_grad():
        out = model(x)
        assert set(out) == {"logits"} and out["logits"].shape == (2, 4, 130, 97)
        # padding is bottom/right with zeros: the explicitly padded image gives the same pixels
        padded = model(F.pad(x, (0, 128 - 97, 0, 160 - 130)))["logits"]
        torch.testing.assert_close(padded[..., :130, :97], out["logits"])
    bb16.eval()


@torch.no_grad()
def test_segmentor_without_neck_patch14_linear(bb14: SigLIP2Backbone) -> None:
    model = Segmentor(
        bb14, None, LinearHead(in_channels=bb14.embed_dim, num_classes=3, in_keys=bb14.out_keys)
    )
    assert model.size_divisibility == 14
    assert model.eval()(torch.randn(1, 3, 130, 97))["logits"].shape == (1, 3, 130, 97)
    sfp = SimpleFeaturePyramid(bb14.embed_dim, 14, out_channels=8, top_block=True)
    model = Segmentor(bb14, sfp, UPerHead(in_channels=8, num_classes=3, channels=8))
    assert model.eval()(torch.randn(1, 3, 61, 45))["logits"].shape == (1, 3, 61, 45)


def test_segmentor_requires_a_head(bb16: SigLIP2Backbone) -> None:
    with pytest.raises(ValueError, match="head"):
        Segmentor(bb16)
