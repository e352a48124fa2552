"""Checkpoint formats -> timm keys, checked against the real libraries (transformers, timm).

Every model here is tiny and random; parity is measured on outputs, never on hard-coded numbers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from siglip_dense.models import build_backbone
from siglip_dense.models.arch import ArchConfig, create_vit
from siglip_dense.models.weights import (
    CheckpointError,
    check_arch_matches,
    load_into_vit,
    read_checkpoint,
    save_checkpoint,
)
from tests.conftest import (
    PEER_TOL,
    max_abs_diff,
    save_siglip_vision,
    siglip2_patchify,
    tiny_hf_vision_kwargs,
    to_big_vision,
)

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
TINY = dict(embed_dim=64, depth=2, num_heads=2, mlp_dim=128)


def _text_kwargs() -> dict:
    # token ids inside the tiny vocabulary keep transformers' config validation quiet
    return dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=100,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=1,
    )


def _check_hf_parity(ckpt: Path | str, ref: torch.nn.Module, size: int) -> None:
    """``forward_features`` == ``last_hidden_state`` and ``forward_pooled`` == ``pooler_output``."""
    bb = build_backbone(checkpoint=ckpt, keep_head=True, verbose=False).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        out = ref(pixel_values=x)
        assert max_abs_diff(bb.forward_features(x), out.last_hidden_state) <= PEER_TOL
        assert max_abs_diff(bb.forward_pooled(x), out.pooler_output) <= PEER_TOL


# ---- transformers Siglip ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("patch", "image", "eps", "act"),
    [
        (16, 224, 1e-6, "gelu_pytorch_tanh"),  # 14x14 grid: not a power of two
        (14, 98, 1e-5, "gelu_pytorch_tanh"),  # patch 14, non-default eps
        (16, 64, 1e-6, "gelu"),  # exact GELU must stay exact
    ],
)
def test_siglip_vision_model_parity(tmp_path: Path, patch: int, image: int, eps: float, act: str) -> None:
    ref = save_siglip_vision(tmp_path, patch_size=patch, image_size=image, layer_norm_eps=eps, hidden_act=act)
    loaded = read_checkpoint(tmp_path)
    assert loaded.source_format == "transformers"
    a = loaded.arch
    assert (a.embed_dim, a.depth, a.num_heads, a.mlp_dim, a.patch_size) == (64, 2, 2, 128, patch)
    assert a.img_size == (image, image) and a.norm_eps == eps and a.has_head
    assert a.act_layer == ("gelu_tanh" if "tanh" in act else "gelu")
    _check_hf_parity(tmp_path, ref, image)


def test_siglip_model_drops_text_tower(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = transformers.SiglipConfig(
        vision_config=tiny_hf_vision_kwargs(patch_size=16, image_size=64), text_config=_text_kwargs()
    )
    ref = transformers.SiglipModel(cfg).eval()
    ref.save_pretrained(tmp_path)
    pre = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.5, 0.5]}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(pre))
    loaded = read_checkpoint(tmp_path)
    assert loaded.arch.std == (0.25, 0.5, 0.5)
    assert any(k.startswith("text_model.") for k in loaded.dropped_keys)
    assert "logit_scale" in loaded.dropped_keys
    assert not any("text" in k for k in loaded.state_dict)
    _check_hf_parity(tmp_path, ref.vision_model, 64)


def test_single_safetensors_file(tmp_path: Path) -> None:
    # 64-wide heads: without a config, the head count is inferred from the width
    ref = save_siglip_vision(tmp_path / "hf", hidden_size=128, num_attention_heads=2, image_size=64)
    alone = tmp_path / "alone" / "model.safetensors"
    alone.parent.mkdir()
    shutil.copy(tmp_path / "hf" / "model.safetensors", alone)
    loaded = read_checkpoint(alone)
    assert loaded.guessed == {"num_heads"} and loaded.arch.num_heads == 2
    _check_hf_parity(alone, ref, 64)
    # inside its save_pretrained dir the file uses the config beside it (nothing guessed)
    assert read_checkpoint(tmp_path / "hf" / "model.safetensors").guessed == set()


def test_siglip_model_single_file_with_prefix(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = transformers.SiglipConfig(
        vision_config=tiny_hf_vision_kwargs(hidden_size=128, image_size=32, patch_size=16),
        text_config=_text_kwargs(),
    )
    ref = transformers.SiglipModel(cfg).eval()
    ref.save_pretrained(tmp_path / "hf")
    alone = tmp_path / "weights.safetensors"
    shutil.copy(tmp_path / "hf" / "model.safetensors", alone)
    _check_hf_parity(alone, ref.vision_model, 32)


def test_sharded_and_bin_save_pretrained(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = transformers.SiglipVisionModel(
        transformers.SiglipVisionConfig(**tiny_hf_vision_kwargs(image_size=32, patch_size=16))
    ).eval()
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    _check_hf_parity(tmp_path / "sharded", model, 32)
    # a pytorch_model.bin next to the same config.json
    (tmp_path / "bin").mkdir()
    shutil.copy(tmp_path / "sharded" / "config.json", tmp_path / "bin" / "config.json")
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    _check_hf_parity(tmp_path / "bin", model, 32)


# ---- transformers Siglip2 (NaFlex) ----------------------------------------------------------------
@pytest.mark.parametrize(("with_text", "img_size"), [(False, 96), (False, 48), (False, None), (True, 80)])
def test_siglip2_naflex_parity(tmp_path: Path, with_text: bool, img_size: int | None) -> None:
    torch.manual_seed(0)
    vkw = tiny_hf_vision_kwargs(patch_size=16, num_patches=16, layer_norm_eps=1e-5)  # 4x4 position table
    if with_text:
        model = transformers.Siglip2Model(
            transformers.Siglip2Config(vision_config=vkw, text_config=_text_kwargs())
        ).eval()
        ref = model.vision_model
    else:
        model = ref = transformers.Siglip2VisionModel(transformers.Siglip2VisionConfig(**vkw)).eval()
    model.save_pretrained(tmp_path)
    size = img_size or 64
    loaded = read_checkpoint(tmp_path, img_size=img_size)
    assert loaded.arch.img_size == (size, size) and loaded.arch.norm_eps == 1e-5
    assert loaded.state_dict["patch_embed.proj.weight"].shape == (64, 3, 16, 16)
    bb = build_backbone(checkpoint=tmp_path, img_size=img_size, keep_head=True, verbose=False).eval()
    x = torch.randn(2, 3, size, size)
    g = size // 16
    with torch.no_grad():
        out = ref(
            pixel_values=siglip2_patchify(x, 16),
            pixel_attention_mask=torch.ones(2, g * g, dtype=torch.long),
            spatial_shapes=torch.tensor([[g, g]] * 2),
        )
        assert max_abs_diff(bb.forward_features(x), out.last_hidden_state) <= PEER_TOL
        assert max_abs_diff(bb.forward_pooled(x), out.pooler_output) <= PEER_TOL


# ---- timm / open_clip / big_vision ----------------------------------------------------------------
def _tiny_timm(depth: int = 2) -> torch.nn.Module:
    """The registered tiny SigLIP (192 wide, 3 heads: the family table knows its head count)."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_siglip_128", num_classes=0, img_size=64, depth=depth).eval()
    with torch.no_grad():  # timm zero-inits some tensors; make every weight matter
        for p in vit.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return vit


