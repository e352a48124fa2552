"""ViTDet window attention (``window_size`` / ``global_blocks``) on the tiny SigLIP-shaped backbone.

References are computed independently of the windowing code: each window's real tokens are sliced
out of a block's input and run alone through timm's plain ``Block.forward``, then stitched back.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from timm.models.vision_transformer import Block

from siglip_dense.models.arch import arch_config_of
from siglip_dense.models.backbone import (
    VITDET_GLOBAL_BLOCKS,
    SigLIP2Backbone,
    WindowedBlock,
    build_backbone,
)
from tests.conftest import compose_train_cfg
from tests.test_coco_data import toy_coco_root  # noqa: F401 - shared session fixture

ALL = list(range(6))


def _pair(window_size: int, global_blocks=None, out_indices=ALL) -> tuple[SigLIP2Backbone, SigLIP2Backbone]:
    """A global backbone and a windowed one with the same (random) weights, both in eval mode."""
    torch.manual_seed(0)
    ref = build_backbone("tiny", img_size=128, out_indices=out_indices).eval()
    win = build_backbone(
        "tiny", img_size=128, out_indices=out_indices, window_size=window_size, global_blocks=global_blocks
    ).eval()
    win.load_state_dict(ref.state_dict(), strict=True)
    return ref, win


def _block_io(backbone: SigLIP2Backbone, x: torch.Tensor) -> tuple[dict, dict]:
    """Each block's input and output tokens (B×N×C) during ``backbone(x)``."""
    ins, outs, handles = {}, {}, []
    for i, blk in enumerate(backbone.vit.blocks):

        def hook(m, args, out, i=i):
            ins[i], outs[i] = args[0].detach(), out.detach()

        handles.append(blk.register_forward_hook(hook))
    with torch.no_grad():
        backbone(x)
    for h in handles:
        h.remove()
    return ins, outs


def _reference_windows(blk: Block, x: torch.Tensor, hw: tuple[int, int], ws: int) -> torch.Tensor:
    """Each window's real tokens alone through timm's plain Block.forward (edge windows are smaller)."""
    B, N, C = x.shape
    h, w = hw
    grid = x.view(B, h, w, C)
    out = torch.empty_like(grid)
    with torch.no_grad():
        for r in range(0, h, ws):
            for c in range(0, w, ws):
                tile = grid[:, r : r + ws, c : c + ws]
                th, tw = tile.shape[1:3]
                y = Block.forward(blk, tile.reshape(B, th * tw, C))
                out[:, r : r + ws, c : c + ws] = y.view(B, th, tw, C)
    return out.view(B, N, C)


