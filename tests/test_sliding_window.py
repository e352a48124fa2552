"""The ADE20K test protocol: crop rounding, resize rule, mmseg sliding window and TTA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from siglip_dense.evaluation.sliding_window import (
    eval_resize_scale,
    inference_with_tta,
    resize_image,
    round_crop_to_patch,
    slide_inference,
    whole_inference,
    window_grid,
)

K = 4


def _conv_model(seed: int = 0):
    """A fixed 1×1 conv: per-pixel, translation-equivariant."""
    g = torch.Generator().manual_seed(seed)
    weight, bias = torch.randn(K, 3, 1, 1, generator=g), torch.randn(K, generator=g)
    return lambda x: F.conv2d(x, weight, bias)


def _positional_model(seed: int = 0):
    """A 1×1 conv plus a ramp in window coordinates: the window placement changes the output."""
    conv = _conv_model(seed)

    def fn(x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ys = torch.arange(h, dtype=x.dtype)[:, None]
        xs = torch.arange(w, dtype=x.dtype)[None, :]
        ramp = torch.stack([(k + 1) * 0.1 * ys - 0.05 * k * xs for k in range(K)])
        return conv(x) + ramp

    return fn


def _loop_reference(model_fn, image: torch.Tensor, crop, stride) -> np.ndarray:
    """mmseg's slide_inference written out: one window at a time, numpy accumulation."""
    _, _, h, w = image.shape
    ch, cw = crop
    sh, sw = stride
    preds = np.zeros((image.shape[0], K, h, w))
    count = np.zeros((h, w))
    rows = max(h - ch + sh - 1, 0) // sh + 1
    cols = max(w - cw + sw - 1, 0) // sw + 1
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * sh + ch, h), min(c * sw + cw, w)
            y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
            preds[:, :, y1:y2, x1:x2] += model_fn(image[:, :, y1:y2, x1:x2]).numpy()
            count[y1:y2, x1:x2] += 1
    assert count.min() >= 1
    return preds / count


def test_round_crop_to_patch() -> None:
    assert round_crop_to_patch((512, 512), 14) == (518, 518)
    assert round_crop_to_patch((512, 512), 16) == (512, 512)
    assert round_crop_to_patch((500, 333), 16) == (512, 336)
    assert round_crop_to_patch([518, 14], 14) == (518, 14)


def test_eval_resize_rule_matches_mmcv_rescale() -> None:
    # ADE20K-like 480×640: short side to 512
    s = eval_resize_scale(480, 640, 512, 2048)
    assert s == pytest.approx(512 / 480)
    assert resize_image(torch.zeros(1, 3, 480, 640), s).shape[-2:] == (512, 683)  # 682.67 + .5
    # a panorama hits the long-side cap instead
    s = eval_resize_scale(100, 1000, 512, 2048)
    assert s == pytest.approx(2.048)
    assert resize_image(torch.zeros(1, 3, 100, 1000), s).shape[-2:] == (205, 2048)
    x = torch.randn(1, 3, 7, 9)
    assert resize_image(x, 1.0) is x
    expected = F.interpolate(x, size=(14, 18), mode="bilinear", align_corners=False)
    torch.testing.assert_close(resize_image(x, 2.0), expected)


def test_window_grid_is_flush_and_uniform() -> None:
    windows = window_grid(37, 53, (16, 20), (11, 13))
    assert len(windows) == 3 * 4  # (37-16+10)//11+1, (53-20+12)//13+1
    assert {(y2 - y1, x2 - x1) for y1, y2, x1, x2 in windows} == {(16, 20)}
    assert max(w[1] for w in windows) == 37 and max(w[3] for w in windows) == 53
    assert window_grid(10, 12, (16, 20), (11, 13)) == [(0, 10, 0, 12)]  # smaller than the crop


@pytest.mark.parametrize("crop", [(37, 53), (64, 64)])
def test_slide_equals_whole_when_the_crop_covers_the_image(crop) -> None:
    image = torch.randn(1, 3, 37, 53)
    model_fn = _positional_model()
    whole = whole_inference(model_fn, image)
    torch.testing.assert_close(slide_inference(model_fn, image, K, crop, (11, 13)), whole)


@pytest.mark.parametrize("batch_size", [1, 3, 100])
def test_slide_with_overlaps_equals_loop_reference(batch_size: int) -> None:
    torch.manual_seed(0)
    image = torch.randn(2, 3, 37, 53)
    crop, stride = (16, 20), (11, 13)
    model_fn = _positional_model()
    ref = _loop_reference(model_fn, image, crop, stride)
    out = slide_inference(model_fn, image, K, crop, stride, batch_size=batch_size)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-5)
    # the positional model is not translation-equivariant, so the overlap average differs from whole
    assert not torch.allclose(out, whole_inference(model_fn, image), atol=1e-3)