def _assert_same_outputs(ckpt: Path, src: torch.nn.Module, **kw: object) -> None:
    bb = build_backbone(checkpoint=ckpt, keep_head=True, verbose=False, **kw).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(bb.forward_features(x), src.forward_features(x), rtol=0, atol=1e-6)
        ref_pool = src.forward_head(src.forward_features(x), pre_logits=True)
        torch.testing.assert_close(bb.forward_pooled(x), ref_pool, rtol=0, atol=1e-6)


def test_timm_safetensors(tmp_path: Path) -> None:
    src = _tiny_timm(depth=6)  # the registered variant's full depth, so arch="tiny" fits too
    save_file(src.state_dict(), str(tmp_path / "vit.safetensors"))
    loaded = read_checkpoint(tmp_path / "vit.safetensors")
    assert loaded.source_format == "timm" and loaded.arch.num_heads == 3 and loaded.arch.has_head
    _assert_same_outputs(tmp_path / "vit.safetensors", src)
    _assert_same_outputs(tmp_path / "vit.safetensors", src, arch="tiny")


def test_timm_hub_dir_reads_config(tmp_path: Path) -> None:
    src = _tiny_timm()
    save_file(src.state_dict(), str(tmp_path / "model.safetensors"))
    config = {
        "architecture": "vit_tiny_patch16_siglip_128",
        "num_classes": 0,
        "pretrained_cfg": {"mean": [0.4, 0.5, 0.6], "std": [0.3, 0.3, 0.3], "input_size": [3, 64, 64]},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = read_checkpoint(tmp_path)
    assert loaded.arch.arch == "vit_tiny_patch16_siglip_128" and loaded.guessed == set()
    assert loaded.arch.mean == (0.4, 0.5, 0.6)
    _assert_same_outputs(tmp_path, src)


def test_open_clip_bin_drops_text(tmp_path: Path) -> None:
    src = _tiny_timm()
    sd = {f"visual.trunk.{k}": v for k, v in src.state_dict().items()}
    sd["text.transformer.resblocks.0.attn.in_proj_weight"] = torch.randn(96, 32)
    sd["text.token_embedding.weight"] = torch.randn(10, 32)
    sd["logit_scale"] = torch.ones(())
    torch.save(sd, tmp_path / "open_clip_pytorch_model.bin")
    loaded = read_checkpoint(tmp_path)
    assert loaded.source_format == "open_clip"
    assert "logit_scale" in loaded.dropped_keys and "text.token_embedding.weight" in loaded.dropped_keys
    _assert_same_outputs(tmp_path, src)


def test_training_container_is_unwrapped(tmp_path: Path) -> None:
    src = _tiny_timm()
    ckpt = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}
    torch.save(ckpt, tmp_path / "last.pth")
    _assert_same_outputs(tmp_path / "last.pth", src)


