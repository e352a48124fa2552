"""SigLIP2Backbone: feature maps, sizes, freezing, layer ids, gradient checkpointing (tiny, CPU)."""

from __future__ import annotations

import copy

import pytest
import torch
from timm.layers import resample_abs_pos_embed

from siglip_dense.models import ArchConfig, SigLIP2Backbone, build_backbone
from siglip_dense.models.arch import arch_config_of, match_timm_arch, resolve_arch


def tiny_cfg(patch: int = 16, img: int = 64, depth: int = 3) -> ArchConfig:
    return ArchConfig(
        embed_dim=64, depth=depth, num_heads=2, mlp_dim=128, patch_size=patch, img_size=(img, img)
    )


def tiny_backbone(patch: int = 16, img: int = 64, **kw: object) -> SigLIP2Backbone:
    torch.manual_seed(0)
    return build_backbone(arch_config=tiny_cfg(patch, img), verbose=False, **kw)


@pytest.mark.parametrize(("patch", "hw", "grid"), [(16, (224, 320), (14, 20)), (14, (266, 378), (19, 27))])
def test_non_square_feature_maps(patch: int, hw: tuple[int, int], grid: tuple[int, int]) -> None:
    bb = tiny_backbone(patch=patch, out_indices=(0, -1)).eval()
    with torch.no_grad():
        feats = bb(torch.randn(1, 3, *hw))
        tokens = bb.forward_features(torch.randn(1, 3, *hw))
    assert list(feats) == ["blocks.0", "blocks.2"] == bb.out_keys
    for f in feats.values():
        assert f.shape == (1, 64, *grid)
    assert tokens.shape == (1, grid[0] * grid[1], 64)
    assert bb.out_channels == {"blocks.0": 64, "blocks.2": 64}
    assert bb.out_strides == {"blocks.0": patch, "blocks.2": patch}


def test_last_map_is_final_normed_tokens() -> None:
    bb = tiny_backbone().eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        fmap = bb(x)["blocks.2"]
        tokens = bb.forward_features(x)
    torch.testing.assert_close(fmap.flatten(2).transpose(1, 2), tokens, rtol=0, atol=1e-5)


def test_padding_to_patch_multiple() -> None:
    bb = tiny_backbone().eval()
    with torch.no_grad():
        f = bb(torch.randn(1, 3, 70, 100))["blocks.2"]
    assert f.shape[-2:] == (5, 7)  # ceil(70/16), ceil(100/16): inputs are padded, not cropped


def test_negative_and_invalid_out_indices() -> None:
    bb = tiny_backbone(out_indices=(-1, -3, 1))
    assert bb.out_indices == (0, 1, 2)
    with pytest.raises(ValueError, match="out of range"):
        tiny_backbone(out_indices=(3,))
    with pytest.raises(ValueError, match="out of range"):
        tiny_backbone(out_indices=(-4,))


def test_dynamic_size_matches_set_input_size() -> None:
    dyn = tiny_backbone().eval()
    fixed = copy.deepcopy(dyn)
    fixed.set_input_size(96)
    assert fixed.img_size == (96, 96) and fixed.arch_config.img_size == (96, 96)
    assert fixed.vit.pos_embed.shape[1] == 36
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        a, b = dyn(x)["blocks.2"], fixed(x)["blocks.2"]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # both resample the same table the way timm does it
    expected = resample_abs_pos_embed(dyn.vit.pos_embed, new_size=[6, 6], num_prefix_tokens=0)
    torch.testing.assert_close(fixed.vit.pos_embed.data, expected)


def test_build_img_size_argument() -> None:
    bb = tiny_backbone(img_size=(48, 80))
    assert bb.img_size == (48, 80) and bb.vit.pos_embed.shape[1] == 3 * 5


