"""Zero-shot dense logits against an independent computation from transformers' two towers, slide
inference against a direct per-window loop, and predict.py with free-text classes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from siglip_dense.openvocab import ZeroShotSegmenter, load_model
from tests.conftest import PEER_TOL, REPO, max_abs_diff
from tests.test_text import (
    gemma_tokenizer,
    reference_features,
    save_full_model,
    saved_tokenizer,
    sentencepiece_tokenizer,
)

CLASSES = ["cat", "sofa", "fenêtre", "窓"]


def _save_checkpoint(kind: str, path: Path) -> tuple[str, Path, torch.nn.Module, object]:
    """A tiny random SiglipModel / Siglip2Model (fixed 32 px, patch 8 -> 4×4 grid) with its tokenizer."""
    tok = sentencepiece_tokenizer(path) if kind == "siglip" else gemma_tokenizer(path)
    vision = dict(image_size=32, patch_size=8) if kind == "siglip" else dict(patch_size=8, num_patches=16)
    model = save_full_model(path, kind, vocab_size=len(tok), **vision)
    return kind, path, model, saved_tokenizer(path)


@pytest.fixture(scope="module")
def siglip_checkpoint(tmp_path_factory) -> tuple[str, Path, torch.nn.Module, object]:
    return _save_checkpoint("siglip", tmp_path_factory.mktemp("full_siglip"))


@pytest.fixture(scope="module")
def siglip2_checkpoint(tmp_path_factory) -> tuple[str, Path, torch.nn.Module, object]:
    return _save_checkpoint("siglip2", tmp_path_factory.mktemp("full_siglip2"))


@pytest.fixture(params=["siglip", "siglip2"])
def full_checkpoint(request) -> tuple[str, Path, torch.nn.Module, object]:
    return request.getfixturevalue(f"{request.param}_checkpoint")


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
        text = F.normalize(reference_features(model, tok, [f"a photo of a {c}." for c in CLASSES]), dim=-1)
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


def _run_tool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_predict_tool_free_text_classes(siglip2_checkpoint, tmp_path):
    """One tool run, on the SigLIP 2 (Gemma tokenizer) checkpoint."""
    _, path, *_ = siglip2_checkpoint
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(tmp_path / "room.jpg")
    out = tmp_path / "out"
    _run_tool(
        str(REPO / "tools/predict.py"),
        f"ckpt_path={path}",
        f"input={tmp_path / 'room.jpg'}",
        f"output={out}",
        "classes='猫,canapé,window'",  # Hydra: non-ASCII values need quotes
        "open_vocab.method=maskclip",
        cwd=tmp_path,
    )
    labels = np.asarray(Image.open(out / "room.jpg.png"))  # the project naming: file name + .png
    vis = np.asarray(Image.open(out / "room.jpg_vis.png"))
    assert labels.shape == (48, 64) and labels.max() < 3
    assert vis.shape[0] == 48 and vis.shape[1] > 64  # overlay + legend column
    assert json.loads((out / "classes.json").read_text()) == ["猫", "canapé", "window"]
    expected = load_model(path, method="maskclip").predict(
        [np.asarray(Image.open(tmp_path / "room.jpg"))], "猫,canapé,window"
    )
    assert np.array_equal(labels, expected[0])


@pytest.mark.slow
def test_eval_tool_zero_shot_miou(siglip_checkpoint, toy_data_root, tmp_path):
    """One tool run, on the SigLIP (SentencePiece tokenizer) checkpoint."""
    _, path, *_ = siglip_checkpoint
    from PIL import Image

    from siglip_dense.evaluation.sliding_window import eval_resize_scale, resize_image

    _run_tool(
        str(REPO / "tools/eval.py"),
        "zero_shot=true",
        f"ckpt_path={path}",
        "data=toy_seg",
        f"data.root={toy_data_root}",
        "data.num_workers=0",
        f"output_dir={tmp_path}",
        "open_vocab.templates=photo",
        cwd=tmp_path,
    )
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    # independent: each image and annotation read from disk, ADE20K labels (0 ignored, k -> k-1),
    # confusion matrix in numpy
    names = (toy_data_root / "classes.txt").read_text().split()
    model = load_model(path, templates="photo")
    k = len(names)
    conf = np.zeros((k, k), dtype=np.int64)
    for img_file in sorted((toy_data_root / "images/validation").glob("*.jpg")):
        image = np.asarray(Image.open(img_file).convert("RGB"))
        ann = np.asarray(
            Image.open(toy_data_root / "annotations/validation" / f"{img_file.stem}.png")
        ).astype(int)
        x = (torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 255 - 0.5) / 0.5
        h, w = image.shape[:2]
        x = resize_image(x, eval_resize_scale(h, w, 32, 128))
        logits = F.interpolate(model.segment(x, names), size=(h, w), mode="bilinear", align_corners=False)
        pred = logits.argmax(1)[0].numpy()
        valid = ann > 0
        conf += np.bincount((ann[valid] - 1) * k + pred[valid], minlength=k * k).reshape(k, k)
    inter = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - inter
    miou = np.mean(inter[union > 0] / union[union > 0])
    assert metrics["mIoU"] == pytest.approx(miou, abs=1e-6)
    assert set(metrics["per_class_IoU"]) == set(names)