def test_slide_of_translation_equivariant_model_equals_whole() -> None:
    image = torch.randn(1, 3, 45, 31)
    model_fn = _conv_model()
    out = slide_inference(model_fn, image, K, (16, 16), (7, 9), batch_size=4)
    torch.testing.assert_close(out, whole_inference(model_fn, image), rtol=1e-5, atol=1e-5)


def test_tta_single_view_returns_logits_at_original_size() -> None:
    image = torch.randn(1, 3, 37, 53)
    seen: list[tuple[int, int]] = []
    conv = _positional_model()

    def model_fn(x: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(x.shape[-2:]))
        return conv(x)

    out = inference_with_tta(
        model_fn, image, K, short_side=24, max_long_side=512, crop_size=(16, 16), stride=(8, 8)
    )
    assert out.shape == (1, K, 37, 53)
    # resized keep-ratio to short side 24: 37×53 -> 24×34, windows are crops of that
    resized = resize_image(image, 24 / 37)
    assert resized.shape[-2:] == (24, 34) and set(seen) == {(16, 16)}
    expected = F.interpolate(
        slide_inference(conv, resized, K, (16, 16), (8, 8)),
        size=(37, 53),
        mode="bilinear",
        align_corners=False,
    )
    torch.testing.assert_close(out, expected)
    # no resize at all
    none = inference_with_tta(conv, image, K, short_side=None, mode="whole")
    torch.testing.assert_close(none, conv(image))


def test_tta_flip_is_unflipped_and_multiscale_averages_probabilities() -> None:
    image = torch.randn(1, 3, 32, 48)
    conv = _conv_model()  # per-pixel: the un-flipped flipped view must equal the plain one
    for mode in ("whole", "slide"):
        out = inference_with_tta(
            conv, image, K, short_side=None, crop_size=(16, 16), stride=(10, 10), flip=True, mode=mode
        )
        torch.testing.assert_close(out, conv(image).softmax(1), rtol=1e-5, atol=1e-5)
    # a position-dependent model: the flipped view really is flipped in, and flipped back out
    pos = _positional_model()
    out = inference_with_tta(pos, image, K, short_side=None, flip=True, mode="whole")
    expected = (pos(image).softmax(1) + pos(image.flip(-1)).flip(-1).softmax(1)) / 2
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, pos(image).softmax(1), atol=1e-3)
    scales = (0.5, 1.0, 1.5)
    out = inference_with_tta(conv, image, K, short_side=32, max_long_side=2048, scales=scales, mode="whole")
    assert out.shape == (1, K, 32, 48)
    torch.testing.assert_close(out.sum(1), torch.ones(1, 32, 48))
    views = []
    for s in scales:
        x = resize_image(image, eval_resize_scale(32, 48, 32 * s, 2048 * s))
        views.append(F.interpolate(conv(x), size=(32, 48), mode="bilinear", align_corners=False).softmax(1))
    torch.testing.assert_close(out, torch.stack(views).mean(0))
    with pytest.raises(ValueError, match="mode"):
        inference_with_tta(conv, image, K, mode="tiles")


# -- coverage: every pixel gets a window, whatever the crop / stride / image size ------------------
@pytest.mark.parametrize(
    ("size", "crop", "stride"),
    [
        ((37, 53), (16, 20), (16, 20)),  # crop equal to the stride: tiles, last one flush
        ((37, 53), (16, 20), (5, 7)),  # crop larger than the stride: overlaps
        ((37, 53), (24, 9), (13, 4)),  # non-square crop, non-square stride
        ((12, 9), (16, 20), (11, 13)),  # crop larger than the image
        ((16, 53), (16, 20), (16, 20)),  # one side exactly the crop
    ],
)
def test_slide_covers_every_pixel_and_equals_the_window_loop(size, crop, stride) -> None:
    image = torch.randn(1, 3, *size)
    model_fn = _positional_model(1)
    out = slide_inference(model_fn, image, K, crop, stride, batch_size=5)
    assert torch.isfinite(out).all()
    np.testing.assert_allclose(
        out.numpy(), _loop_reference(model_fn, image, crop, stride), rtol=1e-5, atol=1e-5
    )


def test_window_grid_coverage_over_many_settings() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        h, w = (int(v) for v in rng.integers(1, 90, 2))
        crop = tuple(int(v) for v in rng.integers(1, 40, 2))
        stride = tuple(int(rng.integers(1, c + 1)) for c in crop)
        count = np.zeros((h, w), int)
        for y1, y2, x1, x2 in window_grid(h, w, crop, stride):
            count[y1:y2, x1:x2] += 1
        assert count.min() >= 1, (h, w, crop, stride)