def test_freeze_blocks() -> None:
    bb = tiny_backbone(freeze_blocks=2)
    bb.train()
    for name, p in bb.named_parameters():
        frozen = name.startswith(("vit.patch_embed", "vit.pos_embed", "vit.blocks.0.", "vit.blocks.1."))
        assert p.requires_grad is not frozen, name
    assert not bb.vit.blocks[0].training and not bb.vit.blocks[1].training
    assert bb.vit.blocks[2].training and bb.vit.norm.training and bb.training
    # the last two blocks' outputs still get gradients, the frozen ones none
    bb(torch.randn(1, 3, 32, 32))["blocks.2"].sum().backward()
    assert bb.vit.blocks[0].attn.qkv.weight.grad is None
    assert bb.vit.blocks[2].attn.qkv.weight.grad is not None


def test_freeze_everything() -> None:
    bb = tiny_backbone(freeze=True, keep_head=True)
    bb.train()
    assert not any(p.requires_grad for p in bb.parameters())
    # every submodule that owns weights stays in eval (the ViT wrapper holds only pos_embed)
    assert not any(m.training for n, m in bb.vit.named_modules() if n and list(m.parameters(recurse=False)))


def test_layer_ids() -> None:
    bb = tiny_backbone()
    ids = bb.layer_ids()
    assert ids["vit.pos_embed"] == 0 and ids["vit.patch_embed.proj.weight"] == 0
    for i in range(3):
        assert ids[f"vit.blocks.{i}.attn.qkv.weight"] == i + 1
    assert ids["vit.norm.weight"] == 4 == bb.num_layers + 1
    assert set(ids) == {n for n, _ in bb.named_parameters()}
    nwd = bb.no_weight_decay()
    assert "vit.pos_embed" in nwd and "vit.norm.weight" in nwd and "vit.blocks.0.attn.qkv.weight" not in nwd


def test_grad_checkpointing_same_output_and_grads() -> None:
    plain = tiny_backbone(out_indices=(1, 2)).train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    assert ckpt.vit.grad_checkpointing
    x = torch.randn(2, 3, 48, 64)
    outs = []
    for m in (plain, ckpt):
        xi = x.clone().requires_grad_(True)
        feats = m(xi)
        loss = sum((f**2).mean() for f in feats.values()) + m.forward_features(xi).mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        outs.append((feats, xi.grad.clone(), grads))
    (f0, g0, p0), (f1, g1, p1) = outs
    for k in f0:
        torch.testing.assert_close(f0[k], f1[k], rtol=0, atol=1e-6)
    torch.testing.assert_close(g0, g1, rtol=1e-5, atol=1e-6)
    assert p0.keys() == p1.keys() and len(p0) > 0
    for n in p0:
        torch.testing.assert_close(p0[n], p1[n], rtol=1e-5, atol=1e-6, msg=n)


def test_build_backbone_grad_checkpointing_flag() -> None:
    assert tiny_backbone(grad_checkpointing=True).vit.grad_checkpointing


def test_registered_tiny_variant() -> None:
    assert resolve_arch("tiny") == "vit_tiny_patch16_siglip_128"
    cfg = arch_config_of("tiny")
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_dim, cfg.patch_size) == (192, 6, 3, 768, 16)
    assert match_timm_arch(cfg) == "vit_tiny_patch16_siglip_128"
    bb = build_backbone("tiny", out_indices=(-1,))
    assert bb.arch == "vit_tiny_patch16_siglip_128" and bb.arch_config.act_layer == "gelu_tanh"
    assert bb.mean == (0.5, 0.5, 0.5) and bb.vit.attn_pool is None
    with torch.no_grad():
        assert bb(torch.randn(1, 3, 64, 48))["blocks.5"].shape == (1, 192, 4, 3)


def test_keep_head_pooled() -> None:
    bb = tiny_backbone(keep_head=True).eval()
    with torch.no_grad():
        assert bb.forward_pooled(torch.randn(2, 3, 64, 64)).shape == (2, 64)
    with pytest.raises(RuntimeError, match="keep_head"):
        tiny_backbone().forward_pooled(torch.randn(1, 3, 64, 64))


