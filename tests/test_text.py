"""Text tower: embeddings equal transformers' ``get_text_features`` for tiny random SigLIP / SigLIP 2
checkpoints saved locally, with tokenizers trained locally in the checkpoint's own tokenizer class."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from siglip_dense.models import build_text_encoder
from siglip_dense.models.text import TEMPLATES, parse_classes, resolve_templates
from siglip_dense.models.weights import CheckpointError
from tests.conftest import PEER_TOL, max_abs_diff

CORPUS = [
    "a photo of a cat",
    "a bad photo of the dog on the sofa",
    "itap of a window",
    "art of the large tree",
    "un chat sur le canapé",
    "猫 と ソファ",
] * 10
TEXTS = ["A photo of a Cat.", "sofa", "une fenêtre", "窓", "an extremely long " + "word " * 80]
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def gemma_tokenizer(path: Path):
    """A byte-fallback BPE trained here with ``tokenizers``, wrapped as SigLIP 2's GemmaTokenizer."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    special = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=120, special_tokens=special))
    wrapped = transformers.GemmaTokenizer(tokenizer_object=tok)
    wrapped.save_pretrained(path)
    return wrapped


def sentencepiece_tokenizer(path: Path):
    """A unigram SentencePiece model trained here, wrapped as SigLIP's SiglipTokenizer."""
    import sentencepiece as spm
    import transformers

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=buf,
        vocab_size=60,
        hard_vocab_limit=False,
        minloglevel=2,
        num_threads=1,
    )
    path.mkdir(parents=True, exist_ok=True)
    (path / "spiece.model").write_bytes(buf.getvalue())
    wrapped = transformers.SiglipTokenizer(vocab_file=str(path / "spiece.model"))
    wrapped.save_pretrained(path)
    return wrapped


def saved_tokenizer(path: Path):
    """The tokenizer as transformers reads it back from the checkpoint's files (the reference side's;
    a reloaded GemmaTokenizer fuses unknown pieces, the in-memory one need not)."""
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def save_full_model(path: Path, kind: str, vocab_size: int, **vision: object) -> torch.nn.Module:
    """A tiny random transformers SiglipModel / Siglip2Model (seed 0) with save_pretrained."""
    import transformers

    torch.manual_seed(0)
    text = {**TINY_TEXT, "vocab_size": vocab_size}
    vis = {**TINY_VISION, **vision}
    if kind == "siglip":
        config = transformers.SiglipConfig(text_config=text, vision_config=vis)
        model = transformers.SiglipModel(config)
    else:
        config = transformers.Siglip2Config(text_config=text, vision_config=vis)
        model = transformers.Siglip2Model(config)
    with torch.no_grad():  # random but not the init constants: the test sees which one is read
        model.logit_scale.fill_(2.3)
        model.logit_bias.fill_(-4.1)
    model.eval().save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=["siglip", "siglip2"])
def text_checkpoint(request, tmp_path_factory) -> tuple[str, Path, torch.nn.Module, object]:
    kind = request.param
    path = tmp_path_factory.mktemp(kind)
    tok = sentencepiece_tokenizer(path) if kind == "siglip" else gemma_tokenizer(path)
    model = save_full_model(path, kind, vocab_size=len(tok), image_size=32, patch_size=8)
    return kind, path, model, saved_tokenizer(path)


def reference_features(kind: str, model, tok, texts: list[str]) -> torch.Tensor:
    """transformers' get_text_features on the source's preprocessing: SigLIP 2 lower-cased, right-padded
    to 64, input ids only (big_vision attends to the pads)."""
    if kind == "siglip2":
        texts = [t.lower() for t in texts]
    ids = tok(texts, padding="max_length", padding_side="right", max_length=64, truncation=True)["input_ids"]
    with torch.no_grad():
        out = model.get_text_features(input_ids=torch.tensor(ids))
    return getattr(out, "pooler_output", out)


def test_encode_matches_get_text_features(text_checkpoint):
    kind, path, model, tok = text_checkpoint
    enc = build_text_encoder(path)
    ours = enc.encode(TEXTS)
    ref = reference_features(kind, model, tok, TEXTS)
    assert ours.shape == (len(TEXTS), 32)
    assert max_abs_diff(ours, ref) <= PEER_TOL
    assert enc.logit_scale.item() == pytest.approx(2.3) and enc.logit_bias.item() == pytest.approx(-4.1)
    # tokens: padded on the right to 64 (text length of the config), truncated texts too
    ids = enc.tokenize(TEXTS)["input_ids"]
    assert ids.shape == (len(TEXTS), 64)
    assert (ids[1, -1] == tok.pad_token_id).item()


