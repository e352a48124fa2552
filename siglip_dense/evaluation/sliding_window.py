"""The ADE20K test protocol with mmseg semantics: keep-ratio resize, sliding window, ms + flip TTA.

Published ADE20K numbers are measured this way (mmseg ``Resize(scale=(2048, 512), keep_ratio=True)``
then ``slide`` inference with 512 crops and stride 341), so reproducing them needs the same window
grid, border handling and averaging — including the last window being flush with the border.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

ModelFn = Callable[[torch.Tensor], torch.Tensor]


def round_crop_to_patch(crop: Sequence[int], patch: int) -> tuple[int, int]:
    """Round a crop size UP to a multiple of the patch (512 → 518 for patch 14), so no pixel is padded."""
    h, w = (int(c) for c in crop)
    return (math.ceil(h / patch) * patch, math.ceil(w / patch) * patch)


def eval_resize_scale(h: int, w: int, short_side: float, max_long_side: float) -> float:
    """mmcv ``rescale_size`` for ``scale=(max_long_side, short_side)``, ``keep_ratio=True``."""
    return min(max_long_side / max(h, w), short_side / min(h, w))


def resize_image(image: torch.Tensor, scale: float) -> torch.Tensor:
    """Bilinear resize by ``scale`` to ``int(h·scale + 0.5) × int(w·scale + 0.5)`` (mmcv's rounding)."""
    h, w = image.shape[-2:]
    size = (int(h * scale + 0.5), int(w * scale + 0.5))
    if size == (h, w):
        return image
    return F.interpolate(image, size=size, mode="bilinear", align_corners=False)


def _at_size(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def check_window_coverage(
    crop_size: Sequence[int], stride: Sequence[int], setting: str = "task.eval"
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Validate a sliding-window setting: every pixel of any image must fall in a window.

    Windows start every ``stride`` pixels and the last one is flush with the border (mmseg), so
    a stride larger than the crop leaves a band of ``stride - crop`` uncovered pixels between
    neighbours (mmseg asserts coverage for the same reason). Returns ``(crop, stride)`` as int pairs.

    Raises:
        ValueError: naming ``{setting}.crop_size`` / ``{setting}.stride`` when a value is not a
            positive pair or a stride exceeds the crop.
    """
    crop = tuple(int(c) for c in crop_size)
    step = tuple(int(s) for s in stride)
    if len(crop) != 2 or len(step) != 2 or min(crop + step) < 1:
        raise ValueError(
            f"{setting}.crop_size={list(crop_size)} and {setting}.stride={list(stride)} must be two "
            "positive integers (height, width) each"
        )
    if step[0] > crop[0] or step[1] > crop[1]:
        raise ValueError(
            f"{setting}.stride={list(step)} is larger than {setting}.crop_size={list(crop)}: windows "
            f"would leave {max(step[0] - crop[0], 0)}-row / {max(step[1] - crop[1], 0)}-column bands "
            f"of pixels without a prediction. Use a stride <= the crop (mmseg: 2/3 of it, e.g. "
            f"stride={[max(1, c * 2 // 3) for c in crop]})"
            + (
                "; for a trained checkpoint whose stored setting is this, evaluate with tools/eval.py "
                f"ckpt_path=... tta='{{stride: {[max(1, c * 2 // 3) for c in crop]}}}'"
                if setting == "task.eval"
                else ""
            )
        )
    return (crop[0], crop[1]), (step[0], step[1])


def window_grid(
    h: int, w: int, crop_size: Sequence[int], stride: Sequence[int]
) -> list[tuple[int, int, int, int]]:
    """mmseg's windows ``(y1, y2, x1, x2)``: the last one flush with the border, all of one size.

    The windows cover every pixel (the setting is checked by :func:`check_window_coverage`).
    """
    (crop_h, crop_w), (stride_h, stride_w) = check_window_coverage(crop_size, stride)
    h_grids = max(h - crop_h + stride_h - 1, 0) // stride_h + 1
    w_grids = max(w - crop_w + stride_w - 1, 0) // stride_w + 1
    windows = []
    for i in range(h_grids):
        for j in range(w_grids):
            y1, x1 = i * stride_h, j * stride_w
            y2, x2 = min(y1 + crop_h, h), min(x1 + crop_w, w)
            y1, x1 = max(y2 - crop_h, 0), max(x2 - crop_w, 0)
            windows.append((y1, y2, x1, x2))
    return windows


@torch.no_grad()
def slide_inference(
    model_fn: ModelFn,
    image: torch.Tensor,
    num_classes: int,
    crop_size: Sequence[int],
    stride: Sequence[int],
    batch_size: int = 8,
) -> torch.Tensor:
    """Logits B×K×H×W from overlapping windows, summed and divided by the per-pixel window count.

    Windows all have the size ``min(crop, image)``, so ``batch_size`` of them run in one forward.
    Raises ValueError when ``stride`` exceeds ``crop_size`` (pixels would get no window).
    """
    b, _, h, w = image.shape
    windows = window_grid(h, w, crop_size, stride)
    preds = image.new_zeros((b, num_classes, h, w), dtype=torch.float32)
    count = image.new_zeros((1, 1, h, w), dtype=torch.float32)
    for start in range(0, len(windows), batch_size):
        chunk = windows[start : start + batch_size]
        crops = torch.cat([image[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in chunk], dim=0)
        logits = _at_size(model_fn(crops), crops.shape[-2:]).float()
        for n, (y1, y2, x1, x2) in enumerate(chunk):
            preds[:, :, y1:y2, x1:x2] += logits[n * b : (n + 1) * b]
            count[:, :, y1:y2, x1:x2] += 1
    if not bool((count > 0).all()):  # unreachable after check_window_coverage; never return NaN
        raise RuntimeError(f"sliding windows {crop_size}/{stride} left pixels of a {h}×{w} image uncovered")
    return preds / count


@torch.no_grad()
def whole_inference(model_fn: ModelFn, image: torch.Tensor) -> torch.Tensor:
    """One forward on the whole image; logits at the image size."""
    return _at_size(model_fn(image), image.shape[-2:]).float()


@torch.no_grad()
def inference_with_tta(
    model_fn: ModelFn,
    image: torch.Tensor,
    num_classes: int,
    short_side: float | None = 512,
    max_long_side: float = 2048,
    crop_size: Sequence[int] = (512, 512),
    stride: Sequence[int] = (341, 341),
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    mode: str = "slide",
    batch_size: int = 8,
) -> torch.Tensor:
    """Scores B×K×H×W at the ORIGINAL image size.

    Per scale ``s`` the image is resized keep-ratio to short side ``short_side·s`` (long side at most
    ``max_long_side·s``; ``short_side=None`` resizes by ``s`` alone), inferred (``slide`` or
    ``whole``), optionally also flipped horizontally, and the logits resized back to H×W. One view
    returns its logits; several return the mean of their softmax probabilities (mmseg ``aug_test``).
    """
    if mode not in ("slide", "whole"):
        raise ValueError(f"unknown inference mode {mode!r}: use 'slide' or 'whole'")
    if mode == "slide":
        check_window_coverage(crop_size, stride)
    h, w = image.shape[-2:]

    def infer(x: torch.Tensor) -> torch.Tensor:
        if mode == "slide":
            return slide_inference(model_fn, x, num_classes, crop_size, stride, batch_size=batch_size)
        return whole_inference(model_fn, x)

    views = []
    for s in scales:
        if short_side is None:
            factor = float(s)
        else:
            factor = eval_resize_scale(h, w, short_side * s, max_long_side * s)
        x = resize_image(image, factor)
        views.append(_at_size(infer(x), (h, w)))
        if flip:
            views.append(_at_size(infer(x.flip(-1)).flip(-1), (h, w)))
    if len(views) == 1:
        return views[0]
    return torch.stack([v.softmax(dim=1) for v in views]).mean(dim=0)


__all__ = [
    "check_window_coverage",
    "eval_resize_scale",
    "inference_with_tta",
    "resize_image",
    "round_crop_to_patch",
    "slide_inference",
    "whole_inference",
    "window_grid",
]
