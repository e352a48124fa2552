"""SigLIP / SigLIP 2 text tower: class names -> embeddings in the image tower's space.

The text transformer is transformers' own (``SiglipTextModel`` / ``Siglip2TextModel``, with its
projection ``head``): a well-kept implementation of exactly the released model, so transformers is a
runtime dependency of this module (the ``text`` extra). Weights, ``logit_scale`` and ``logit_bias``
come from the same checkpoint as the vision tower; the tokenizer from the checkpoint's own files
(``AutoTokenizer``: SentencePiece ``SiglipTokenizer`` for SigLIP, Gemma for SigLIP 2). Nothing
downloads: hub ids resolve from the local Hugging Face cache only.

Supported formats: transformers ``SiglipModel`` / ``Siglip2Model`` ``save_pretrained`` directories
(and hub ids in the local cache), and open_clip directories (``open_clip_config.json`` +
``open_clip_model.safetensors`` / ``open_clip_pytorch_model.bin``, as the ``timm/ViT-*-SigLIP*`` hub
repos ship them), whose text transformer is mapped onto transformers' keys, and big_vision two-tower
``.npz`` archives (``params/txt/...``, ``params/t``, ``params/b``; the tokenizer files given apart).

Text preprocessing is big_vision's, one rule for every source (transformers SigLIP / SigLIP 2,
open_clip, big_vision ``.npz``): :func:`canonicalize_text` (big_vision's ``_canonicalize``: "_" -> " ",
ASCII punctuation removed, lower-cased, whitespace collapsed; transformers' ``SiglipTokenizer`` would
delete "_" instead, ``Sofa_Bed`` -> ``sofabed``), then the checkpoint's own tokenizer without its
special tokens, laid out as big_vision's ``tok(eos="sticky")``: the text's tokens + EOS, cut to the
model's text length (64) keeping the final EOS, padded on the right with the pad token; no BOS, no
attention mask (big_vision's text transformer attends to the pads and pools the last position).

Class names follow CAT-Seg (``CATSegPredictor.class_embeddings``): a name with commas holds synonyms
("building, edifice"); each synonym is put in each prompt template, and the unit embeddings are
averaged over the synonyms per template, then normalised (:meth:`TextEncoder.encode_prompts`). CAT-Seg
splits at ", "; splitting at every comma is the same on every benchmark list and keeps "a,b" from
becoming "ab" (canonicalisation deletes the comma).
"""

from __future__ import annotations

import re
import string
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from siglip_dense.models.weights import (
    CheckpointError,
    _json,
    _read_hf_weights,
    _read_tensors,
    resolve_source,
)

# CLIP's 7-template ImageNet subset (Radford et al. 2021, "Prompt_Engineering_for_ImageNet.ipynb"),
# the usual prompt ensemble of zero-shot segmentation papers that do not use all 80
TEMPLATES: dict[str, tuple[str, ...]] = {
    "none": ("{}",),
    "photo": ("a photo of a {}.",),
    "imagenet7": (
        "itap of a {}.",
        "a bad photo of the {}.",
        "a origami {}.",
        "a photo of the large {}.",
        "a {} in a video game.",
        "art of the {}.",
        "a photo of the small {}.",
    ),
}
TEXT_MODEL_TYPES = ("siglip", "siglip2")
_CACHE_SIZE = 8


def resolve_templates(templates: str | Sequence[str]) -> tuple[str, ...]:
    """A template set by name (:data:`TEMPLATES`) or a list of ``str.format`` strings with one ``{}``."""
    if isinstance(templates, str):
        if templates not in TEMPLATES:
            raise ValueError(f"templates {templates!r} is not one of {', '.join(TEMPLATES)} (or give a list)")
        return TEMPLATES[templates]
    out = tuple(str(t) for t in templates)
    bad = [t for t in out if t.count("{}") != 1]
    if not out or bad:
        raise ValueError(
            f"each prompt template needs exactly one '{{}}' for the class name, got {bad or out}"
        )
    return out


_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


def canonicalize_text(text: str, keep: str | None = None) -> str:
    """big_vision's ``_canonicalize`` (evaluators/proj/image_text/prompt_engineering.py; open_clip's
    ``clean="canonicalize"``): "_" -> " ", ASCII punctuation removed except the exact string ``keep``
    (``"{}"`` for templates), lower-cased, whitespace collapsed and stripped."""
    text = text.replace("_", " ")
    parts = text.split(keep) if keep else [text]
    text = (keep or "").join(part.translate(_NO_PUNCTUATION) for part in parts)
    return re.sub(r"\s+", " ", text.lower()).strip()