@pytest.mark.parametrize(
    ("crop", "stride"), [((256, 256), (341, 341)), ((16, 20), (16, 21)), ((0, 4), (1, 1))]
)
def test_stride_larger_than_crop_is_refused_not_nan(crop, stride) -> None:
    # the case: crop 256 with the default stride 341 left 43,520 of 358,400 pixels NaN
    image = torch.randn(1, 3, 64, 70)
    with pytest.raises(ValueError, match="stride"):
        slide_inference(_conv_model(), image, K, crop, stride)
    with pytest.raises(ValueError, match="task.eval.stride"):
        inference_with_tta(_conv_model(), image, K, short_side=None, crop_size=crop, stride=stride)


def test_multiscale_flip_covers_every_pixel_and_equals_per_view_loops() -> None:
    """ms + flip with windows smaller than some views: mean of softmaxed per-view window loops."""
    image = torch.randn(1, 3, 29, 47)
    model_fn = _positional_model(2)
    crop, stride, scales = (12, 18), (9, 11), (0.5, 1.0, 1.75)
    out = inference_with_tta(
        model_fn,
        image,
        K,
        short_side=20,
        max_long_side=400,
        crop_size=crop,
        stride=stride,
        scales=scales,
        flip=True,
    )
    assert out.shape == (1, K, 29, 47) and torch.isfinite(out).all()
    views = []
    for s in scales:
        x = resize_image(image, eval_resize_scale(29, 47, 20 * s, 400 * s))
        for flip in (False, True):
            xi = x.flip(-1) if flip else x
            logits = torch.from_numpy(_loop_reference(model_fn, xi, crop, stride)).float()
            logits = logits.flip(-1) if flip else logits
            views.append(
                F.interpolate(logits, size=(29, 47), mode="bilinear", align_corners=False).softmax(1)
            )
    torch.testing.assert_close(out, torch.stack(views).mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.sum(1), torch.ones(1, 29, 47))


def test_segmentation_task_refuses_a_gapped_window_setting_at_construction() -> None:
    from siglip_dense.tasks.segmentation import SegmentationTask

    backbone = {"_target_": "siglip_dense.models.build_backbone", "arch": "tiny", "out_indices": [5]}
    head = {"_target_": "siglip_dense.models.heads.segmentation.LinearHead", "in_keys": None}
    with pytest.raises(ValueError, match=r"task.eval.stride=\[341, 341\] is larger than task.eval.crop_size"):
        SegmentationTask(backbone, head, num_classes=K, eval={"crop_size": [256, 256]})
    task = SegmentationTask(
        backbone, head, num_classes=K, eval={"crop_size": [256, 256], "stride": [170, 170]}
    )
    with pytest.raises(ValueError, match=r"tta.stride=\[300, 300\]"):
        task.set_tta({"stride": [300, 300]})
    assert task.eval_cfg["stride"] == [170, 170]  # a refused tta leaves the protocol unchanged


def test_checkpoint_with_a_gapped_stored_setting_loads_and_evaluates_with_a_tta_stride(tmp_path) -> None:
    """Checkpoints written before the coverage check (stored stride > crop) still load; the setting
    is checked where tools/eval.py can override it, and the message says how."""
    import lightning as L

    from siglip_dense.checkpoints import load_task
    from siglip_dense.tasks.segmentation import SegmentationTask

    backbone = {"_target_": "siglip_dense.models.build_backbone", "arch": "tiny", "out_indices": [5]}
    head = {"_target_": "siglip_dense.models.heads.segmentation.LinearHead", "in_keys": None}
    task = SegmentationTask(backbone, head, num_classes=K, eval={"crop_size": [32, 32], "stride": [32, 32]})
    trainer = L.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu", max_epochs=0)
    trainer.strategy.connect(task)
    path = tmp_path / "old.ckpt"
    trainer.save_checkpoint(path)
    raw = torch.load(path, map_location="cpu", weights_only=False)
    crop = raw["hyper_parameters"]["eval"]["crop_size"]
    raw["hyper_parameters"]["eval"]["stride"] = [crop[0] + 11, crop[1] + 11]  # as written before the check
    torch.save(raw, path)
    with pytest.raises(ValueError, match=r"task.eval.stride"):  # training still refuses it when built
        SegmentationTask(**raw["hyper_parameters"])
    old = load_task(path)
    image = torch.randn(1, 3, 2 * crop[0] + 5, 3 * crop[1] - 7)
    with pytest.raises(ValueError, match=r"tools/eval.py ckpt_path=\.\.\. tta='\{stride: \["):
        old.infer(image)
    old.set_tta({"stride": [crop[0] // 2, crop[1] // 2]})
    out = old.infer(image)
    # reference: the same weights in a task built with the corrected setting from the start
    fixed = SegmentationTask(
        **{
            **raw["hyper_parameters"],
            "eval": {**raw["hyper_parameters"]["eval"], "stride": [crop[0] // 2, crop[1] // 2]},
        }
    )
    fixed.load_state_dict(old.state_dict())
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, fixed.eval().infer(image))