def test_arch_config_dict_round_trip() -> None:
    cfg = tiny_cfg(patch=14, img=98)
    cfg.norm_eps = 1e-5
    assert ArchConfig.from_dict(cfg.to_dict()) == cfg
    bb = build_backbone(arch_config=cfg.to_dict(), verbose=False)
    got = bb.arch_config
    assert (got.patch_size, got.norm_eps, got.num_heads, got.mlp_dim) == (14, 1e-5, 2, 128)


def test_unknown_arch() -> None:
    with pytest.raises(ValueError, match="unknown backbone arch"):
        build_backbone("not_a_model")
    with pytest.raises(ValueError, match="needs an arch"):
        build_backbone()


@pytest.mark.parametrize(("remainder", "grid"), [("pad", (5, 7)), ("drop", (4, 6))])
def test_patch_remainder(remainder: str, grid: tuple[int, int]) -> None:
    bb = tiny_backbone(patch_remainder=remainder).eval()
    x = torch.randn(1, 3, 70, 100)  # 4·16 + 6, 6·16 + 4
    with torch.no_grad():
        assert bb(x)["blocks.2"].shape[-2:] == grid
        assert bb.forward_features(x).shape[1] == grid[0] * grid[1]
        if remainder == "drop":  # the remainder pixels are not seen at all
            torch.testing.assert_close(bb.forward_features(x[..., :64, :96]), bb.forward_features(x))
    with pytest.raises(ValueError, match="patch_remainder"):
        tiny_backbone(patch_remainder="crop")


def test_drop_smaller_than_a_patch_is_an_error() -> None:
    with pytest.raises(ValueError, match="smaller than one 16-px patch"):
        tiny_backbone(patch_remainder="drop")(torch.randn(1, 3, 10, 64))


def test_pos_resample_rules_follow_their_formulas() -> None:
    """Each rule is F.interpolate with the source's mode/antialias (timm: resample_abs_pos_embed)."""
    from siglip_dense.models.pos_embed import POS_RESAMPLE, resample_pos_embed

    table = torch.randn(1, 16, 8)
    grid = table.reshape(1, 4, 4, 8).permute(0, 3, 1, 2)
    for name, spec in POS_RESAMPLE.items():
        got = resample_pos_embed(table, (4, 4), (3, 6), name)
        if name == "timm":
            want = resample_abs_pos_embed(table, new_size=[3, 6], old_size=[4, 4], num_prefix_tokens=0)
        else:
            want = torch.nn.functional.interpolate(
                grid, size=(3, 6), mode=spec.mode, align_corners=False, antialias=spec.antialias
            )
            want = want.permute(0, 2, 3, 1).reshape(1, 18, 8)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=name)
        assert resample_pos_embed(table, (4, 4), (4, 4), name) is table


def test_source_rule_keeps_the_original_table_through_set_input_size() -> None:
    cfg = tiny_cfg()
    cfg.pos_resample = "transformers"
    bb = build_backbone(arch_config=cfg, img_size=96, verbose=False)
    assert bb.img_size == (96, 96) and bb.pos_grid == (4, 4) and bb.vit.pos_embed.shape[1] == 16
    assert bb.arch_config.pos_grid == (4, 4) and bb.arch_config.img_size == (96, 96)
    again = build_backbone(arch_config=bb.arch_config.to_dict(), verbose=False)
    assert again.pos_grid == (4, 4) and again.img_size == (96, 96) and again.pos_resample == "transformers"
    # timm's rule resamples the stored table once (as timm.create_model(img_size=...) does)
    timm_bb = build_backbone(arch_config=tiny_cfg(), img_size=96, verbose=False)
    assert timm_bb.pos_grid == (6, 6) and timm_bb.vit.pos_embed.shape[1] == 36


def test_old_arch_config_dicts_default_to_timm_rule() -> None:
    d = tiny_cfg().to_dict()
    del d["pos_resample"], d["pos_grid"]
    assert ArchConfig.from_dict(d).pos_resample == "timm"
    d["pos_resample"] = "nearest"
    with pytest.raises(ValueError, match="pos_resample"):
        ArchConfig.from_dict(d)
