"""Zero-shot dense logits against an independent computation from transformers' two towers, slide
inference against a direct per-window loop, and predict.py with free-text classes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from siglip_dense.openvocab import ZeroShotSegmenter, load_model
from tests.conftest import PEER_TOL, max_abs_diff
from tests.test_text import (
    gemma_tokenizer,
    reference_features,
    save_full_model,
    saved_tokenizer,
    sentencepiece_tokenizer,
)

CLASSES = ["cat", "sofa", "fenêtre", "窓"]


@pytest.fixture(scope="module", params=["siglip", "siglip2"])
def full_checkpoint(request, tmp_path_factory) -> tuple[str, Path, torch.nn.Module, object]:
    """A tiny random SiglipModel / Siglip2Model (fixed 32 px, patch 8 -> 4×4 grid) with its tokenizer."""
    kind = request.param
    path = tmp_path_factory.mktemp(f"full_{kind}")
    tok = sentencepiece_tokenizer(path) if kind == "siglip" else gemma_tokenizer(path)
    vision = dict(image_size=32, patch_size=8) if kind == "siglip" else dict(patch_size=8, num_patches=16)
    model = save_full_model(path, kind, vocab_size=len(tok), **vision)
    return kind, path, model, saved_tokenizer(path)


def hf_patch_tokens(kind: str, model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' vision tower on x: (input of the last layer, last_hidden_state), B×N×C."""
    vm = model.vision_model
    with torch.no_grad():
        if kind == "siglip":
            out = vm(pixel_values=x, output_hidden_states=True)
        else:  # NaFlex: patches flattened in (p, p, C) order, a full 4×4 grid per image
            from tests.conftest import siglip2_patchify

            b = x.shape[0]
            out = vm(
                pixel_values=siglip2_patchify(x, 8),
                pixel_attention_mask=torch.ones(b, 16, dtype=torch.long),
                spatial_shapes=torch.tensor([[4, 4]] * b),
                output_hidden_states=True,
            )
    return out.hidden_states[-2], out.last_hidden_state


def hf_head_value_path(model, tokens: torch.Tensor) -> torch.Tensor:
    """The MAP head's value path by hand from transformers' weights: in_proj rows 2C: (value),
    out_proj, then the head's layernorm + MLP residual."""
    head = model.vision_model.head
    c = tokens.shape[-1]
    attn = head.attention
    v = tokens @ attn.in_proj_weight[2 * c :].T + attn.in_proj_bias[2 * c :]
    o = attn.out_proj(v)
    return o + head.mlp(head.layernorm(o))


def hf_clearclip_last_layer(model, hidden: torch.Tensor) -> torch.Tensor:
    """The last encoder layer as q-q attention by hand (no residual, no MLP), then post_layernorm."""
    vm = model.vision_model
    layer = vm.encoder.layers[-1]
    sa = layer.self_attn
    b, n, c = hidden.shape
    heads = sa.num_heads
    h = layer.layer_norm1(hidden)
    q = sa.q_proj(h).view(b, n, heads, -1).transpose(1, 2)
    v = sa.v_proj(h).view(b, n, heads, -1).transpose(1, 2)
    attn = torch.softmax(q @ q.transpose(-1, -2) / (c // heads) ** 0.5, dim=-1)
    out = sa.out_proj((attn @ v).transpose(1, 2).reshape(b, n, c))
    return vm.post_layernorm(out)


@pytest.mark.parametrize("method", ["maskclip", "clearclip"])
def test_dense_logits_match_two_towers(full_checkpoint, method):
    kind, path, model, tok = full_checkpoint
    seg = ZeroShotSegmenter.from_checkpoint(path, method=method, templates="photo", slide=False)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)
    ours = seg(x, CLASSES)
    assert ours.shape == (2, len(CLASSES), 4, 4)

    before_last, last = hf_patch_tokens(kind, model, x)
    tokens = last if method == "maskclip" else hf_clearclip_last_layer(model, before_last)
    with torch.no_grad():
        dense = F.normalize(hf_head_value_path(model, tokens), dim=-1)  # B×N×D
        text = F.normalize(
            reference_features(kind, model, tok, [f"a photo of a {c}." for c in CLASSES]), dim=-1
        )
        ref = dense @ text.T * model.logit_scale.exp() + model.logit_bias
    ref = ref.transpose(1, 2).reshape(2, len(CLASSES), 4, 4)
    assert max_abs_diff(ours, ref) <= PEER_TOL


def test_slide_inference_is_a_window_loop(full_checkpoint):
    _, path, *_ = full_checkpoint
    seg = ZeroShotSegmenter.from_checkpoint(path, slide=True)
    assert seg.crop_size == (32, 32) and seg.stride == (21, 21)
    torch.manual_seed(2)
    x = torch.randn(1, 3, 32, 56)
    ours = seg.segment(x, CLASSES)
    total = torch.zeros(1, len(CLASSES), 32, 56)
    count = torch.zeros(1, 1, 32, 56)
    for x1 in (0, 21, 24):  # windows every 21 px, the last flush with the border (56 - 32)
        crop = x[..., x1 : x1 + 32]
        total[..., x1 : x1 + 32] += F.interpolate(seg(crop, CLASSES), size=(32, 32), mode="bilinear")
        count[..., x1 : x1 + 32] += 1
    assert max_abs_diff(ours, total / count) <= 1e-5


def test_predict_label_maps(full_checkpoint):
    _, path, *_ = full_checkpoint
    model = load_model(path, method="maskclip")
    image = np.random.default_rng(0).integers(0, 256, (40, 70, 3), dtype=np.uint8)
    (labels,) = model.predict([image], classes="cat, sofa,window")
    assert labels.shape == (40, 70) and labels.min() >= 0 and labels.max() < 3
    with pytest.raises(ValueError, match="uint8"):
        model.predict([image.astype(np.float32)], classes="cat")
    with pytest.raises(ValueError, match="method"):
        ZeroShotSegmenter(model.backbone, model.text_encoder, method="nope")