def _stack_blocks(arrays: dict[str, np.ndarray], prefix: str, depth: int) -> dict[str, np.ndarray]:
    """big_vision's scanned layout: one ``encoderblock`` whose arrays carry a leading depth axis."""
    first = f"{prefix}Transformer/encoderblock_0/"
    out = {k: v for k, v in arrays.items() if "/encoderblock_" not in k}
    for k in [k for k in arrays if k.startswith(first)]:
        name = k[len(first) :]
        blocks = [arrays[f"{prefix}Transformer/encoderblock_{i}/{name}"] for i in range(depth)]
        out[f"{prefix}Transformer/encoderblock/{name}"] = np.stack(blocks)
    return out


@pytest.mark.parametrize("scanned", [False, True])
def test_big_vision_npz(tmp_path: Path, scanned: bool) -> None:
    from timm.models.vision_transformer import _load_weights

    src = _tiny_timm()
    arrays = to_big_vision(src, "params/img/")
    if scanned:
        arrays = _stack_blocks(arrays, "params/img/", len(src.blocks))
    arrays["params/txt/Embed_0/embedding"] = np.zeros((10, 32), np.float32)
    arrays["params/t"] = np.ones((1,), np.float32)
    npz = tmp_path / "siglip.npz"
    np.savez(npz, **arrays)
    loaded = read_checkpoint(npz)
    assert loaded.source_format == "big_vision" and loaded.arch.num_heads == 3 and loaded.arch.has_head
    assert "params/t" in loaded.dropped_keys
    # the round trip is exact, and matches a timm model loaded by timm's own npz loader
    for k, v in src.state_dict().items():
        torch.testing.assert_close(loaded.state_dict[k], v, rtol=0, atol=0, msg=k)
    direct = create_vit(loaded.arch, keep_head=True)
    with torch.no_grad():
        _load_weights(direct, str(npz), prefix="params/img/")
    _assert_same_outputs(npz, direct)


