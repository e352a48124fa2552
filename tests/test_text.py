"""Text tower: embeddings equal transformers' ``get_text_features`` for tiny random SigLIP / SigLIP 2
checkpoints saved locally, with tokenizers trained locally in the checkpoint's own tokenizer class; text
preprocessing is big_vision's for every source, class names with synonyms CAT-Seg's (both re-typed
in tests/helpers/peer_rules.py)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from siglip_dense.models import build_text_encoder
from siglip_dense.models.text import TEMPLATES, canonicalize_text, parse_classes, resolve_templates
from siglip_dense.models.weights import CheckpointError
from tests.conftest import PEER_TOL, max_abs_diff
from tests.helpers.peer_rules import big_vision_canonicalize, big_vision_sticky_eos, catseg_class_embeddings

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


def gemma_tokenizer(path: Path, hub_config: bool = True):
    """A byte-fallback BPE trained here with ``tokenizers``, wrapped as SigLIP 2's GemmaTokenizer: with
    the ``google/siglip2-*`` repos' special-token settings (no BOS, EOS appended), or (``hub_config=False``)
    transformers' GemmaTokenizer defaults, neither BOS nor EOS (a Gemma language model's tokenizer dir)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    special = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=120, special_tokens=special))
    special_tokens = dict(add_bos_token=False, add_eos_token=True) if hub_config else {}
    wrapped = transformers.GemmaTokenizer(tokenizer_object=tok, **special_tokens)
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


def big_vision_ids(tok, texts: list[str], length: int = 64) -> torch.Tensor:
    """big_vision's text pipeline: canonicalised text, the tokenizer's pieces (no special tokens), EOS
    appended and kept when cut to ``length`` ("sticky"), padded on the right with the pad token."""
    pieces = tok([big_vision_canonicalize(t) for t in texts], add_special_tokens=False)["input_ids"]
    return torch.tensor(
        [big_vision_sticky_eos(p, length, tok.eos_token_id, tok.pad_token_id) for p in pieces]
    )


def reference_features(model, tok, texts: list[str]) -> torch.Tensor:
    """transformers' get_text_features on big_vision's token ids (input ids only: big_vision attends to
    the pads)."""
    with torch.no_grad():
        out = model.get_text_features(input_ids=big_vision_ids(tok, texts))
    return getattr(out, "pooler_output", out)


def test_encode_matches_get_text_features(text_checkpoint):
    kind, path, model, tok = text_checkpoint
    enc = build_text_encoder(path)
    ours = enc.encode(TEXTS)
    ref = reference_features(model, tok, TEXTS)
    assert ours.shape == (len(TEXTS), 32)
    assert max_abs_diff(ours, ref) <= PEER_TOL
    assert enc.logit_scale.item() == pytest.approx(2.3) and enc.logit_bias.item() == pytest.approx(-4.1)
    # tokens: padded on the right to 64 (text length of the config), truncated texts too
    ids = enc.tokenize(TEXTS)["input_ids"]
    assert ids.shape == (len(TEXTS), 64)
    assert (ids[1, -1] == tok.pad_token_id).item()


def test_class_ensemble_is_mean_of_normalised_templates(text_checkpoint):
    kind, path, model, tok = text_checkpoint
    enc = build_text_encoder(path)
    classes = ["cat", "sofa", "fenêtre"]
    emb = enc.encode_classes(", ".join(classes), templates="imagenet7")
    temps = TEMPLATES["imagenet7"]
    ref = []
    for name in classes:
        feats = reference_features(model, tok, [t.format(name) for t in temps])
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