def class_synonyms(name: str) -> list[str]:
    """``"building, edifice"`` -> ``["building", "edifice"]`` (CAT-Seg's synonyms; stripped)."""
    return [part.strip() for part in name.split(",")]


def parse_classes(classes: str | Sequence[str]) -> list[str]:
    """``"cat, sofa,window"`` (one class per comma) or a list (an item may hold comma-separated
    synonyms) -> stripped names. ValueError for an empty name or synonym, one that canonicalisation
    empties, and names that are the same text after it (``Cat`` / ``cat``)."""
    names = classes.split(",") if isinstance(classes, str) else [str(c) for c in classes]
    names = [n.strip() for n in names]
    if not names or any(not n for n in names):
        raise ValueError(f"classes must be non-empty names (comma-separated or a list), got {classes!r}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"classes has duplicated names: {dup}")
    seen: dict[tuple[str, ...], str] = {}
    for name in names:
        key = tuple(canonicalize_text(s) for s in class_synonyms(name))
        if not all(key):
            raise ValueError(
                f"class {name!r}: a synonym is empty or only punctuation (canonicalised: {list(key)}); "
                "commas in a name separate synonyms"
            )
        if key in seen:
            raise ValueError(
                f"classes {seen[key]!r} and {name!r} are the same text for this model (after big_vision's "
                f"canonicalisation: {', '.join(key)!r})"
            )
        seen[key] = name
    return names


class TextEncoder(nn.Module):
    """transformers' SigLIP (2) text model + tokenizer + the contrastive ``logit_scale`` / ``logit_bias``.

    ``encode(texts)`` -> N×D, transformers' ``get_text_features`` (``pooler_output``, not normalised) of
    the canonicalised texts in big_vision's token layout (module docstring).
    ``encode_prompts(names, templates)`` -> K×P×D unit vectors (CAT-Seg's per-template synonym mean);
    ``encode_classes(names, templates)`` -> K×D unit vectors (their template ensemble).
    ``logit_scale`` is stored as the log, as in the checkpoint: logits = cos · exp(scale) + bias.
    """

    def __init__(
        self,
        text_model: nn.Module,
        tokenizer: Any,
        logit_scale: Tensor,
        logit_bias: Tensor,
        max_length: int,
        source: str = "",
    ) -> None:
        super().__init__()
        self.text_model = text_model.eval()
        self.tokenizer = tokenizer
        self.logit_scale = nn.Parameter(logit_scale.detach().reshape(1).float(), requires_grad=False)
        self.logit_bias = nn.Parameter(logit_bias.detach().reshape(1).float(), requires_grad=False)
        self.max_length = int(max_length)
        self.source = source
        self.eos_id, self.pad_id = _special_ids(tokenizer, source)
        self._class_cache: OrderedDict[tuple, Tensor] = OrderedDict()

    @property
    def embed_dim(self) -> int:
        return int(self.text_model.head.out_features)

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """Token ids (N×max_length) as big_vision trained the model: canonicalised text, the tokens +
        EOS cut to the text length with the EOS kept ("sticky"), right-padded; no BOS, no attention
        mask (big_vision's text transformer attends to the pads and pools the last position)."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"texts must be a list of strings, got {type(texts).__name__}")
        pieces = self.tokenizer(
            [canonicalize_text(t) for t in texts], add_special_tokens=False, verbose=False
        )["input_ids"]
        ids = torch.full((len(pieces), self.max_length), self.pad_id, dtype=torch.long)
        for row, tokens in zip(ids, pieces, strict=True):
            tokens = [*tokens[: self.max_length - 1], self.eos_id]
            row[: len(tokens)] = torch.tensor(tokens)
        return {"input_ids": ids}

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """N×L token ids -> N×D text embeddings (the projected last-position state)."""
        kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
        return self.text_model(input_ids=input_ids, **kwargs).pooler_output

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 256) -> Tensor:
        """N texts -> N×D float embeddings (not normalised; transformers' ``get_text_features``)."""
        device = self.logit_scale.device
        out = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenize(texts[start : start + batch_size])
            out.append(self(**{k: v.to(device) for k, v in batch.items()}).float())
        if not out:
            raise ValueError("encode needs at least one text")
        return torch.cat(out)

    @torch.no_grad()
    def encode_prompts(
        self, classes: str | Sequence[str], templates: str | Sequence[str] = "photo"
    ) -> Tensor:
        """K class names -> K×P×D unit embeddings, one per template (CAT-Seg's ``class_embeddings``):
        each synonym of a name (:func:`class_synonyms`) in each template, canonicalised as big_vision
        does (template keeping ``{}``, name apart), unit embeddings averaged over the synonyms and
        normalised again. Cached per (classes, templates), a few label sets deep."""
        names, temps = tuple(parse_classes(classes)), resolve_templates(templates)
        return self._cached(("prompts", names, temps), lambda: self._encode_prompts(names, temps))

    def _encode_prompts(self, names: tuple[str, ...], temps: tuple[str, ...]) -> Tensor:
        temps_c = [canonicalize_text(t, keep="{}") for t in temps]
        synonyms = [[canonicalize_text(s) for s in class_synonyms(n)] for n in names]
        prompts = [t.format(s) for syns in synonyms for t in temps_c for s in syns]
        flat = nn.functional.normalize(self.encode(prompts), dim=-1)
        out, start = [], 0
        for syns in synonyms:
            size = len(temps) * len(syns)
            per_template = flat[start : start + size].view(len(temps), len(syns), -1).mean(1)
            out.append(nn.functional.normalize(per_template, dim=-1))
            start += size
        return torch.stack(out)

    def _cached(self, key: tuple, compute: Any) -> Tensor:
        """``compute()`` cached per key and device, the last few label sets."""
        key = (*key, str(self.logit_scale.device))
        if key in self._class_cache:
            self._class_cache.move_to_end(key)
            return self._class_cache[key]
        value = self._class_cache[key] = compute()
        while len(self._class_cache) > _CACHE_SIZE:
            self._class_cache.popitem(last=False)
        return value

    @torch.no_grad()
    def encode_classes(
        self, classes: str | Sequence[str], templates: str | Sequence[str] = "photo"
    ) -> Tensor:
        """K class names -> K×D unit embeddings: :meth:`encode_prompts` averaged over templates and
        normalised again (CLIP's ImageNet prompt ensemble). Cached as :meth:`encode_prompts`."""
        names, temps = tuple(parse_classes(classes)), resolve_templates(templates)
        per_template = self.encode_prompts(names, temps)
        return self._cached(
            ("classes", names, temps), lambda: nn.functional.normalize(per_template.mean(1), dim=-1)
        )


def _hf_classes(model_type: str) -> tuple[type, type]:
    import transformers

    if model_type == "siglip":
        return transformers.SiglipTextConfig, transformers.SiglipTextModel
    return transformers.Siglip2TextConfig, transformers.Siglip2TextModel


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model")


def _special_ids(tokenizer: Any, source: str) -> tuple[int, int]:
    """(EOS, pad) token ids of big_vision's layout; CheckpointError when the tokenizer lacks one."""
    eos, pad = getattr(tokenizer, "eos_token_id", None), getattr(tokenizer, "pad_token_id", None)
    if eos is None or pad is None:
        raise CheckpointError(
            f"{source}: its tokenizer has no {'EOS' if eos is None else 'pad'} token: SigLIP text is "
            "the tokens + EOS padded with the pad token (the checkpoint's own tokenizer files have both)"
        )
    return int(eos), int(pad)


def _load_tokenizer(directory: Path, vocab_size: int | None = None) -> Any:
    """The checkpoint's own tokenizer; without its files transformers would build a tiny default
    vocabulary (every name -> <unk>), so they are required, and must fit the text embedding table."""
    from transformers import AutoTokenizer

    option = (
        "(or give a directory holding them: tokenizer=DIR, on the command line +open_vocab.tokenizer=DIR)"
    )
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(
            f"{directory}: no tokenizer files: missing {' / '.join(TOKENIZER_FILES)} (the checkpoint's "
            f"own tokenizer, as the hub repo ships it, next to the weights) {option}"
        )
    try:
        tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, ImportError) as err:
        raise CheckpointError(
            f"{directory}: no usable tokenizer files (tokenizer.json / spiece.model + tokenizer_config.json "
            f"as the hub repo ships them; SigLIP's SentencePiece tokenizer needs the sentencepiece "
            f"package): {err}"
        ) from err
    if vocab_size is not None and len(tok) > vocab_size:
        raise CheckpointError(
            f"{directory}: its tokenizer has {len(tok)} tokens, the text tower's vocab_size is {vocab_size}: "
            f"not this checkpoint's tokenizer {option}"
        )
    return tok


def build_text_encoder(checkpoint: str | Path, tokenizer: str | Path | None = None) -> TextEncoder:
    """The text tower of a SigLIP / SigLIP 2 checkpoint, in eval mode, float32.

    Args:
        checkpoint: a transformers ``SiglipModel`` / ``Siglip2Model`` ``save_pretrained`` directory,
            a hub id in the local Hugging Face cache (e.g. ``google/siglip2-base-patch16-224``), an
            open_clip directory, or a big_vision ``.npz``.
        tokenizer: a directory with the tokenizer files, when they are not next to the weights
            (required for a big_vision ``.npz``, which holds none).

    Raises :class:`~siglip_dense.models.weights.CheckpointError` naming the path when the checkpoint is
    a vision-only model, another format, or lacks text weights or tokenizer files.
    """
    path = resolve_source(checkpoint)
    if path.is_dir() and (path / "open_clip_config.json").is_file():
        return _build_open_clip(path, tokenizer)
    if path.is_file() and path.suffix == ".npz":
        return _build_big_vision(path, tokenizer)
    config_file = path / "config.json" if path.is_dir() else None
    if config_file is None or not config_file.is_file():
        raise CheckpointError(
            f"{path}: the text tower is read from a transformers SiglipModel / Siglip2Model "
            f"save_pretrained directory (config.json + weights) or an open_clip directory "
            f"(open_clip_config.json + weights) or a big_vision .npz (with tokenizer=DIR)"
        )
    cfg = _json(config_file)
    model_type = cfg.get("model_type")
    if model_type not in TEXT_MODEL_TYPES or "text_config" not in cfg:
        raise CheckpointError(
            f"{config_file}: model_type {model_type!r} has no text tower; need one of {TEXT_MODEL_TYPES} "
            f"(a full SiglipModel / Siglip2Model, not a vision-only model)"
        )
    config_cls, model_cls = _hf_classes(model_type)
    text_cfg = config_cls(**cfg["text_config"])
    sd, weight_file = _read_hf_weights(path)
    text_sd = {k.removeprefix("text_model."): v for k, v in sd.items() if k.startswith("text_model.")}
    for key in ("logit_scale", "logit_bias"):
        if key not in sd:
            raise CheckpointError(f"{weight_file}: no {key} (a full SiglipModel checkpoint has one)")
    model = model_cls(text_cfg)
    missing, unexpected = model.load_state_dict(text_sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{weight_file}: text_model weights do not fit {model_cls.__name__}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    tok = _load_tokenizer(Path(tokenizer) if tokenizer is not None else path, int(text_cfg.vocab_size))
    return TextEncoder(
        model.float(),
        tok,
        sd["logit_scale"],
        sd["logit_bias"],
        max_length=int(text_cfg.max_position_embeddings),
        source=str(path),
    ).eval()


# open_clip TextTransformer -> transformers SiglipTextModel keys (in_proj rows split q, k, v)
_OPEN_CLIP_RENAMES = (
    ("token_embedding.", "embeddings.token_embedding."),
    ("ln_final.", "final_layer_norm."),
    ("text_projection.", "head."),
    (".ln_1.", ".layer_norm1."),
    (".ln_2.", ".layer_norm2."),
    (".attn.out_proj.", ".self_attn.out_proj."),
    (".mlp.c_fc.", ".mlp.fc1."),
    (".mlp.c_proj.", ".mlp.fc2."),
)


def _open_clip_text_state(sd: dict[str, Tensor], path: Path) -> dict[str, Tensor]:
    """open_clip ``text.*`` tensors renamed to transformers' ``SiglipTextModel`` state dict."""
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if not key.startswith("text."):
            continue
        name = key.removeprefix("text.").replace("transformer.resblocks.", "encoder.layers.")
        if name == "positional_embedding":
            out["embeddings.position_embedding.weight"] = value
            continue
        if ".attn.in_proj_" in name:
            stem, kind = name.split(".attn.in_proj_")
            for part, chunk in zip(("q", "k", "v"), value.chunk(3, dim=0), strict=True):
                out[f"{stem}.self_attn.{part}_proj.{kind}"] = chunk
            continue
        for old, new in _OPEN_CLIP_RENAMES:
            name = name.replace(old, new)
        out[name] = value
    if not out:
        raise CheckpointError(f"{path}: no text.* tensors (an open_clip image-text model has them)")
    return out


def _open_clip_weights(directory: Path) -> tuple[dict[str, Tensor], Path]:
    for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        if (directory / name).is_file():
            return _read_tensors(directory / name)[0], directory / name
    raise CheckpointError(f"{directory}: open_clip_config.json but no open_clip_model.safetensors / .bin")


def _build_open_clip(path: Path, tokenizer: str | Path | None) -> TextEncoder:
    """The text tower of an open_clip SigLIP checkpoint, run by transformers' ``SiglipTextModel``."""
    import transformers

    cfg = _json(path / "open_clip_config.json").get("model_cfg", {})
    text_cfg = cfg.get("text_cfg") or {}
    unsupported = [k for k in ("hf_model_name", "embed_cls", "qk_norm", "ls_init_value") if text_cfg.get(k)]
    if text_cfg.get("pool_type") != "last" or not text_cfg.get("no_causal_mask") or unsupported:
        raise CheckpointError(
            f"{path / 'open_clip_config.json'}: not a SigLIP text tower (need pool_type=last, no_causal_mask, "
            f"a plain transformer; got pool_type={text_cfg.get('pool_type')!r}, unsupported {unsupported})"
        )
    sd, weight_file = _open_clip_weights(path)
    for key in ("logit_scale", "logit_bias"):
        if key not in sd:
            raise CheckpointError(f"{weight_file}: no {key} (a SigLIP open_clip model has one)")
    width = int(text_cfg.get("width", 512))
    approximate = (text_cfg.get("act_kwargs") or {}).get("approximate", "none")
    config = transformers.SiglipTextConfig(
        vocab_size=int(text_cfg.get("vocab_size", 49408)),
        hidden_size=width,
        intermediate_size=int(width * float(text_cfg.get("mlp_ratio", 4.0))),
        num_hidden_layers=int(text_cfg.get("layers", 12)),
        num_attention_heads=int(text_cfg.get("heads", 8)),
        max_position_embeddings=int(text_cfg.get("context_length", 64)),
        layer_norm_eps=float((text_cfg.get("norm_kwargs") or {}).get("eps", 1e-5)),
        # open_clip's act is nn.GELU(approximate=...) from its config: exact unless it says tanh
        hidden_act="gelu_pytorch_tanh" if approximate == "tanh" else "gelu",
        projection_size=int(cfg.get("embed_dim", width)),
    )
    model = transformers.SiglipTextModel(config)
    missing, unexpected = model.load_state_dict(_open_clip_text_state(sd, weight_file), strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{weight_file}: text weights do not fit SiglipTextModel: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return TextEncoder(
        model.float(),
        _load_tokenizer(Path(tokenizer) if tokenizer is not None else path, config.vocab_size),
        sd["logit_scale"],
        sd["logit_bias"],
        max_length=config.max_position_embeddings,
        source=str(path),
    ).eval()


# big_vision two_towers: text_transformer._Model under params/txt (vit.Encoder -> Encoder_0, blocks
# encoderblock_<i> or, scanned, one encoderblock with a leading depth axis), params/t = log scale,
# params/b = bias. Flax layouts: Dense kernel (in, out); attention query/key/value kernel (D, H, d),
# out kernel (H, d, D).
_BV_LAYER = {
    "LayerNorm_0": "layer_norm1",
    "LayerNorm_1": "layer_norm2",
    "MlpBlock_0/Dense_0": "mlp.fc1",
    "MlpBlock_0/Dense_1": "mlp.fc2",
}


def _bv_text_state(arrays: dict[str, Any], prefix: str, path: Path) -> tuple[dict[str, Tensor], int, int]:
    """big_vision ``params/txt`` arrays -> transformers ``SiglipTextModel`` state dict, depth, heads."""

    def get(key: str) -> Tensor:
        if prefix + key not in arrays:
            raise CheckpointError(f"{path}: big_vision text tower without {prefix + key!r}")
        return torch.from_numpy(arrays[prefix + key].astype("float32"))

    blocks = "Encoder_0/encoderblock"
    if prefix + f"{blocks}/LayerNorm_0/scale" in arrays:  # scanned: one stacked block
        depth = int(arrays[prefix + f"{blocks}/LayerNorm_0/scale"].shape[0])
        block = lambda i, k: get(f"{blocks}/{k}")[i]  # noqa: E731
    else:
        depth = len({k[len(prefix) :].split("/")[1] for k in arrays if k.startswith(prefix + f"{blocks}_")})
        block = lambda i, k: get(f"{blocks}_{i}/{k}")  # noqa: E731
    if depth == 0:
        raise CheckpointError(f"{path}: no {prefix}{blocks}_<i> (or scanned {blocks}) arrays")
    sd = {
        "embeddings.token_embedding.weight": get("Embed_0/embedding"),
        "embeddings.position_embedding.weight": get("pos_embedding")[0],
        "final_layer_norm.weight": get("Encoder_0/encoder_norm/scale"),
        "final_layer_norm.bias": get("Encoder_0/encoder_norm/bias"),
        "head.weight": get("head/kernel").T,
        "head.bias": get("head/bias"),
    }
    heads = 0
    for i in range(depth):
        dst = f"encoder.layers.{i}."
        for src, name in _BV_LAYER.items():
            if src.startswith("LayerNorm"):
                sd[f"{dst}{name}.weight"], sd[f"{dst}{name}.bias"] = (
                    block(i, f"{src}/scale"),
                    block(i, f"{src}/bias"),
                )
            else:
                sd[f"{dst}{name}.weight"], sd[f"{dst}{name}.bias"] = (
                    block(i, f"{src}/kernel").T,
                    block(i, f"{src}/bias"),
                )
        attn = "MultiHeadDotProductAttention_0/"
        for src, name in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            kernel = block(i, f"{attn}{src}/kernel")  # (D, H, d)
            heads = kernel.shape[1]
            sd[f"{dst}self_attn.{name}.weight"] = kernel.flatten(1).T
            sd[f"{dst}self_attn.{name}.bias"] = block(i, f"{attn}{src}/bias").flatten()
        out = block(i, f"{attn}out/kernel")  # (H, d, D)
        sd[f"{dst}self_attn.out_proj.weight"] = out.flatten(0, 1).T
        sd[f"{dst}self_attn.out_proj.bias"] = block(i, f"{attn}out/bias")
    return sd, depth, heads


def _build_big_vision(path: Path, tokenizer: str | Path | None) -> TextEncoder:
    """The text tower of a big_vision SigLIP (2) ``.npz``, run by transformers' ``SiglipTextModel``
    (big_vision's text transformer is the same network: pre-LN blocks, tanh-GELU, flax LayerNorm
    eps 1e-6, last-token pooling, a Dense head). SigLIP 2 (a Gemma / Siglip2 tokenizer) is lower-cased."""
    import zipfile

    import numpy as np
    import transformers

    if tokenizer is None:
        raise CheckpointError(
            f"{path}: a big_vision .npz holds no tokenizer; pass tokenizer=DIR (SigLIP: spiece.model + "
            f"tokenizer_config.json; SigLIP 2: the Gemma tokenizer files)"
        )
    try:
        with np.load(str(path), allow_pickle=False) as npz:
            keys = [
                k
                for k in npz.files
                if k.startswith(("params/txt/", "txt/")) or k in ("params/t", "params/b", "t", "b")
            ]
            arrays = {k: npz[k] for k in keys}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: not a readable .npz archive (truncated or corrupt?): {e}") from None
    root = "params/" if any(k.startswith("params/txt/") for k in arrays) else ""
    if not any(k.startswith(f"{root}txt/") for k in arrays):
        raise CheckpointError(f"{path}: no big_vision text tower (params/txt/...): an image-only archive?")
    for key in ("t", "b"):
        if root + key not in arrays:
            raise CheckpointError(f"{path}: no {root + key} (the SigLIP logit scale t and bias b)")
    sd, depth, heads = _bv_text_state(arrays, f"{root}txt/", path)
    vocab, width = sd["embeddings.token_embedding.weight"].shape
    config = transformers.SiglipTextConfig(
        vocab_size=int(vocab),
        hidden_size=int(width),
        intermediate_size=int(sd["encoder.layers.0.mlp.fc1.weight"].shape[0]),
        num_hidden_layers=depth,
        num_attention_heads=int(heads),
        max_position_embeddings=int(sd["embeddings.position_embedding.weight"].shape[0]),
        layer_norm_eps=1e-6,
        hidden_act="gelu_pytorch_tanh",  # flax nn.gelu (approximate=True), big_vision's MlpBlock
        projection_size=int(sd["head.weight"].shape[0]),
    )
    model = transformers.SiglipTextModel(config)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: text weights do not fit SiglipTextModel: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    tok = _load_tokenizer(Path(tokenizer))
    return TextEncoder(
        model.float(),
        tok,
        torch.from_numpy(np.asarray(arrays[root + "t"], dtype=np.float32)),
        torch.from_numpy(np.asarray(arrays[root + "b"], dtype=np.float32)),
        max_length=config.max_position_embeddings,
        source=str(path),
    ).eval()