def _unmasked_padded_windows(blk: Block, x: torch.Tensor, hw: tuple[int, int], ws: int) -> torch.Tensor:
    """The wrong answer: zero-padded windows where padding acts as keys (for the test's own power)."""
    B, N, C = x.shape
    h, w = hw
    H, W = -(-h // ws) * ws, -(-w // ws) * ws
    grid = torch.zeros(B, H, W, C)
    grid[:, :h, :w] = x.view(B, h, w, C)
    out = torch.empty_like(grid)
    with torch.no_grad():
        for r in range(0, H, ws):
            for c in range(0, W, ws):
                y = Block.forward(blk, grid[:, r : r + ws, c : c + ws].reshape(B, ws * ws, C))
                out[:, r : r + ws, c : c + ws] = y.view(B, ws, ws, C)
    return out[:, :h, :w].reshape(B, N, C)


def test_window_covering_the_grid_equals_global_attention() -> None:
    ref, win = _pair(window_size=8)  # 128 px / 16 = 8x8 grid: one window
    assert win.windowed_blocks == (0, 1, 3, 4) and win.global_blocks == (2, 5)
    assert all(isinstance(win.vit.blocks[i], WindowedBlock) for i in win.windowed_blocks)
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        a, b = ref(x), win(x)
        fa, fb = ref.forward_features(x), win.forward_features(x)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0)
    torch.testing.assert_close(fb, fa, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("size", "ws"),
    [((128, 128), 4), ((144, 144), 4), ((160, 112), 3)],
    ids=["8x8-divides", "9x9-padded", "10x7-padded"],
)
def test_windowed_blocks_equal_per_window_reference(size: tuple[int, int], ws: int) -> None:
    _, win = _pair(window_size=ws)
    x = torch.randn(2, 3, *size)
    hw = (size[0] // 16, size[1] // 16)
    ins, outs = _block_io(win, x)
    padded = hw[0] % ws or hw[1] % ws
    for i in win.windowed_blocks:
        blk = win.vit.blocks[i]
        expected = _reference_windows(blk, ins[i], hw, ws)
        torch.testing.assert_close(outs[i], expected, atol=1e-5, rtol=0)
        if padded:  # the reference does tell masked from unmasked padding
            wrong = _unmasked_padded_windows(blk, ins[i], hw, ws)
            assert (wrong - expected).abs().max() > 1e-3
    for i in win.global_blocks:  # global blocks: timm's plain forward over all tokens
        with torch.no_grad():
            torch.testing.assert_close(outs[i], Block.forward(win.vit.blocks[i], ins[i]), atol=1e-5, rtol=0)


def test_global_blocks_mix_windows_and_windowed_blocks_do_not() -> None:
    _, win = _pair(window_size=4, out_indices=[1, 2])  # 8x8 grid, 2x2 windows; blocks 0, 1 windowed
    x = torch.randn(1, 3, 128, 128)
    x2 = x.clone()
    x2[..., :16, :16] += 1.0  # token (0, 0): top-left window
    with torch.no_grad():
        a, b = win(x), win(x2)
    for key, other_changes in (("blocks.1", False), ("blocks.2", True)):
        diff = (a[key] - b[key]).abs()
        assert diff[..., :4, :4].max() > 1e-3  # its own window
        far = diff[..., 4:, 4:].max()  # bottom-right window
        assert (far > 1e-3) if other_changes else (far == 0), (key, far)


def test_keys_layer_ids_and_decay_groups_unchanged() -> None:
    ref, win = _pair(window_size=4)
    assert list(ref.state_dict()) == list(win.state_dict())
    assert [n for n, _ in ref.named_parameters()] == [n for n, _ in win.named_parameters()]
    assert ref.layer_ids() == win.layer_ids()
    assert ref.no_weight_decay() == win.no_weight_decay()
    win.freeze(3)
    frozen = {n for n, p in win.named_parameters() if not p.requires_grad}
    assert "vit.blocks.2.attn.qkv.weight" in frozen and "vit.blocks.3.attn.qkv.weight" not in frozen


def test_grad_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    kw = dict(img_size=128, out_indices=[2, 5], window_size=4)
    plain = build_backbone("tiny", **kw)
    ckpt = build_backbone("tiny", grad_checkpointing=True, **kw)
    ckpt.load_state_dict(plain.state_dict(), strict=True)
    assert ckpt.vit.grad_checkpointing
    x = torch.randn(2, 3, 144, 112)  # 9x7 grid: padded windows
    grads = []
    for model in (plain, ckpt):
        model.train()
        out = model(x)
        (out["blocks.2"].square().mean() + out["blocks.5"].mean()).backward()
        model.forward_features(x).square().mean().backward()  # timm's checkpoint_seq path
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for n, g in grads[0].items():
        assert g is not None and torch.isfinite(g).all(), n
        torch.testing.assert_close(grads[1][n], g, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "sizes",
    [((128, 192), (192, 128)), ((128, 192), (144, 112))],
    ids=["transposed-8x12-12x8", "unequal-tokens-96-63"],
)
def test_grad_checkpointing_two_grids_before_one_backward(sizes: tuple) -> None:
    """Each forward's recompute uses its own grid, even after a forward at another grid ran."""
    torch.manual_seed(0)
    kw = dict(img_size=128, out_indices=[2, 5], window_size=4)
    plain = build_backbone("tiny", **kw)
    ckpt = build_backbone("tiny", grad_checkpointing=True, **kw)
    ckpt.load_state_dict(plain.state_dict(), strict=True)
    xs = [torch.randn(2, 3, *hw) for hw in sizes]
    grads = []
    for model in (plain, ckpt):
        model.train()
        loss = 0
        for i, x in enumerate(xs):  # both forwards first (multi-task / accumulation), one backward
            out = model(x)
            loss = loss + (i + 1) * (out["blocks.2"].square().sum() + out["blocks.5"].sum())
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n, g in grads[0].items():
        assert g is not None and torch.isfinite(g).all() and g.abs().max() > 0, n
        # relative to each gradient's scale: small gradients must match as closely as large ones
        torch.testing.assert_close(grads[1][n], g, atol=1e-5 * g.abs().max().item(), rtol=1e-4, msg=n)


def test_dynamic_sizes_and_forward_features() -> None:
    _, win = _pair(window_size=4, out_indices=[1, 5])
    for size in ((144, 144), (100, 60), (128, 128)):  # 9x9, 7x4 (input padded to the patch), 8x8
        x = torch.randn(1, 3, *size)
        h, w = -(-size[0] // 16), -(-size[1] // 16)
        with torch.no_grad():
            out, feats = win(x), win.forward_features(x)
        assert out["blocks.5"].shape == (1, 192, h, w)
        assert feats.shape == (1, h * w, 192) and torch.isfinite(feats).all()


def test_drop_path_stays_per_image() -> None:
    """As in ViTDet, stochastic depth drops a whole image's branch, not single windows."""
    torch.manual_seed(0)
    win = build_backbone("tiny", img_size=128, out_indices=[1], window_size=4, drop_path_rate=0.5)
    blk = win.vit.blocks[1]  # block 0 gets drop rate 0 (no DropPath module)
    assert isinstance(blk, WindowedBlock)
    blk.drop_path1.drop_prob, blk.drop_path2.drop_prob = 0.5, 1.0  # only the attention branch is random
    win.train()
    x = torch.randn(16, 64, 192)
    win.forward(torch.randn(1, 3, 128, 128))  # records the 8x8 grid
    with torch.no_grad():
        branch = (blk(x) - x).abs().amax(-1)  # B×N: zero where dropped
    kept = branch > 0
    assert (kept.all(1) | (~kept).all(1)).all()  # per image: all tokens kept, or none
    assert 0 < kept.all(1).sum() < 16


def test_switching_validation_and_rebuild() -> None:
    torch.manual_seed(0)
    ref = build_backbone("tiny", img_size=128)
    assert ref.window_size is None and ref.windowed_blocks == ()
    assert build_backbone("tiny", window_size=0).windowed_blocks == ()
    assert build_backbone("tiny", window_size=None, global_blocks=[1]).windowed_blocks == ()
    win = build_backbone("tiny", window_size=4, global_blocks=[-1, 0])
    assert win.global_blocks == (0, 5) and win.windowed_blocks == (1, 2, 3, 4)
    win.set_window_attention(None)
    assert win.windowed_blocks == () and win.window_size is None
    assert all(type(b) is Block for b in win.vit.blocks)
    win.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(win(x)["blocks.5"], ref(x)["blocks.5"], atol=0, rtol=0)
    with pytest.raises(ValueError, match="out of range"):
        build_backbone("tiny", window_size=4, global_blocks=[6])
    with pytest.raises(ValueError, match="positive"):
        build_backbone("tiny", window_size=-2)
    with pytest.raises(ValueError, match="no default global_blocks for a 5-block"):
        build_backbone("tiny", window_size=4, depth=5)
    assert build_backbone("tiny", window_size=4, depth=5, global_blocks=[4]).windowed_blocks == (0, 1, 2, 3)
    # a checkpoint's stored arch_config plus the config's window keys rebuild the windowed backbone
    again = build_backbone(arch_config=ref.arch_config.to_dict(), window_size=4)
    assert again.windowed_blocks == (0, 1, 3, 4)


def test_vitdet_table_matches_the_variants() -> None:
    for arch in ("b16", "l16", "so400m14", "so400m16", "g16"):
        depth = arch_config_of(arch).depth
        blocks = VITDET_GLOBAL_BLOCKS[depth]
        assert blocks[-1] == depth - 1 and len(blocks) == 4


@pytest.mark.parametrize("variant", ["b16", "l16", "so400m14", "so400m16", "g16"])
def test_coco_vitdet_recipes_turn_windows_on(variant: str, tmp_path: Path, hydra_cleanup: None) -> None:
    from hydra.utils import instantiate

    cfg = compose_train_cfg(
        [f"experiment=coco_maskrcnn_vitdet_{variant}", "backbone.checkpoint=null"], tmp_path / "run"
    )
    depth = arch_config_of(cfg.backbone.arch).depth
    assert cfg.backbone.window_size == 14
    assert tuple(cfg.backbone.global_blocks) == VITDET_GLOBAL_BLOCKS[depth]
    assert cfg.task.backbone.window_size == 14  # what the task builds from and checkpoints store
    if variant == "b16":
        with torch.device("meta"):
            bb = instantiate(cfg.backbone, _convert_="all")
        assert bb.window_size == 14 and bb.global_blocks == (2, 5, 8, 11) and len(bb.windowed_blocks) == 8
        off = compose_train_cfg(
            [f"experiment=coco_maskrcnn_vitdet_{variant}", "backbone.window_size=null"], tmp_path / "run2"
        )
        assert off.backbone.window_size is None


def test_toy_det_trains_a_step_with_windows(
    tmp_path: Path,
    toy_coco_root: Path,  # noqa: F811
    hydra_cleanup: None,
) -> None:
    from siglip_dense.train import run_train

    overrides = [
        "experiment=toy_det",
        "debug=fdr",
        "data.num_workers=0",
        "data.batch_size=2",
        "data.image_size=128",
        "task.detector.rpn_post_nms_top_n_test=50",
        "task.detector.box_detections_per_img=20",
        "backbone.window_size=3",  # 8x8 grid -> 9x9, padded windows
    ]
    cfg = compose_train_cfg(overrides, tmp_path / "run", data_dir=toy_coco_root.parent)
    run_train(cfg)
    saved = OmegaConf.load(tmp_path / "run" / "config.yaml")
    assert saved.backbone.window_size == 3 and saved.backbone.global_blocks is None