# ---- our format, the CLI ------------------------------------------------------------------------
def test_save_checkpoint_round_trip(tmp_path: Path) -> None:
    src = _tiny_timm()
    cfg = replace(read_checkpoint_arch(src), norm_eps=1e-5, arch="vit_tiny_patch16_siglip_128")
    out = tmp_path / "ours.safetensors"
    save_checkpoint(out, src.state_dict(), cfg)
    loaded = read_checkpoint(out)
    assert loaded.source_format == "siglip_dense" and loaded.arch == cfg
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["format"] == "siglip_dense" and side["patch_size"] == 16 and side["img_size"] == [64, 64]


def test_our_format_non_square_grid(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = ArchConfig(**TINY, patch_size=16, img_size=(32, 32))
    bb = build_backbone(arch_config=cfg, img_size=(48, 80), verbose=False).eval()
    out = tmp_path / "rect.safetensors"
    save_checkpoint(out, bb.state_dict(), bb.arch_config)  # the backbone's own keys (vit.*)
    again = build_backbone(checkpoint=out, verbose=False).eval()
    assert again.img_size == (48, 80) and again.arch_config.num_heads == 2
    x = torch.randn(1, 3, 48, 80)
    with torch.no_grad():
        torch.testing.assert_close(again.forward_features(x), bb.forward_features(x), rtol=0, atol=0)
    # loading into another grid resamples from the stored 3x5 grid
    report = load_into_vit(create_vit(cfg), read_checkpoint(out))
    assert report.reshaped == ["pos_embed (1, 15, 64)->(1, 4, 64)"]


def read_checkpoint_arch(vit: torch.nn.Module) -> ArchConfig:
    from siglip_dense.models.arch import arch_config_of_vit

    return arch_config_of_vit(vit)


@pytest.mark.slow
def test_convert_weights_cli_round_trip(tmp_path: Path) -> None:
    save_siglip_vision(tmp_path / "hf", patch_size=14, image_size=98, layer_norm_eps=1e-5)
    out = tmp_path / "out" / "b.safetensors"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "convert_weights.py"), str(tmp_path / "hf"), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "transformers" in proc.stdout
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["patch_size"] == 14 and side["img_size"] == [98, 98]
    assert side["mean"] == [0.5, 0.5, 0.5] and side["std"] == [0.5, 0.5, 0.5]
    assert side["arch_config"]["norm_eps"] == 1e-5 and side["arch_config"]["num_heads"] == 2
    a = build_backbone(checkpoint=tmp_path / "hf", verbose=False).eval()
    b = build_backbone(checkpoint=out, verbose=False).eval()
    assert read_checkpoint(out).source_format == "siglip_dense"
    x = torch.randn(1, 3, 98, 98)
    with torch.no_grad():
        torch.testing.assert_close(a.forward_features(x), b.forward_features(x), rtol=0, atol=0)
        for k, v in a(x).items():
            torch.testing.assert_close(v, b(x)[k], rtol=0, atol=0)