def test_siglip2_lowercases(text_checkpoint):
    kind, path, *_ = text_checkpoint
    enc = build_text_encoder(path)
    same = torch.equal(enc.encode(["A Photo of a CAT"]), enc.encode(["a photo of a cat"]))
    # SigLIP 2: we lower-case; SigLIP: its SentencePiece tokenizer lower-cases (do_lower_case) itself
    assert same


def test_class_ensemble_is_mean_of_normalised_templates(text_checkpoint):
    kind, path, model, tok = text_checkpoint
    enc = build_text_encoder(path)
    classes = ["cat", "sofa", "fenêtre"]
    emb = enc.encode_classes(", ".join(classes), templates="imagenet7")
    temps = TEMPLATES["imagenet7"]
    ref = []
    for name in classes:
        feats = reference_features(kind, model, tok, [t.format(name) for t in temps])
        mean = torch.nn.functional.normalize(feats, dim=-1).mean(0)
        ref.append(mean / mean.norm())
    assert max_abs_diff(emb, torch.stack(ref)) <= PEER_TOL
    assert enc.encode_classes(classes, templates="imagenet7") is emb  # cached per label set


def test_text_encoder_errors(tmp_path, text_checkpoint):
    _, path, *_ = text_checkpoint
    from tests.conftest import save_siglip_vision

    save_siglip_vision(tmp_path / "vision")
    with pytest.raises(CheckpointError, match="no text tower"):
        build_text_encoder(tmp_path / "vision")
    with pytest.raises(CheckpointError, match="big_vision .npz"):
        build_text_encoder(tmp_path / "vision" / "model.safetensors")
    with pytest.raises(ValueError, match="duplicated"):
        parse_classes("cat,cat")
    with pytest.raises(ValueError, match="non-empty"):
        parse_classes("cat,,sofa")
    with pytest.raises(ValueError, match="exactly one"):
        resolve_templates(["a photo"])
    with pytest.raises(CheckpointError, match="tokenizer"):
        build_text_encoder(path, tokenizer=tmp_path / "vision")


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_open_clip_text_tower(tmp_path, approximate):
    """An open_clip SigLIP text tower (its own TextTransformer and config, saved as the timm/ hub repos
    ship it) encodes as open_clip does: its HFTokenizer with clean=canonicalize, then the tower."""
    import json
    from functools import partial

    from open_clip.tokenizer import HFTokenizer
    from open_clip.transformer import TextTransformer
    from safetensors.torch import save_file

    tok = gemma_tokenizer(tmp_path)
    text_cfg = {
        "context_length": 64,
        "vocab_size": len(tok),
        "width": 32,
        "heads": 2,
        "layers": 2,
        "no_causal_mask": True,
        "proj_bias": True,
        "pool_type": "last",
        "norm_kwargs": {"eps": 1e-6},
        "tokenizer_kwargs": {"clean": "canonicalize"},
    }
    if approximate == "tanh":
        text_cfg["act_kwargs"] = {"approximate": "tanh"}
    torch.manual_seed(0)
    tower = TextTransformer(
        context_length=64,
        vocab_size=len(tok),
        width=32,
        heads=2,
        layers=2,
        output_dim=24,
        no_causal_mask=True,
        proj_bias=True,
        pool_type="last",
        act_layer=partial(torch.nn.GELU, approximate=approximate),
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
    ).eval()
    sd = {f"text.{k}": v.contiguous() for k, v in tower.state_dict().items()}
    sd["logit_scale"], sd["logit_bias"] = torch.tensor([2.3]), torch.tensor([-4.1])
    save_file(sd, str(tmp_path / "open_clip_model.safetensors"))
    config = {"model_cfg": {"embed_dim": 24, "text_cfg": text_cfg}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))

    enc = build_text_encoder(tmp_path)
    texts = [*TEXTS, "A_Photo, of the CAT!"]
    # right padding as big_vision trained (a Gemma tokenizer's own default is left)
    ids = HFTokenizer(str(tmp_path), context_length=64, clean="canonicalize", padding_side="right")(texts)
    with torch.no_grad():
        ref = tower(ids)
    assert max_abs_diff(enc.encode(texts), ref) <= PEER_TOL
    assert enc.logit_bias.item() == pytest.approx(-4.1)