def save_open_clip_tower(path: Path, vocab_size: int, approximate: str = "tanh") -> torch.nn.Module:
    """open_clip's own SigLIP TextTransformer (seed 0), saved with its config as the timm/ hub repos ship
    it (open_clip_config.json + open_clip_model.safetensors) into ``path``."""
    import json
    from functools import partial

    from open_clip.transformer import TextTransformer
    from safetensors.torch import save_file

    text_cfg = {
        "context_length": 64,
        "vocab_size": vocab_size,
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
        vocab_size=vocab_size,
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
    save_file(sd, str(path / "open_clip_model.safetensors"))
    config = {"model_cfg": {"embed_dim": 24, "text_cfg": text_cfg}}
    (path / "open_clip_config.json").write_text(json.dumps(config))
    return tower


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_open_clip_text_tower(tmp_path, approximate):
    """An open_clip SigLIP text tower (its own TextTransformer and config, saved as the timm/ hub repos
    ship it, with the hub's tokenizer files) encodes as open_clip does: its HFTokenizer with
    clean=canonicalize, then the tower."""
    from open_clip.tokenizer import HFTokenizer

    tok = gemma_tokenizer(tmp_path)
    tower = save_open_clip_tower(tmp_path, len(tok), approximate)
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
    assert max_abs_diff(enc.encode(TEXTS), reference_features(model, tok, TEXTS)) <= PEER_TOL
    assert enc.logit_scale.item() == pytest.approx(2.3) and enc.logit_bias.item() == pytest.approx(-4.1)
    with pytest.raises(CheckpointError, match="tokenizer=DIR"):
        build_text_encoder(npz)
    del arrays["params/b"]
    np.savez(tmp_path / "nob.npz", **arrays)
    with pytest.raises(CheckpointError, match="params/b"):
        build_text_encoder(tmp_path / "nob.npz", tokenizer=path)


# -- one text preprocessing for every source: big_vision's ----------------------------------------------

LONG = "The_Cat, " * 40 + "END."  # > 64 tokens: cut, with the final EOS kept
CANON_TEXTS = ["Sofa_Bed", "sofa bed", "A Photo, of the CAT!", "itap of a  window.", LONG]
SOURCES = ["siglip", "siglip2", "open_clip", "big_vision_siglip", "big_vision_siglip2"]


def _hf_checkpoint(kind: str, path: Path) -> tuple[torch.nn.Module, object]:
    tok = sentencepiece_tokenizer(path) if kind == "siglip" else gemma_tokenizer(path)
    return save_full_model(path, kind, vocab_size=len(tok), image_size=32, patch_size=8), saved_tokenizer(
        path
    )


@pytest.fixture(scope="module", params=SOURCES)
def text_source(request, tmp_path_factory):
    """(our encoder, the tokenizer its source reads, the source's own tower: ids -> features) for a
    transformers SigLIP / SigLIP 2 directory, an open_clip directory and a big_vision .npz. The open_clip
    and big_vision ones get their tokenizer apart (tokenizer=DIR), a Gemma language model's files (no
    EOS of their own): big_vision appends and keeps the EOS itself."""
    source = request.param
    root = tmp_path_factory.mktemp(source)
    if source in ("siglip", "siglip2"):
        model, tok = _hf_checkpoint(source, root)
        return build_text_encoder(root), tok, lambda ids: model.get_text_features(input_ids=ids)
    if source == "open_clip":
        gemma_tokenizer(root / "tok", hub_config=False)
        tok = saved_tokenizer(root / "tok")
        tower = save_open_clip_tower(root, len(tok))
        return build_text_encoder(root, tokenizer=root / "tok"), tok, tower
    kind = source.removeprefix("big_vision_")
    if kind == "siglip":
        model, tok = _hf_checkpoint(kind, root / "hf")
        tok_dir = root / "hf"
    else:
        model, _ = _hf_checkpoint(kind, root / "hf")
        gemma_tokenizer(root / "tok", hub_config=False)
        tok_dir, tok = root / "tok", saved_tokenizer(root / "tok")
    arrays = text_to_big_vision(model.text_model, scan=False)
    arrays["params/t"] = model.logit_scale.detach().numpy().reshape(1)
    arrays["params/b"] = model.logit_bias.detach().numpy().reshape(1)
    np.savez(root / "siglip.npz", **arrays)
    return build_text_encoder(root / "siglip.npz", tokenizer=tok_dir), tok, model.text_model


def test_canonicalize_text_is_big_vision_rule():
    texts = ["Sofa_Bed", "A  Photo, of the CAT!", " x\t_y ", "l'été d'un chat", "{}-shaped {}.", "c p u "]
    for text in texts:
        assert canonicalize_text(text) == big_vision_canonicalize(text)
        assert canonicalize_text(text, keep="{}") == big_vision_canonicalize(
            text, keep_punctuation_exact_string="{}"
        )


def test_text_is_canonicalised_as_big_vision_for_every_source(text_source):
    """An underscore is a space (transformers' SiglipTokenizer deletes it), punctuation removed and lower-cased for
    SigLIP 2 too, EOS appended and kept in a text longer than 64 tokens, no BOS: token ids and
    embeddings equal big_vision's pipeline run through the source's own tower."""
    enc, tok, tower = text_source
    assert len(tok(big_vision_canonicalize(LONG), add_special_tokens=False)["input_ids"]) > 64
    ids = enc.tokenize(CANON_TEXTS)["input_ids"]
    ref = big_vision_ids(tok, CANON_TEXTS)
    assert torch.equal(ids, ref)
    assert torch.equal(ids[0], ids[1]) and not torch.equal(ids[0], enc.tokenize(["sofabed"])["input_ids"][0])
    assert ids[-1, -1] == tok.eos_token_id
    with torch.no_grad():
        out = tower(ref)
    out = getattr(out, "pooler_output", out)
    assert max_abs_diff(enc.encode(CANON_TEXTS), out) <= PEER_TOL


# -- class names with synonyms: CAT-Seg's rule ---------------------------------------------------------

SYNONYM_NAMES = ["building, edifice", "sky", "c p u , central processor", "Sofa_Bed", "door, double door"]


@pytest.mark.parametrize("templates", ["imagenet7", "none"])
def test_synonyms_are_averaged_per_template_as_catseg(text_checkpoint, templates):
    """Names with ", " are split into synonyms, each synonym embedded in each template, averaged per
    template and normalised (CAT-Seg); names without commas are one text per template. The template
    ensemble (training-free) averages those over the templates."""
    _, path, model, tok = text_checkpoint
    enc = build_text_encoder(path)
    temps = TEMPLATES[templates]
    ref = catseg_class_embeddings(SYNONYM_NAMES, temps, lambda texts: reference_features(model, tok, texts))
    ensemble = torch.nn.functional.normalize(ref.mean(1), dim=-1)
    assert max_abs_diff(enc.encode_classes(SYNONYM_NAMES, templates), ensemble) <= PEER_TOL
    per_template = enc.encode_prompts(SYNONYM_NAMES, templates)  # CAT-Seg's head reads these
    assert per_template.shape == (len(SYNONYM_NAMES), len(temps), 32)
    assert max_abs_diff(per_template, ref) <= PEER_TOL
    # a comma without a space separates synonyms too (canonicalisation would glue "catkitten")
    assert torch.equal(
        enc.encode_prompts(["cat,kitten"], templates), enc.encode_prompts(["cat, kitten"], templates)
    )


def test_class_lists_and_synonyms_parse():
    assert parse_classes("cat, sofa,window") == ["cat", "sofa", "window"]  # a string: one class per comma
    assert parse_classes(["building, edifice", "sky"]) == [
        "building, edifice",
        "sky",
    ]  # a list item: synonyms
    with pytest.raises(ValueError, match="'Cat' and 'cat' are the same text"):
        parse_classes(["Cat", "cat"])
    with pytest.raises(ValueError, match="'sofa bed' and 'Sofa_Bed' are the same text"):
        parse_classes(["sofa bed", "Sofa_Bed"])
    with pytest.raises(ValueError, match="class 'door, ,gate': a synonym is empty"):
        parse_classes(["door, ,gate"])
    with pytest.raises(ValueError, match="class '!!': a synonym is empty or only punctuation"):
        parse_classes(["cat", "!!"])
