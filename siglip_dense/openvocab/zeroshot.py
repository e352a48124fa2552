"""Training-free open-vocabulary segmentation with a SigLIP (2) image-text pair.

Each patch token is mapped into the joint space by the value path of the vision tower's attention
pooling (MAP) head, then scored against the class-name embeddings of the text tower with the
model's own ``logit_scale`` and ``logit_bias`` (sigmoid-loss logits: σ(logit) is the match
probability). Methods (``method=``):

``"maskclip"`` (MaskCLIP, Zhou et al. ECCV 2022, transposed to SigLIP's MAP head): the head attends
    one learned probe over all tokens; replacing that attention with the identity gives each token
    its own pooled embedding. Per token x (final LayerNorm-ed, = transformers' ``last_hidden_state``):
    ``v = W_v x + b_v`` (the head's value projection, ``attn_pool.kv`` rows C:), ``o = W_o v + b_o``
    (``attn_pool.proj``), ``e = o + MLP(LN(o))`` (the head's own LayerNorm + MLP residual, applied
    to o exactly as the head applies them to its attended output). The probe, query and key
    projections are not used.
``"clearclip"`` (ClearCLIP, Lan et al. ECCV 2024; the self-self attention of SCLIP / NACLIP): the last
    block is replaced by query-query attention ``softmax(q qᵀ/√d) v`` through the block's own
    ``norm1``, qkv and output projections, without its residual connection and without its MLP;
    then the final LayerNorm and the MAP value path above. Sharper, less noisy maps than MaskCLIP.

Inference is whole-image or sliding-window (MMSeg's ``slide``) at the model's own input size.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from siglip_dense.data.io import DataError
from siglip_dense.evaluation.sliding_window import check_window_coverage, slide_inference, whole_inference
from siglip_dense.models.backbone import SigLIP2Backbone, build_backbone
from siglip_dense.models.text import (
    TEXT_MODEL_TYPES,
    TextEncoder,
    build_text_encoder,
    class_synonyms,
    parse_classes,
)
from siglip_dense.models.weights import CheckpointError, _json

METHODS = ("maskclip", "clearclip")


def map_value_path(attn_pool: nn.Module, tokens: Tensor) -> Tensor:
    """B×N×C tokens -> B×N×D per-token embeddings through timm's ``AttentionPoolLatent`` value path
    (value and output projections, then the head's LayerNorm + MLP residual; no attention)."""
    c = tokens.shape[-1]
    v = F.linear(tokens, attn_pool.kv.weight[c:], attn_pool.kv.bias[c:])
    o = attn_pool.proj(v)
    if attn_pool.mlp is not None:
        o = o + attn_pool.mlp(attn_pool.norm(o))
    return o


def self_self_attention(block: nn.Module, x: Tensor) -> Tensor:
    """ClearCLIP's last block on B×N×C tokens: q-q attention through the block's norm1 / qkv / proj,
    no residual, no MLP (timm ``Block``; layer scale kept when the block has one)."""
    attn = block.attn
    b, n, c = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, _, v = qkv.unbind(0)
    q = attn.q_norm(q)
    out = F.scaled_dot_product_attention(q, q, v)
    out = attn.norm(out.transpose(1, 2).reshape(b, n, c))
    return block.ls1(attn.proj(out))


class ZeroShotSegmenter(nn.Module):
    """Vision tower (with its MAP head) + text tower: class names -> per-pixel logits, no training.

    ``forward(x, classes)`` -> B×K×h×w logits on the patch grid, ``cos(e, t)·exp(logit_scale) +
    logit_bias`` with e the per-patch embedding (see the module docstring) and t the template-ensemble
    class embedding. ``segment`` gives logits at the image size (whole or slide inference);
    ``predict`` label maps for uint8 images.
    """

    def __init__(
        self,
        backbone: SigLIP2Backbone,
        text_encoder: TextEncoder,
        method: str = "clearclip",
        templates: str | Sequence[str] = "imagenet7",
        crop_size: Sequence[int] | None = None,
        stride: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if backbone.vit.attn_pool is None:
            raise ValueError("zero-shot segmentation needs the vision tower's MAP head: keep_head=True")
        self.backbone = backbone.eval()
        self.text_encoder = text_encoder.eval()
        self.method = method
        self.templates = templates
        self.crop_size = self.stride = None
        if crop_size is not None:
            stride = stride if stride is not None else [max(1, int(c) * 2 // 3) for c in crop_size]
            self.crop_size, self.stride = check_window_coverage(crop_size, stride, "zero_shot")

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | Path,
        method: str = "clearclip",
        templates: str | Sequence[str] = "imagenet7",
        slide: bool = True,
        tokenizer: str | Path | None = None,
    ) -> ZeroShotSegmenter:
        """Both towers from one SigLIP (2) checkpoint (a transformers ``SiglipModel`` directory or a
        hub id in the local cache); slide windows are the model's own input size, stride 2/3 of it."""
        backbone = build_backbone(checkpoint=checkpoint, keep_head=True, verbose=False)
        text = build_text_encoder(checkpoint, tokenizer=tokenizer)
        crop = backbone.img_size if slide else None
        return cls(backbone, text, method=method, templates=templates, crop_size=crop)

    @property
    def mean(self) -> tuple[float, ...]:
        return self.backbone.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.backbone.std

    def dense_embeddings(self, x: Tensor) -> Tensor:
        """B×3×H×W normalised images -> B×D×h×w per-patch embeddings (not L2-normalised)."""
        bb = self.backbone
        tokens, hw, key_mask, _ = bb._embed(x, None)
        if self.method == "maskclip":
            tokens, _ = bb._run_blocks(tokens, hw, key_mask, bb.num_layers - 1)
        else:
            if bb.num_layers > 1:
                tokens, _ = bb._run_blocks(tokens, hw, key_mask, bb.num_layers - 2)
            tokens = self_self_attention(bb.vit.blocks[-1], tokens)
        emb = map_value_path(bb.vit.attn_pool, bb.vit.norm(tokens))
        b, _, d = emb.shape
        return emb.transpose(1, 2).reshape(b, d, *hw)

    def class_embeddings(self, classes: str | Sequence[str]) -> Tensor:
        """K×D unit text embeddings of the class names (template ensemble, cached)."""
        return self.text_encoder.encode_classes(classes, self.templates)

    def logits(self, dense: Tensor, text: Tensor) -> Tensor:
        """B×D×h×w embeddings, K×D unit text embeddings -> B×K×h×w SigLIP logits."""
        cos = torch.einsum("bdhw,kd->bkhw", F.normalize(dense, dim=1), text.to(dense.dtype))
        return cos * self.text_encoder.logit_scale.exp() + self.text_encoder.logit_bias

    @torch.no_grad()
    def forward(self, x: Tensor, classes: str | Sequence[str]) -> Tensor:
        """B×3×H×W normalised images -> B×K×h×w logits on the patch grid."""
        return self.logits(self.dense_embeddings(x), self.class_embeddings(classes))

    @torch.no_grad()
    def segment(self, x: Tensor, classes: str | Sequence[str]) -> Tensor:
        """B×3×H×W normalised images -> B×K×H×W logits (bilinear to the input size; sliding windows
        of ``crop_size`` when set and the image is larger, windows averaged as MMSeg)."""
        text = self.class_embeddings(classes)

        def model_fn(img: Tensor) -> Tensor:
            return self.logits(self.dense_embeddings(img), text)

        if self.crop_size is None:
            return whole_inference(model_fn, x)
        return slide_inference(model_fn, x, len(text), self.crop_size, self.stride)

    def preprocess(self, image: np.ndarray, short_side: int | None = None) -> Tensor:
        """H×W×3 uint8 RGB -> 1×3×H'×W' normalised, short side resized to ``short_side`` (default: the
        model's input size), as the ADE20K protocol resizes before sliding windows."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"predict expects H×W×3 uint8 RGB images, got {image.shape} {image.dtype}")
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255.0
        side = short_side or min(self.backbone.img_size)
        scale = side / min(x.shape[-2:])
        size = [max(1, round(s * scale)) for s in x.shape[-2:]]
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return ((x - mean) / std).to(self.text_encoder.logit_scale.device)

    @torch.no_grad()
    def predict(
        self, images: Sequence[np.ndarray], classes: str | Sequence[str], short_side: int | None = None
    ) -> list[np.ndarray]:
        """uint8 H×W×3 RGB images -> H×W int64 label maps (index into ``classes``) at each image's size."""
        names = class_names(classes, self.text_encoder)
        out = []
        for image in images:
            logits = self.segment(self.preprocess(image, short_side), names)
            logits = F.interpolate(logits, size=image.shape[:2], mode="bilinear", align_corners=False)
            out.append(logits.argmax(1)[0].cpu().numpy())
        return out


class OpenVocabError(DataError):
    """Bad ``classes`` / ``open_vocab`` values, or classes for a closed-set model: the CLI reports it
    in one line (a :class:`~siglip_dense.data.io.DataError`, i.e. a ValueError)."""


def class_names(classes: Any, text_encoder: TextEncoder | None = None) -> list[str]:
    """``"a,b"`` / ``[a, b]`` -> names (a list item may hold comma-separated synonyms); names that
    big_vision's canonicalisation makes identical are refused, and with the text tower also names
    whose synonyms tokenize alike (e.g. both only unknown characters)."""
    try:
        names = parse_classes(classes)
    except ValueError as err:
        raise OpenVocabError(str(err)) from None
    if text_encoder is not None:
        synonyms = [class_synonyms(name) for name in names]
        rows = iter(text_encoder.tokenize([s for syns in synonyms for s in syns])["input_ids"].tolist())
        keys: dict[tuple, str] = {}
        for name, syns in zip(names, synonyms, strict=True):
            key = tuple(tuple(next(rows)) for _ in syns)
            if key in keys:
                raise OpenVocabError(
                    f"classes {keys[key]!r} and {name!r} are the same text for this model (the same tokens "
                    "after big_vision's canonicalisation)"
                )
            keys[key] = name
    return names


def is_trained_checkpoint(path: str | Path) -> bool:
    """A siglip-dense Lightning checkpoint (a ``.ckpt`` file), not a SigLIP image-text checkpoint."""
    return Path(path).is_file() and Path(path).suffix == ".ckpt"


def is_image_text_checkpoint(path: str | Path) -> bool:
    """A local transformers SiglipModel / Siglip2Model or open_clip SigLIP directory (both towers).

    Raises CheckpointError for another transformers model directory (a vision-only SigLIP)."""
    path = Path(path)
    if (path / "open_clip_config.json").is_file():
        return True
    config = path / "config.json"
    model_type = _json(config).get("model_type") if config.is_file() else None
    if model_type is not None and model_type not in TEXT_MODEL_TYPES:
        raise CheckpointError(
            f"{config}: model_type {model_type!r} is neither a trained siglip-dense checkpoint nor a SigLIP "
            f"image-text checkpoint ({', '.join(TEXT_MODEL_TYPES)}): a vision-only model has no text tower "
            "for class names; train a head on it (train.py backbone.checkpoint=...) instead"
        )
    return model_type is not None


def open_vocab_heads(task: nn.Module) -> list[Any]:
    """The task components whose head takes new class names (CAT-Seg); [] for closed-set models."""
    comps = getattr(task, "components", {}) or {}
    return [
        c for c in comps.values() if hasattr(getattr(getattr(c, "model", None), "head", None), "set_classes")
    ]


def set_task_classes(task: nn.Module, classes: Any, text_checkpoint: str | Path | None = None) -> list[str]:
    """Switch a trained open-vocabulary task (CAT-Seg head) to ``classes``; returns the names.

    Raises OpenVocabError for a closed-set model, CheckpointError when new names need the missing
    text tower (``text_checkpoint`` points at it)."""
    comps = open_vocab_heads(task)
    if not comps:
        raise OpenVocabError(
            "classes= needs an open-vocabulary model (a trained CAT-Seg head or a SigLIP image-text "
            "checkpoint); this checkpoint's head is closed-set: it predicts its training classes only"
        )
    names = class_names(classes)
    for comp in comps:
        head = comp.model.head
        if text_checkpoint is not None:
            head.text_checkpoint, head._text = str(text_checkpoint), []
        if names != head.class_names:
            class_names(names, head.text_encoder)
        head.set_classes(names)
        comp.class_names, comp.num_classes = list(names), len(names)
    return names


def load_model(
    checkpoint: str | Path, device: str | torch.device = "cpu", **kwargs: Any
) -> ZeroShotSegmenter | nn.Module:
    """An open-vocabulary model on ``device``: ``load_model(ckpt).predict(images, classes=["cat", "sofa"])``.

    A SigLIP (2) image-text checkpoint -> :class:`ZeroShotSegmenter` (kwargs: method, templates, slide,
    tokenizer); a trained CAT-Seg ``.ckpt`` -> its task (kwargs: text_checkpoint, the SigLIP checkpoint
    for new class names when it moved). Raises OpenVocabError for a closed-set trained checkpoint."""
    if is_trained_checkpoint(checkpoint):
        from siglip_dense.checkpoints import load_task

        task = load_task(checkpoint, map_location=device)
        if not open_vocab_heads(task):
            raise OpenVocabError(
                f"{checkpoint}: its head is closed-set, not open-vocabulary (no CAT-Seg head): it "
                "cannot segment other class names"
            )
        text = kwargs.get("text_checkpoint")
        for comp in open_vocab_heads(task) if text is not None else []:
            comp.model.head.text_checkpoint, comp.model.head._text = str(text), []
        return task.to(device).eval()
    kwargs.pop("text_checkpoint", None)
    return ZeroShotSegmenter.from_checkpoint(checkpoint, **kwargs).to(device).eval()
