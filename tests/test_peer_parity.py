"""Final tokens equal each source's own model at its build size and at other sizes.

Every peer is the real library (transformers, timm, open_clip, birder) with tiny random weights,
saved by that library in its own format and read back by ``build_backbone``. Each source's
position-table rule is what makes the other sizes match (README "Position tables").
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from siglip_dense.models import build_backbone
from siglip_dense.models.weights import read_checkpoint
from tests.conftest import (
    PEER_TOL,
    max_abs_diff,
    save_siglip2_vision,
    save_siglip_vision,
    siglip2_patchify,
    to_big_vision,
)

transformers = pytest.importorskip("transformers")
open_clip = pytest.importorskip("open_clip")
birder = pytest.importorskip("birder")

SIZES = [(64, 64), (96, 96), (80, 112), (112, 48)]
SIZE_IDS = ["build", "square", "wide", "tall"]


# ---- transformers SiglipVisionModel (fixed resolution, interpolate_pos_encoding) ---------------------
@pytest.fixture(scope="module")
def hf_siglip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    path = tmp_path_factory.mktemp("siglip")
    return path, save_siglip_vision(path, patch_size=16, image_size=64)


@pytest.mark.parametrize("hw", SIZES, ids=SIZE_IDS)
def test_transformers_siglip_at_any_size(
    hf_siglip: tuple[Path, torch.nn.Module], hw: tuple[int, int]
) -> None:
    path, model = hf_siglip
    bb = build_backbone(checkpoint=path, verbose=False).eval()
    assert bb.pos_resample == "transformers"
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        ref = model(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
        assert max_abs_diff(bb.forward_features(x), ref) <= PEER_TOL


def test_transformers_siglip_built_at_another_size(hf_siglip: tuple[Path, torch.nn.Module]) -> None:
    """Building at 96 (set_input_size) keeps the original table: 80×112 still equals transformers."""
    path, model = hf_siglip
    bb = build_backbone(checkpoint=path, img_size=96, verbose=False).eval()
    assert bb.img_size == (96, 96) and bb.vit.pos_embed.shape[1] == 16
    x = torch.randn(1, 3, 80, 112)
    with torch.no_grad():
        ref = model(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
        assert max_abs_diff(bb.forward_features(x), ref) <= PEER_TOL


def test_patch14_at_384_with_patch_remainder_drop(tmp_path: Path) -> None:
    """siglip2-so400m-patch14-384's case: 384 = 27·14 + 6, the sources drop the last 6 pixels."""
    model = save_siglip_vision(
        tmp_path, hidden_size=32, intermediate_size=64, num_hidden_layers=1, patch_size=14, image_size=384
    )
    drop = build_backbone(checkpoint=tmp_path, patch_remainder="drop", verbose=False).eval()
    pad = build_backbone(checkpoint=tmp_path, verbose=False).eval()
    x = torch.randn(1, 3, 384, 384)
    with torch.no_grad():
        ref = model(pixel_values=x).last_hidden_state
        assert ref.shape[1] == 27 * 27
        assert max_abs_diff(drop.forward_features(x), ref) <= PEER_TOL
        assert drop(x)["blocks.0"].shape[-2:] == (27, 27)
        assert pad.forward_features(x).shape[1] == 28 * 28  # pad covers the last 6 pixels instead