def text_to_big_vision(text_model: torch.nn.Module, scan: bool) -> dict[str, np.ndarray]:
    """transformers' text tower in big_vision's two_towers naming (params/txt/...; flax kernels are
    (in, out), attention q/k/v (D, H, d) and out (H, d, D)); ``scan`` stacks the blocks as big_vision's
    scanned Encoder stores them."""
    sd = {k: v.detach().numpy() for k, v in text_model.state_dict().items()}
    cfg = text_model.config
    c, h = cfg.hidden_size, cfg.num_attention_heads
    d = c // h
    out = {
        "Embed_0/embedding": sd["embeddings.token_embedding.weight"],
        "pos_embedding": sd["embeddings.position_embedding.weight"][None],
        "Encoder_0/encoder_norm/scale": sd["final_layer_norm.weight"],
        "Encoder_0/encoder_norm/bias": sd["final_layer_norm.bias"],
        "head/kernel": sd["head.weight"].T,
        "head/bias": sd["head.bias"],
    }
    blocks = []
    for i in range(cfg.num_hidden_layers):
        p = f"encoder.layers.{i}."
        blk = {
            "LayerNorm_0/scale": sd[f"{p}layer_norm1.weight"],
            "LayerNorm_0/bias": sd[f"{p}layer_norm1.bias"],
            "LayerNorm_1/scale": sd[f"{p}layer_norm2.weight"],
            "LayerNorm_1/bias": sd[f"{p}layer_norm2.bias"],
            "MlpBlock_0/Dense_0/kernel": sd[f"{p}mlp.fc1.weight"].T,
            "MlpBlock_0/Dense_0/bias": sd[f"{p}mlp.fc1.bias"],
            "MlpBlock_0/Dense_1/kernel": sd[f"{p}mlp.fc2.weight"].T,
            "MlpBlock_0/Dense_1/bias": sd[f"{p}mlp.fc2.bias"],
            "MultiHeadDotProductAttention_0/out/kernel": sd[f"{p}self_attn.out_proj.weight"].T.reshape(
                h, d, c
            ),
            "MultiHeadDotProductAttention_0/out/bias": sd[f"{p}self_attn.out_proj.bias"],
        }
        for name, proj in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            blk[f"MultiHeadDotProductAttention_0/{name}/kernel"] = sd[
                f"{p}self_attn.{proj}.weight"
            ].T.reshape(c, h, d)
            blk[f"MultiHeadDotProductAttention_0/{name}/bias"] = sd[f"{p}self_attn.{proj}.bias"].reshape(h, d)
        blocks.append(blk)
    if scan:
        out |= {f"Encoder_0/encoderblock/{k}": np.stack([b[k] for b in blocks]) for k in blocks[0]}
    else:
        out |= {f"Encoder_0/encoderblock_{i}/{k}": v for i, b in enumerate(blocks) for k, v in b.items()}
    return {f"params/txt/{k}": np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


@pytest.mark.parametrize("scan", [False, True], ids=["blocks", "scanned"])
def test_big_vision_text_tower(text_checkpoint, tmp_path, scan):
    kind, path, model, tok = text_checkpoint
    arrays = text_to_big_vision(model.text_model, scan)
    arrays["params/t"] = model.logit_scale.detach().numpy().reshape(1)
    arrays["params/b"] = model.logit_bias.detach().numpy().reshape(1)
    arrays["params/img/embedding/kernel"] = np.zeros((8, 8, 3, 32), np.float32)  # the other tower
    npz = tmp_path / "siglip.npz"
    np.savez(npz, **arrays)
    enc = build_text_encoder(npz, tokenizer=path)
    assert max_abs_diff(enc.encode(TEXTS), reference_features(kind, model, tok, TEXTS)) <= PEER_TOL
    assert enc.logit_scale.item() == pytest.approx(2.3) and enc.logit_bias.item() == pytest.approx(-4.1)
    assert enc.lowercase == (kind == "siglip2")
    with pytest.raises(CheckpointError, match="tokenizer=DIR"):
        build_text_encoder(npz)
    del arrays["params/b"]
    np.savez(tmp_path / "nob.npz", **arrays)
    with pytest.raises(CheckpointError, match="params/b"):
        build_text_encoder(tmp_path / "nob.npz", tokenizer=path)
