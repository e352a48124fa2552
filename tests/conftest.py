"""Shared fixtures: composing the Hydra configs the way train.py does; tiny peer models (transformers,
big_vision) in their own formats for the parity tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, open_dict, read_write  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"


def compose_train_cfg(overrides: list[str], run_dir: Path, data_dir: Path | None = None) -> DictConfig:
    """Compose ``configs/train.yaml`` as ``python train.py <overrides>`` would, with a fixed run dir."""
    return compose_cfg("train", overrides, run_dir, data_dir)


def compose_cfg(
    config_name: str, overrides: list[str], run_dir: Path, data_dir: Path | None = None
) -> DictConfig:
    """Compose an entry config (train / eval) as its Hydra app would, with a fixed run dir."""
    GlobalHydra.instance().clear()
    extra = [f"hydra.run.dir={run_dir}", f"paths.log_dir={run_dir.parent}"]
    if data_dir is not None:
        extra.append(f"paths.data_dir={data_dir}")
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose(config_name, overrides=[*overrides, *extra], return_hydra_config=True)
    # hydra.runtime.output_dir is filled by Hydra's job runner, which compose() does not run
    with read_write(cfg), open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.paths.output_dir = str(run_dir)
    HydraConfig().set_config(cfg)
    with read_write(cfg), open_dict(cfg):
        del cfg["hydra"]  # as @hydra.main hands it to the task function
    return cfg


@pytest.fixture(scope="session")
def toy_data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One generated toy dataset (ADE20K layout) shared by the session's tests."""
    from siglip_dense.data.toy import ensure_toy_data

    root = tmp_path_factory.mktemp("data") / "toy_seg"
    ensure_toy_data(root)
    return root


@pytest.fixture()
def hydra_cleanup() -> Iterator[None]:
    yield
    GlobalHydra.instance().clear()


# ---- tiny peer models, shared by test_weights / test_peer_parity / test_naflex_backbone ---------------
PEER_TOL = 1e-4  # max |ours - theirs| on the float32 features of the tiny models below
# transformers' vision config of the tiny towers (64 wide, 2 heads, 2 layers); tests override single keys
TINY_HF_VISION: dict[str, int] = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2
)


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| of two tensors of the same shape (a shape mismatch fails, naming both)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def tiny_hf_vision_kwargs(**overrides: object) -> dict:
    """:data:`TINY_HF_VISION` with ``overrides`` (patch_size, image_size, num_patches, ...)."""
    return {**TINY_HF_VISION, **overrides}


def save_siglip_vision(path: Path, **overrides: object) -> torch.nn.Module:
    """A tiny transformers ``SiglipVisionModel`` (seed 0, eval) written with ``save_pretrained``."""
    import transformers

    torch.manual_seed(0)
    config = transformers.SiglipVisionConfig(**tiny_hf_vision_kwargs(**overrides))
    model = transformers.SiglipVisionModel(config).eval()
    model.save_pretrained(path)
    return model


def save_siglip2_vision(path: Path, **overrides: object) -> torch.nn.Module:
    """A tiny transformers ``Siglip2VisionModel`` (NaFlex; seed 0, eval) written with ``save_pretrained``."""
    import transformers

    torch.manual_seed(0)
    config = transformers.Siglip2VisionConfig(**tiny_hf_vision_kwargs(**overrides))
    model = transformers.Siglip2VisionModel(config).eval()
    model.save_pretrained(path)
    return model


def siglip2_patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """B×C×H×W -> B×(h·w)×(p·p·C): Siglip2ImageProcessor's layout (patches row-major, each (p, p, C))."""
    b, c, h, w = x.shape
    gh, gw = h // patch, w // patch
    return (
        x.reshape(b, c, gh, patch, gw, patch).permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, patch * patch * c)
    )


def to_big_vision(vit: torch.nn.Module, prefix: str) -> dict[str, np.ndarray]:
    """Write a timm ViT in big_vision's naming (the inverse of timm's ``_load_weights``)."""
    sd = {k: v.detach().numpy() for k, v in vit.state_dict().items()}
    c = vit.embed_dim
    h = vit.blocks[0].attn.num_heads
    d = c // h
    out = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"],
        "pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
    }

    def mha(dst: str, q_w, q_b, k_w, k_b, v_w, v_b, o_w, o_b) -> None:
        for n, w, b in (("query", q_w, q_b), ("key", k_w, k_b), ("value", v_w, v_b)):
            out[f"{dst}{n}/kernel"] = w.T.reshape(c, h, d)
            out[f"{dst}{n}/bias"] = b.reshape(h, d)
        out[f"{dst}out/kernel"] = o_w.reshape(c, h, d).transpose(1, 2, 0)
        out[f"{dst}out/bias"] = o_b

    def mlp(dst: str, src: str) -> None:
        for r in range(2):
            out[f"{dst}Dense_{r}/kernel"] = sd[f"{src}fc{r + 1}.weight"].T
            out[f"{dst}Dense_{r}/bias"] = sd[f"{src}fc{r + 1}.bias"]

    for i in range(len(vit.blocks)):
        bp, tp = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        for ln, norm in (("LayerNorm_0", "norm1"), ("LayerNorm_1", "norm2")):
            out[f"{bp}{ln}/scale"], out[f"{bp}{ln}/bias"] = sd[f"{tp}{norm}.weight"], sd[f"{tp}{norm}.bias"]
        qw, qb = sd[f"{tp}attn.qkv.weight"], sd[f"{tp}attn.qkv.bias"]
        mha(
            f"{bp}MultiHeadDotProductAttention_0/",
            *(qw[:c], qb[:c], qw[c : 2 * c], qb[c : 2 * c], qw[2 * c :], qb[2 * c :]),
            sd[f"{tp}attn.proj.weight"],
            sd[f"{tp}attn.proj.bias"],
        )
        mlp(f"{bp}MlpBlock_0/", f"{tp}mlp.")
    hp = "MAPHead_0/"
    out[f"{hp}probe"] = sd["attn_pool.latent"]
    kw, kb = sd["attn_pool.kv.weight"], sd["attn_pool.kv.bias"]
    mha(
        f"{hp}MultiHeadDotProductAttention_0/",
        *(sd["attn_pool.q.weight"], sd["attn_pool.q.bias"], kw[:c], kb[:c], kw[c:], kb[c:]),
        sd["attn_pool.proj.weight"],
        sd["attn_pool.proj.bias"],
    )
    out[f"{hp}LayerNorm_0/scale"], out[f"{hp}LayerNorm_0/bias"] = (
        sd["attn_pool.norm.weight"],
        sd["attn_pool.norm.bias"],
    )
    mlp(f"{hp}MlpBlock_0/", "attn_pool.mlp.")
    return {prefix + k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}