@pytest.mark.parametrize("hw", [(448, 448), (336, 476)], ids=["448", "336x476"])
def test_transformers_patch14_interpolated(tmp_path: Path, hw: tuple[int, int]) -> None:
    """The issue's case: p14 built at 224, run at 448² / 336×476 (bicubic without antialias)."""
    model = save_siglip_vision(
        tmp_path, hidden_size=32, intermediate_size=64, num_hidden_layers=1, patch_size=14, image_size=224
    )
    bb = build_backbone(checkpoint=tmp_path, verbose=False).eval()
    x = torch.randn(1, 3, *hw)
    with torch.no_grad():
        ref = model(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
        assert max_abs_diff(bb.forward_features(x), ref) <= PEER_TOL


# ---- timm ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def timm_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A tiny SigLIP-shaped timm ViT saved with timm's own hub writer (config.json + safetensors)."""
    from timm.models import save_for_hf

    torch.manual_seed(0)
    kw = dict(embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0, img_size=64, act_layer="gelu_tanh")
    model = timm.create_model(
        "vit_base_patch16_siglip_224", num_classes=0, dynamic_img_size=True, **kw
    ).eval()
    path = tmp_path_factory.mktemp("timm")
    save_for_hf(model, str(path), model_args=kw, safe_serialization=True)
    return path, model


@pytest.mark.parametrize("hw", SIZES, ids=SIZE_IDS)
def test_timm_at_any_size(timm_dir: tuple[Path, torch.nn.Module], hw: tuple[int, int]) -> None:
    path, model = timm_dir
    bb = build_backbone(checkpoint=path, verbose=False).eval()
    assert bb.pos_resample == "timm" and bb.arch_config.act_layer == "gelu_tanh"
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        assert max_abs_diff(bb.forward_features(x), model.forward_features(x)) <= PEER_TOL


# ---- open_clip ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def open_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A tiny open_clip SigLIP (timm trunk + text tower) in open_clip's hub layout."""
    from open_clip.push_to_hf_hub import save_config_for_hf
    from safetensors.torch import save_file

    cfgs = tmp_path_factory.mktemp("oc_cfg")
    model_cfg = {
        "embed_dim": 192,
        "init_logit_bias": -10,
        "custom_text": True,
        "vision_cfg": {
            "image_size": 128,
            "timm_model_name": "vit_tiny_patch16_siglip_128",
            "timm_model_pretrained": False,
            "timm_pool": "map",
            "timm_proj": "none",
        },
        "text_cfg": {
            "context_length": 16,
            "vocab_size": 100,
            "width": 32,
            "heads": 2,
            "layers": 1,
            "no_causal_mask": True,
            "proj_bias": True,
            "pool_type": "last",
            "norm_kwargs": {"eps": 1e-6},
            "act_kwargs": {"approximate": "tanh"},
        },
    }
    (cfgs / "tiny-SigLIP-test.json").write_text(json.dumps(model_cfg))
    open_clip.add_model_config(cfgs)
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-SigLIP-test").eval()
    path = tmp_path_factory.mktemp("open_clip")
    save_file(model.state_dict(), str(path / "open_clip_model.safetensors"))
    save_config_for_hf(model, path / "open_clip_config.json", model_config=model_cfg)
    return path, model


@pytest.mark.parametrize("hw", [(128, 128), (160, 160), (96, 144)], ids=["build", "square", "wide"])
def test_open_clip_at_any_size(open_clip_dir: tuple[Path, torch.nn.Module], hw: tuple[int, int]) -> None:
    path, model = open_clip_dir
    bb = build_backbone(checkpoint=path, verbose=False).eval()
    assert read_checkpoint(path).source_format == "open_clip" and bb.pos_resample == "timm"
    visual = copy.deepcopy(model.visual)  # set_input_size resamples the table in place
    visual.set_input_size(hw)  # open_clip's way to run another size (timm's resample)
    x = torch.randn(1, 3, *hw)
    with torch.no_grad():
        assert max_abs_diff(bb.forward_features(x), visual.trunk.forward_features(x)) <= PEER_TOL


# ---- birder -----------------------------------------------------------------------------------
BIRDER_CFG = {"num_layers": 2, "num_heads": 2, "hidden_dim": 64, "mlp_dim": 128, "out_indices": [0, 1]}


@pytest.fixture(scope="module")
def birder_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny ``vit_so400m_p14_ap`` written by birder itself: ``.pt`` ({"state": ...}) and ``.safetensors``."""
    from birder.common import fs_ops
    from birder.conf import settings
    from birder.model_registry import registry

    torch.manual_seed(0)
    net = registry.net_factory("vit_so400m_p14_ap", 0, 3, config=BIRDER_CFG, size=(56, 84)).eval()
    signature = {"inputs": [{"data_shape": [0, 3, 56, 84]}], "outputs": [{"data_shape": [0, 0]}]}
    rgb = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    out = tmp_path_factory.mktemp("birder")
    mp = pytest.MonkeyPatch()
    mp.setattr(settings, "MODELS_DIR", out)  # where birder's checkpoint_model writes
    try:
        fs_ops.checkpoint_model(
            "vit_so400m_p14_ap",
            0,
            net,
            signature,
            {},
            rgb,
            None,
            None,
            None,
            None,
            external_config=BIRDER_CFG,
        )
    finally:
        mp.undo()
    fs_ops.save_st(
        net, str(out / "net.safetensors"), net.task, {}, signature, rgb, external_config=BIRDER_CFG
    )
    return {"pt": out / "vit_so400m_p14_ap_0.pt", "safetensors": out / "net.safetensors"}


def _birder_reference(path: Path) -> torch.nn.Module:
    """The network as birder itself loads the file, resampling its table for other sizes."""
    from birder.common import fs_ops

    net, _ = fs_ops.load_model(
        torch.device("cpu"), "vit_so400m_p14_ap", path=path, inference=True, st=path.suffix == ".safetensors"
    )
    net.set_dynamic_size()
    return net.eval()


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
@pytest.mark.parametrize("hw", [(56, 84), (84, 84), (112, 70)], ids=["build", "square", "tall"])
def test_birder_at_any_size(birder_files: dict[str, Path], fmt: str, hw: tuple[int, int]) -> None:
    path = birder_files[fmt]
    ref = _birder_reference(path)
    loaded = read_checkpoint(path)
    assert loaded.source_format == "birder" and loaded.arch.act_layer == "gelu"  # birder's exact GELU
    assert loaded.arch.img_size == (56, 84) and loaded.arch.pos_resample == "birder"
    bb = build_backbone(checkpoint=path, out_indices=(0, 1), norm_intermediates=False, verbose=False).eval()
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        assert max_abs_diff(bb.forward_features(x), ref.forward_features(x)) <= PEER_TOL
        # birder's detection_features: un-normed maps of out_indices = ours with norm_intermediates=False
        theirs, ours = ref.detection_features(x), bb(x)
        for stage, key in zip(("stage1", "stage2"), ("blocks.0", "blocks.1")):
            assert max_abs_diff(ours[key], theirs[stage]) <= PEER_TOL


# ---- big_vision NaFlex .npz --------------------------------------------------------------------
def test_big_vision_naflex_npz(tmp_path: Path) -> None:
    """A NaFlex archive (Dense patch kernel (p·p·C, D), (n, n, D) table) equals transformers' Siglip2
    holding the same numbers, at a grid the table was not built for."""
    ref = save_siglip2_vision(tmp_path / "hf", patch_size=16, num_patches=16)
    vit = build_backbone(checkpoint=tmp_path / "hf", keep_head=True, verbose=False).vit
    arrays = to_big_vision(vit, "params/img/")
    conv = arrays["params/img/embedding/kernel"]  # (p, p, C, D) conv kernel
    arrays["params/img/embedding/kernel"] = conv.reshape(-1, conv.shape[-1])  # NaFlex Dense: (p·p·C, D)
    arrays["params/img/pos_embedding"] = arrays["params/img/pos_embedding"].reshape(4, 4, 64)
    np.savez(tmp_path / "naflex.npz", **arrays)
    bb = build_backbone(checkpoint=tmp_path / "naflex.npz", verbose=False).eval()
    assert bb.pos_resample == "naflex" and bb.pos_grid == (4, 4)
    img = torch.randn(3, 80, 112)
    patches = siglip2_patchify(img[None], 16)
    with torch.no_grad():
        theirs = ref(
            pixel_values=patches,
            pixel_attention_mask=torch.ones(1, 35, dtype=torch.long),
            spatial_shapes=torch.tensor([[5, 7]]),
        ).last_hidden_state
        assert max_abs_diff(bb.forward_features(img[None]), theirs) <= PEER_TOL


def test_converted_birder_keeps_its_rule(birder_files: dict[str, Path], tmp_path: Path) -> None:
    """tools/convert_weights.py -> our format: the birder rule travels with the weights."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "convert_weights", Path(__file__).parents[1] / "tools/convert_weights.py"
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "birder.safetensors"
    assert tool.main([str(birder_files["pt"]), str(out)]) == 0
    bb = build_backbone(checkpoint=out, verbose=False).eval()
    assert bb.pos_resample == "birder" and bb.arch_config.act_layer == "gelu"
    ref = _birder_reference(birder_files["pt"])
    x = torch.randn(1, 3, 98, 98)
    with torch.no_grad():
        assert max_abs_diff(bb.forward_features(x), ref.forward_features(x)) <= PEER_TOL