def test_convert_weights_cli_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import convert_weights
    finally:
        sys.path.remove(str(REPO / "tools"))
    bad = tmp_path / "junk.safetensors"
    bad.write_bytes(b"not a checkpoint")
    assert convert_weights.main([str(bad), str(tmp_path / "o.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "junk.safetensors" in err and "Traceback" not in err


# ---- hub ids from the local cache ------------------------------------------------------------------
def test_hub_id_from_local_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "hub"
    repo = cache / "models--acme--siglip-tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    ref = save_siglip_vision(repo / "snapshots" / commit, image_size=32)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    loaded = read_checkpoint("acme/siglip-tiny")
    assert loaded.source_format == "transformers" and commit in str(loaded.path)
    _check_hf_parity("acme/siglip-tiny", ref, 32)
    with pytest.raises(CheckpointError, match="local") as e:
        read_checkpoint("acme/not-cached")
    assert "acme/not-cached" in str(e.value) and str(cache) in str(e.value)


# ---- bad checkpoints -------------------------------------------------------------------------------
class Payload:
    """An arbitrary object: ``weights_only=True`` must refuse to unpickle it."""

    def __init__(self) -> None:
        self.x = 1


def test_truncated_safetensors(tmp_path: Path) -> None:
    src = _tiny_timm()
    path = tmp_path / "cut.safetensors"
    save_file(src.state_dict(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        read_checkpoint(path)


def test_truncated_torch_and_npz(tmp_path: Path) -> None:
    src = _tiny_timm()
    torch.save(src.state_dict(), tmp_path / "cut.pth")
    np.savez(tmp_path / "cut.npz", a=np.zeros(1000, np.float32))
    for name in ("cut.pth", "cut.npz"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
            read_checkpoint(tmp_path / name)


def test_wrong_arch(tmp_path: Path) -> None:
    save_siglip_vision(tmp_path / "tiny_dir", image_size=32)
    with pytest.raises(CheckpointError) as e:
        build_backbone(arch="vit_base_patch16_siglip_224", checkpoint=tmp_path / "tiny_dir", verbose=False)
    msg = str(e.value)
    assert "tiny_dir" in msg and "vit_base_patch16_siglip_224" in msg
    assert "embed_dim=768" in msg and "embed_dim=64" in msg


def test_text_only_checkpoint(tmp_path: Path) -> None:
    sd = {
        "text_model.embeddings.token_embedding.weight": torch.randn(10, 8),
        "text_model.final_layer_norm.weight": torch.ones(8),
    }
    save_file(sd, str(tmp_path / "text.safetensors"))
    with pytest.raises(CheckpointError, match="text.safetensors") as e:
        read_checkpoint(tmp_path / "text.safetensors")
    assert "text_model.embeddings.token_embedding.weight" in str(e.value)


def test_clip_is_not_siglip(tmp_path: Path) -> None:
    cfg = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32
    )
    transformers.CLIPVisionModel(cfg).save_pretrained(tmp_path / "clip")
    with pytest.raises(CheckpointError, match="not SigLIP") as e:
        read_checkpoint(tmp_path / "clip")
    assert "clip" in str(e.value)


def test_random_dict(tmp_path: Path) -> None:
    torch.save({"foo": torch.zeros(3), "bar": torch.ones(2)}, tmp_path / "random.bin")
    with pytest.raises(CheckpointError, match="random.bin") as e:
        read_checkpoint(tmp_path / "random.bin")
    assert "foo" in str(e.value)
    torch.save({"epoch": 1, "note": "hi"}, tmp_path / "nothing.pt")
    with pytest.raises(CheckpointError, match="nothing.pt"):
        read_checkpoint(tmp_path / "nothing.pt")


def test_arbitrary_object_refused(tmp_path: Path) -> None:
    src = _tiny_timm()
    torch.save({"state_dict": src.state_dict(), "extra": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="weights_only") as e:
        read_checkpoint(tmp_path / "evil.pth")
    assert "evil.pth" in str(e.value) and "Payload" in str(e.value)
    (tmp_path / "garbage.bin").write_bytes(b"definitely not a pickle")
    with pytest.raises(CheckpointError, match="garbage.bin.*corrupt"):
        read_checkpoint(tmp_path / "garbage.bin")


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does_not_exist.safetensors"):
        read_checkpoint(tmp_path / "does_not_exist.safetensors")


# ---- load_into_vit ---------------------------------------------------------------------------------
def test_load_into_vit_reports(tmp_path: Path) -> None:
    save_siglip_vision(tmp_path, image_size=64)
    loaded = read_checkpoint(tmp_path)
    vit = create_vit(replace(loaded.arch, img_size=(96, 96)), keep_head=False)
    report = load_into_vit(vit, loaded)
    assert report.reshaped and report.reshaped[0].startswith("pos_embed")
    assert report.skipped_head and all(k.startswith("attn_pool.") for k in report.skipped_head)
    assert not report.missing and not report.unexpected
    text = str(report)
    assert "reshaped 1" in text and "skipped head" in text
    # a different mlp width: strict raises naming the file and the key, non-strict just reports
    other = create_vit(replace(loaded.arch, mlp_dim=96), keep_head=True)
    with pytest.raises(CheckpointError, match="mlp.fc1.weight") as e:
        load_into_vit(other, loaded, strict=True)
    assert str(tmp_path) in str(e.value)
    report = load_into_vit(other, loaded, strict=False)
    assert report.mismatched and report.missing


def test_backbone_checkpoint_without_a_block_is_an_error_unless_strict_false(tmp_path: Path) -> None:
    """The error names the file, the random block and the way out; strict=False warns and loads the rest."""
    src = build_backbone("tiny", out_indices=[-1], verbose=False)
    state = {k: v for k, v in src.vit.state_dict().items() if not k.startswith("blocks.3.")}
    path = tmp_path / "no_block3.safetensors"
    save_checkpoint(path, state, src.arch_config)
    with pytest.raises(
        CheckpointError,
        match=r"no_block3\.safetensors.*blocks\.3 would stay random.*\+backbone\.strict=false",
    ):
        build_backbone("tiny", checkpoint=path, verbose=False)
    with pytest.warns(UserWarning, match=r"no_block3\.safetensors.*blocks\.3 would stay random"):
        built = build_backbone("tiny", checkpoint=path, strict=False, verbose=False)
    own = built.vit.state_dict()
    assert all(torch.equal(own[k], v) for k, v in state.items())


def test_birder_file_of_other_widths_says_its_head_count_is_assumed(tmp_path: Path) -> None:
    """birder's ``.pt`` stores only overrides of its registered network (often none): with widths
    that are not the registered network's, the registered head count is an assumption, said so
    with the way to set it; set, the backbone is birder's own network."""
    import warnings

    from tests.test_fix16 import BIRDER_TINY, _birder_file, _birder_reference

    path = _birder_file(tmp_path, "vit_so400m_p14_ap", (56, 56))
    raw = torch.load(path, map_location="cpu", weights_only=False)  # birder's own file
    raw.pop("config")  # as birder's published weights: no network config
    bare = tmp_path / "vit_so400m_p14_ap_1.pt"
    torch.save(raw, bare)
    with pytest.warns(
        UserWarning,
        match=r"vit_so400m_p14_ap_1\.pt: .*registered vit_so400m_p14_ap \(hidden_dim 64 \(registered 1152\).*"
        r"head count 16 .* is assumed.*\+backbone\.num_heads=N",
    ):
        build_backbone(checkpoint=bare, verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        set_heads = build_backbone(checkpoint=bare, num_heads=BIRDER_TINY["num_heads"], verbose=False).eval()
        build_backbone(checkpoint=path, verbose=False)  # the file's own config names the heads
    assert not [w for w in caught if "head count" in str(w.message)]
    ref = _birder_reference(path, "vit_so400m_p14_ap")
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        assert (set_heads.forward_features(x) - ref.forward_features(x)).abs().max() <= 1e-5


def test_guessed_heads_taken_from_requested_arch(tmp_path: Path) -> None:
    cfg = ArchConfig(**TINY, patch_size=16, img_size=(32, 32))
    src = create_vit(cfg, keep_head=True).eval()
    save_file(src.state_dict(), str(tmp_path / "custom.safetensors"))
    loaded = read_checkpoint(tmp_path / "custom.safetensors")
    # 64 wide, no config: the head count is a guess (one 64-wide head) ...
    assert loaded.guessed == {"num_heads"} and loaded.arch.num_heads == 1
    # ... that an explicitly requested arch overrides instead of failing the shape check
    check_arch_matches(cfg, loaded)
    assert loaded.arch.num_heads == 2 and not loaded.guessed
