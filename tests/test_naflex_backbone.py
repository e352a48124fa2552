"""NaFlex backbone API: per-image grids in a padded batch, checked against transformers' Siglip2.

The reference is transformers' own ``Siglip2VisionModel`` (random tiny weights saved with
``save_pretrained``), fed the way its processor does: patches flattened (p, p, C) in row-major
order, each image's valid patches first, ``spatial_shapes`` and ``pixel_attention_mask``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from siglip_dense.models import build_backbone
from siglip_dense.models.backbone import SigLIP2Backbone
from siglip_dense.models.weights import read_checkpoint, save_checkpoint
from tests.conftest import PEER_TOL, save_siglip2_vision, siglip2_patchify

transformers = pytest.importorskip("transformers")

P = 16


@pytest.fixture(scope="module")
def naflex(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A tiny Siglip2VisionModel with a 4×4 position table, saved in transformers' format."""
    path = tmp_path_factory.mktemp("siglip2")
    return path, save_siglip2_vision(path, patch_size=P, num_patches=16)


def _hf_tokens(model: torch.nn.Module, images: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each image's valid last_hidden_state tokens from one padded transformers batch."""
    seqs = [siglip2_patchify(im[None], P)[0] for im in images]
    n = max(s.shape[0] for s in seqs)
    pixels = torch.zeros(len(seqs), n, seqs[0].shape[1])
    mask = torch.zeros(len(seqs), n, dtype=torch.long)
    for i, s in enumerate(seqs):
        pixels[i, : len(s)], mask[i, : len(s)] = s, 1
    shapes = torch.tensor([[im.shape[1] // P, im.shape[2] // P] for im in images])
    with torch.no_grad():
        out = model(pixel_values=pixels, pixel_attention_mask=mask, spatial_shapes=shapes).last_hidden_state
    return [out[i, : len(s)] for i, s in enumerate(seqs)]


def _pad_batch(images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-left placement in one zero-padded B×C×H×W batch, and the B×2 patch grids."""
    H = max(im.shape[1] for im in images)
    W = max(im.shape[2] for im in images)
    x = torch.zeros(len(images), 3, H, W)
    for i, im in enumerate(images):
        x[i, :, : im.shape[1], : im.shape[2]] = im
    grids = torch.tensor([[im.shape[1] // P, im.shape[2] // P] for im in images])
    return x, grids


def _valid(tokens: torch.Tensor, grid: tuple[int, int], padded: tuple[int, int]) -> torch.Tensor:
    """Row-major tokens of a padded grid -> the image's own h·w tokens."""
    C = tokens.shape[-1]
    return tokens.view(*padded, C)[: grid[0], : grid[1]].reshape(-1, C)


def test_naflex_is_read_with_its_original_table(naflex: tuple[Path, torch.nn.Module]) -> None:
    path, _ = naflex
    loaded = read_checkpoint(path, img_size=(48, 112))
    assert loaded.arch.pos_resample == "naflex" and loaded.arch.pos_grid == (4, 4)
    assert loaded.state_dict["pos_embed"].shape == (1, 16, 64)
    bb = build_backbone(checkpoint=path, img_size=(48, 112), verbose=False)
    assert bb.img_size == (48, 112) and bb.vit.pos_embed.shape == (1, 16, 64)


@pytest.mark.parametrize("hw", [(80, 112), (48, 160), (64, 64), (112, 48)], ids=["5x7", "3x10", "4x4", "7x3"])
def test_naflex_image_at_grid_not_built_for(
    naflex: tuple[Path, torch.nn.Module], hw: tuple[int, int]
) -> None:
    path, model = naflex
    bb = build_backbone(checkpoint=path, img_size=64, verbose=False).eval()
    torch.manual_seed(1)
    img = torch.randn(3, *hw)
    with torch.no_grad():
        ours = bb.forward_features(img[None])[0]
    assert (ours - _hf_tokens(model, [img])[0]).abs().max().item() <= PEER_TOL


def test_padded_batch_of_two_aspect_ratios(naflex: tuple[Path, torch.nn.Module]) -> None:
    path, model = naflex
    bb = build_backbone(checkpoint=path, out_indices=(0, 1), verbose=False).eval()
    torch.manual_seed(2)
    images = [torch.randn(3, 48, 112), torch.randn(3, 96, 64)]  # 3×7 and 6×4 patches
    x, grids = _pad_batch(images)
    padded = (x.shape[-2] // P, x.shape[-1] // P)
    with torch.no_grad():
        tokens = bb.forward_features(x, grid_sizes=grids)
        maps = bb(x, grid_sizes=grids)
        alone = [bb.forward_features(im[None])[0] for im in images]
    refs = _hf_tokens(model, images)
    assert tokens.shape == (2, padded[0] * padded[1], 64)
    for i, g in enumerate(grids.tolist()):
        mine = _valid(tokens[i], g, padded)
        assert (mine - alone[i]).abs().max().item() <= PEER_TOL
        assert (mine - refs[i]).abs().max().item() <= PEER_TOL
        # padded tokens are zero; the last map is the final normed tokens on the image's grid
        outside = torch.ones(padded, dtype=torch.bool)
        outside[: g[0], : g[1]] = False
        assert tokens[i].view(*padded, -1)[outside].abs().max() == 0
        last = maps["blocks.1"][i].permute(1, 2, 0)
        assert last.shape[:2] == padded and last[outside].abs().max() == 0
        assert (last[: g[0], : g[1]].reshape(-1, 64) - alone[i]).abs().max().item() <= PEER_TOL


def test_grid_sizes_errors(naflex: tuple[Path, torch.nn.Module]) -> None:
    path, _ = naflex
    bb = build_backbone(checkpoint=path, verbose=False).eval()
    x = torch.randn(2, 3, 64, 64)
    with pytest.raises(ValueError, match="does not fit"):
        bb.forward_features(x, grid_sizes=torch.tensor([[4, 4], [5, 1]]))
    with pytest.raises(ValueError, match="B×2"):
        bb.forward_features(x, grid_sizes=torch.tensor([[4, 4]]))
    win = build_backbone(checkpoint=path, window_size=2, global_blocks=[1], verbose=False)
    with pytest.raises(NotImplementedError, match="grid_sizes"):
        win(x, grid_sizes=torch.tensor([[4, 4], [2, 3]]))


def test_fine_tuned_model_keeps_the_convention(naflex: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    """Our checkpoint and a task checkpoint's arch_config keep NaFlex's per-grid rule."""
    path, model = naflex
    bb = build_backbone(checkpoint=path, img_size=96, verbose=False).eval()
    save_checkpoint(tmp_path / "bb.safetensors", bb.state_dict(), bb.arch_config)
    again = build_backbone(checkpoint=tmp_path / "bb.safetensors", verbose=False).eval()
    rebuilt: SigLIP2Backbone = build_backbone(arch_config=bb.arch_config.to_dict(), verbose=False).eval()
    rebuilt.load_state_dict(bb.state_dict())
    torch.manual_seed(3)
    img = torch.randn(3, 80, 48)
    ref = _hf_tokens(model, [img])[0]
    for m in (again, rebuilt):
        assert m.pos_resample == "naflex" and m.img_size == (96, 96)
        with torch.no_grad():
            assert (m.forward_features(img[None])[0] - ref).abs().max().item() <= PEER_TOL
