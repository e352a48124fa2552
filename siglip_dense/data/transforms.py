"""Training / evaluation pipelines (mmseg ADE20K, ViTDet LSJ, BTS depth) in albumentations 2.0.x.

One padding rule for every task, in training and evaluation: images are padded bottom/right
*after* normalisation with 0, i.e. with the mean colour (MMSeg's ``SegDataPreProcessor`` and
detectron2's ``ImageList.from_tensors`` pad normalised tensors with 0); segmentation labels with
the ignore index, depth with 0 (invalid). Evaluation pads with :func:`pad_normalized` (the models'
``pad_input`` and the detectors' batching do the same).

Every random draw goes through the Compose's own RNG (``py_random`` / ``random_generator``), so
seeding the Compose makes augmentation reproducible: training seeds it per sample from (run seed,
epoch, pass, index) before each load (``PerSampleSeeded`` in :mod:`siglip_dense.data.samplers`,
via :func:`seed_transform`), so the draws do not depend on workers or on where a resumed run restarted.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2

IGNORE_INDEX = 255


class RandomRescale(A.DualTransform):
    """mmseg ``RandomResize(scale=base_size, ratio_range=scale_range, keep_ratio=True)``.

    scale = ratio · min(base_long / long side, base_short / short side), ratio ~ U(scale_range);
    bilinear for the image, nearest for the mask.
    """

    def __init__(
        self,
        base_size: Sequence[int] = (2048, 512),
        scale_range: Sequence[float] = (0.5, 2.0),
        p: float = 1.0,
    ) -> None:
        super().__init__(p=p)
        self.base_size = (int(max(base_size)), int(min(base_size)))
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = params["shape"][:2]
        ratio = self.py_random.uniform(*self.scale_range)
        long_side, short_side = self.base_size[0] * ratio, self.base_size[1] * ratio
        scale = min(long_side / max(h, w), short_side / min(h, w))
        return {"out_size": (max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5)))}

    def apply(self, img: np.ndarray, out_size: tuple[int, int], **params: Any) -> np.ndarray:
        return cv2.resize(img, (out_size[1], out_size[0]), interpolation=cv2.INTER_LINEAR)

    def apply_to_mask(self, mask: np.ndarray, out_size: tuple[int, int], **params: Any) -> np.ndarray:
        return cv2.resize(mask, (out_size[1], out_size[0]), interpolation=cv2.INTER_NEAREST)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("base_size", "scale_range")


class RandomCropCatMax(A.DualTransform):
    """mmseg ``RandomCrop(crop_size, cat_max_ratio)``: up to 10 tries for a crop whose most frequent
    non-ignored class covers < ``cat_max_ratio`` of the labelled pixels (and that has ≥ 2 classes);
    otherwise the last try is kept. Images smaller than the crop are cropped to their own size.
    """

    def __init__(
        self,
        height: int,
        width: int,
        cat_max_ratio: float = 0.75,
        ignore_index: int = IGNORE_INDEX,
        max_tries: int = 10,
        p: float = 1.0,
    ) -> None:
        super().__init__(p=p)
        self.height, self.width = int(height), int(width)
        self.cat_max_ratio = float(cat_max_ratio)
        self.ignore_index = int(ignore_index)
        self.max_tries = int(max_tries)

    def _random_box(self, h: int, w: int) -> tuple[int, int, int, int]:
        y0 = self.py_random.randint(0, max(h - self.height, 0))
        x0 = self.py_random.randint(0, max(w - self.width, 0))
        return y0, x0, min(y0 + self.height, h), min(x0 + self.width, w)

    def _acceptable(self, mask: np.ndarray) -> bool:
        counts = np.bincount(mask.ravel(), minlength=256)
        counts[self.ignore_index] = 0
        counts = counts[counts > 0]
        return len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = params["shape"][:2]
        box = self._random_box(h, w)
        mask = data.get("mask")
        if mask is not None and self.cat_max_ratio < 1.0:
            for _ in range(self.max_tries - 1):
                y0, x0, y1, x1 = box
                if self._acceptable(mask[y0:y1, x0:x1]):
                    break
                box = self._random_box(h, w)
        return {"box": box}

    def apply(self, img: np.ndarray, box: tuple[int, int, int, int], **params: Any) -> np.ndarray:
        y0, x0, y1, x1 = box
        return img[y0:y1, x0:x1]

    def apply_to_mask(self, mask: np.ndarray, box: tuple[int, int, int, int], **params: Any) -> np.ndarray:
        y0, x0, y1, x1 = box
        return mask[y0:y1, x0:x1]

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("height", "width", "cat_max_ratio", "ignore_index", "max_tries")


class PhotoMetricDistortion(A.ImageOnlyTransform):
    """mmseg ``PhotoMetricDistortion`` on uint8 RGB, each step with probability 1/2: brightness ±32,
    contrast ×[0.5, 1.5] (before or after the HSV steps), saturation ×[0.5, 1.5], hue ±18 (OpenCV
    units of 2°)."""

    def __init__(
        self,
        brightness_delta: int = 32,
        contrast_range: Sequence[float] = (0.5, 1.5),
        saturation_range: Sequence[float] = (0.5, 1.5),
        hue_delta: int = 18,
        p: float = 1.0,
    ) -> None:
        super().__init__(p=p)
        self.brightness_delta = int(brightness_delta)
        self.contrast_range = (float(contrast_range[0]), float(contrast_range[1]))
        self.saturation_range = (float(saturation_range[0]), float(saturation_range[1]))
        self.hue_delta = int(hue_delta)

    def get_params(self) -> dict[str, Any]:
        r = self.py_random
        delta = self.brightness_delta
        return {
            "brightness": r.uniform(-delta, delta) if r.random() < 0.5 else None,
            "contrast_first": r.random() < 0.5,
            "contrast": r.uniform(*self.contrast_range) if r.random() < 0.5 else None,
            "saturation": r.uniform(*self.saturation_range) if r.random() < 0.5 else None,
            "hue": r.randint(-self.hue_delta, self.hue_delta) if r.random() < 0.5 else None,
        }

    def apply(
        self,
        img: np.ndarray,
        brightness: float | None,
        contrast_first: bool,
        contrast: float | None,
        saturation: float | None,
        hue: int | None,
        **params: Any,
    ) -> np.ndarray:
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise TypeError(f"PhotoMetricDistortion expects H×W×3 uint8 RGB, got {img.dtype} {img.shape}")
        out = img.astype(np.float32)
        if brightness is not None:
            out = np.clip(out + brightness, 0, 255)
        if contrast is not None and contrast_first:
            out = np.clip(out * contrast, 0, 255)
        if saturation is not None or hue is not None:
            hsv = cv2.cvtColor(out.astype(np.uint8), cv2.COLOR_RGB2HSV).astype(np.float32)
            if saturation is not None:
                hsv[..., 1] = np.clip(hsv[..., 1] * saturation, 0, 255)
            if hue is not None:
                hsv[..., 0] = (hsv[..., 0] + hue) % 180
            out = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32)
        if contrast is not None and not contrast_first:
            out = np.clip(out * contrast, 0, 255)
        return out.astype(np.uint8)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("brightness_delta", "contrast_range", "saturation_range", "hue_delta")


def pad_if_needed(min_height: int, min_width: int, fill_mask: float = IGNORE_INDEX) -> A.PadIfNeeded:
    """Bottom/right pad of a NORMALISED image with 0 (the mean colour), masks with ``fill_mask``."""
    return A.PadIfNeeded(
        min_height=int(min_height),
        min_width=int(min_width),
        position="top_left",  # pad bottom/right like mmseg / detectron2
        border_mode=cv2.BORDER_CONSTANT,
        fill=0,
        fill_mask=fill_mask,
    )


def pad_normalized(image: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Evaluation's side of the padding rule: ``...×H×W`` normalised tensor → ``size``, 0 bottom/right.

    Raises ValueError when the image is larger than ``size``.
    """
    h, w = image.shape[-2:]
    th, tw = int(size[0]), int(size[1])
    if h > th or w > tw:
        raise ValueError(f"cannot pad a {h}×{w} image to {th}×{tw}: it is larger")
    if (h, w) == (th, tw):
        return image
    return torch.nn.functional.pad(image, (0, tw - w, 0, th - h), value=0.0)


def seed_transform(transform: A.BaseCompose, seed: int) -> None:
    """Seed a Compose with ONE shared numpy + python RNG stream.

    ``Compose.set_random_seed`` gives every child its own generator with the same seed, which would
    correlate e.g. the flip decision with the rescale ratio; a shared stream keeps draws independent.
    """
    seed = int(seed) % (2**63)
    transform.set_random_seed(seed)
    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))


def build_seg_train_transform(
    crop_size: Sequence[int],
    scale_range: Sequence[float] = (0.5, 2.0),
    base_size: Sequence[int] = (2048, 512),
    cat_max_ratio: float = 0.75,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    ignore_index: int = IGNORE_INDEX,
    seed: int | None = None,
    hflip: float = 0.5,
    photometric: bool = True,
) -> A.Compose:
    """Rescale → cat-max crop → flip → photometric → normalise → pad (image 0 = mean, mask ignore)
    → tensor."""
    ch, cw = int(crop_size[0]), int(crop_size[1])
    steps: list[Any] = [
        RandomRescale(base_size=base_size, scale_range=scale_range),
        RandomCropCatMax(ch, cw, cat_max_ratio=cat_max_ratio, ignore_index=ignore_index),
        A.HorizontalFlip(p=float(hflip)),
    ]
    if photometric:
        steps.append(PhotoMetricDistortion())
    steps += [
        A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0),
        pad_if_needed(ch, cw, fill_mask=ignore_index),
        ToTensorV2(),
    ]
    transform = A.Compose(steps, seed=seed)
    if seed is not None:
        seed_transform(transform, seed)
    return transform


def build_seg_eval_transform(mean: Sequence[float], std: Sequence[float]) -> A.Compose:
    """Normalise only, at the original size: the sliding-window evaluator does the resizing."""
    return A.Compose([A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0), ToTensorV2()])


# -- detection / instance segmentation: large-scale jitter (ViTDet, Ghiasi et al. 2021) ----------------
class ResizeScale(A.RandomScale):
    """detectron2 ``ResizeScale``: keep ratio, scale so the image fits ``target`` × U(scale_range).

    Scale = ratio · min(target_h / h, target_w / w). Boxes are scale invariant in albumentations'
    normalised coordinates; masks use nearest interpolation (RandomScale's handling).
    """

    def __init__(
        self,
        target_size: Sequence[int] = (1024, 1024),
        scale_range: Sequence[float] = (0.1, 2.0),
        p: float = 1.0,
    ) -> None:
        super().__init__(scale_limit=0.0, p=p)
        self.target_size = (int(target_size[0]), int(target_size[1]))
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))

    def get_params(self) -> dict[str, float]:
        return {}

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = params["shape"][:2]
        ratio = self.py_random.uniform(*self.scale_range)
        scale = ratio * min(self.target_size[0] / h, self.target_size[1] / w)
        # at least one output pixel on each side
        return {"scale": max(scale, 1.0 / min(h, w))}

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("target_size", "scale_range")


def build_det_train_transform(
    image_size: Sequence[int] | int = 1024,
    scale_range: Sequence[float] = (0.1, 2.0),
    min_area: float = 1.0,
    hflip: float = 0.5,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    seed: int | None = None,
) -> A.Compose:
    """LSJ as detectron2's ViTDet: flip → resize to the target × U(0.1, 2.0) → normalise → fixed-size
    crop (pad bottom/right with 0, the mean colour).

    The flip comes first (detectron2 ``RandomFlip`` before ``ResizeScale`` / ``FixedSizeCrop``), so
    the pad is always bottom/right, as in evaluation; a flip after the crop would move it to the left.

    Call with ``bboxes`` (COCO xywh), ``labels`` and ``ann_idx`` (each box's index into ``masks``):
    albumentations clips boxes and drops those smaller than ``min_area`` or degenerate but keeps every
    mask, so the caller re-indexes masks with the surviving ``ann_idx`` (see :func:`apply_det_transform`).
    """
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    th, tw = int(image_size[0]), int(image_size[1])
    transform = A.Compose(
        [
            A.HorizontalFlip(p=hflip),
            ResizeScale(target_size=(th, tw), scale_range=scale_range),
            # normalised before the crop pads it: pads are 0 = the mean colour, as in evaluation
            A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0),
            A.RandomCrop(
                th,
                tw,
                pad_if_needed=True,
                pad_position="top_left",
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=0,
            ),
            ToTensorV2(),
        ],
        bbox_params=A.BboxParams(
            format="coco",
            label_fields=["labels", "ann_idx"],
            clip=True,
            filter_invalid_bboxes=True,
            min_area=float(min_area),
            min_width=1.0,
            min_height=1.0,
        ),
        seed=seed,
    )
    if seed is not None:
        seed_transform(transform, seed)
    return transform


def build_det_eval_transform(mean: Sequence[float], std: Sequence[float]) -> A.Compose:
    """Normalise only, at the original size: the detector's own transform resizes to the test size and
    maps its predictions back to original pixels."""
    return A.Compose([A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0), ToTensorV2()])


def apply_det_transform(
    transform: A.Compose,
    image: np.ndarray,
    boxes_xywh: np.ndarray,
    labels: np.ndarray,
    masks: np.ndarray | None = None,
) -> dict[str, Any]:
    """Run a detection Compose and keep boxes, labels and masks aligned.

    Returns ``image`` (tensor), ``boxes`` (N×4 float32 xyxy in output pixels), ``labels`` (N int64) and
    ``masks`` (N×H×W uint8, or None): only the masks of boxes that survived, in the boxes' order.
    """
    n = len(boxes_xywh)
    if "bboxes" not in getattr(transform, "processors", {}):  # photometric / normalise only: geometry kept
        out = transform(image=image)
        xyxy = np.asarray(boxes_xywh, np.float32).reshape(-1, 4).copy()
        xyxy[:, 2:] += xyxy[:, :2]
        h, w = image.shape[:2]
        keep_masks = None if masks is None else np.asarray(masks, np.uint8).reshape(-1, h, w)
        return {
            "image": out["image"],
            "boxes": xyxy,
            "labels": np.asarray(labels, np.int64),
            "masks": keep_masks,
        }
    data: dict[str, Any] = {
        "image": image,
        "bboxes": np.asarray(boxes_xywh, np.float32).reshape(-1, 4),
        "labels": np.asarray(labels, np.int64).reshape(-1),
        "ann_idx": np.arange(n, dtype=np.int64),
    }
    if masks is not None and n:
        data["masks"] = np.asarray(masks, np.uint8)
    out = transform(**data)
    img = out["image"]
    h, w = img.shape[-2:]
    bxs = np.asarray(out["bboxes"], np.float32).reshape(-1, 4)
    keep = np.asarray(out["ann_idx"], np.int64).reshape(-1)
    xyxy = bxs.copy()
    xyxy[:, 2:] += xyxy[:, :2]
    result: dict[str, Any] = {
        "image": img,
        "boxes": xyxy,
        "labels": np.asarray(out["labels"], np.int64).reshape(-1),
        "masks": None,
    }
    if masks is not None:
        if n:
            out_masks = out["masks"]
            stacked = np.stack([np.asarray(m) for m in out_masks]) if len(out_masks) else None
            if stacked is None:
                result["masks"] = np.zeros((0, h, w), np.uint8)
            else:
                result["masks"] = np.ascontiguousarray(stacked[keep].astype(np.uint8))
        else:
            result["masks"] = np.zeros((0, h, w), np.uint8)
    return result


# ---------------------------------------------------------------------------------------------
# depth (NYUv2 / BTS recipe): depth is the ``mask`` target — nearest resampling, never photometric,
# and every border a geometric step creates is 0 in the depth map (= invalid, the NYUv2 convention).
# ---------------------------------------------------------------------------------------------
class DepthPhotometric(A.ImageOnlyTransform):
    """BTS / AdaBins colour augmentation on uint8 RGB: gamma, brightness, per-channel colour gains.

    Image only, so the depth map (a mask target) is never touched.
    """

    def __init__(
        self,
        gamma_range: Sequence[float] = (0.9, 1.1),
        brightness_range: Sequence[float] = (0.75, 1.25),
        colour_range: Sequence[float] = (0.9, 1.1),
        p: float = 0.5,
    ) -> None:
        super().__init__(p=p)
        self.gamma_range = (float(gamma_range[0]), float(gamma_range[1]))
        self.brightness_range = (float(brightness_range[0]), float(brightness_range[1]))
        self.colour_range = (float(colour_range[0]), float(colour_range[1]))

    def get_params(self) -> dict[str, Any]:
        r = self.py_random
        return {
            "gamma": r.uniform(*self.gamma_range),
            "brightness": r.uniform(*self.brightness_range),
            "colours": [r.uniform(*self.colour_range) for _ in range(3)],
        }

    def apply(
        self, img: np.ndarray, gamma: float, brightness: float, colours: list[float], **params: Any
    ) -> np.ndarray:
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise TypeError(f"DepthPhotometric expects H×W×3 uint8 RGB, got {img.dtype} {img.shape}")
        out = (img.astype(np.float32) / 255.0) ** gamma * brightness
        out = out * np.asarray(colours, np.float32)[None, None]
        return (np.clip(out, 0.0, 1.0) * 255.0).round().astype(np.uint8)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("gamma_range", "brightness_range", "colour_range")


class RandomResizeDepth(A.DualTransform):
    """Keep-ratio resize to short side ``short_side`` (or the image's own) × U(``scale_range``).

    Bilinear for the image, nearest for depth: interpolating across an object boundary would invent
    depths that exist nowhere, and mixing a 0 (invalid) with a valid depth would invent a valid one.
    Depth values are not rescaled (the BTS / Depth Anything convention).
    """

    def __init__(
        self, short_side: int | None = None, scale_range: Sequence[float] = (1.0, 1.0), p: float = 1.0
    ) -> None:
        super().__init__(p=p)
        self.short_side = int(short_side) if short_side else None
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = params["shape"][:2]
        ratio = self.py_random.uniform(*self.scale_range)
        scale = ratio * (self.short_side / min(h, w) if self.short_side else 1.0)
        return {"out_size": (max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5)))}

    def apply(self, img: np.ndarray, out_size: tuple[int, int], **params: Any) -> np.ndarray:
        if tuple(img.shape[:2]) == tuple(out_size):
            return img
        return cv2.resize(img, (out_size[1], out_size[0]), interpolation=cv2.INTER_LINEAR)

    def apply_to_mask(self, mask: np.ndarray, out_size: tuple[int, int], **params: Any) -> np.ndarray:
        if tuple(mask.shape[:2]) == tuple(out_size):
            return mask
        return cv2.resize(mask, (out_size[1], out_size[0]), interpolation=cv2.INTER_NEAREST)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("short_side", "scale_range")


def build_depth_train_transform(
    crop_size: Sequence[int],
    short_side: int | None = None,
    scale_range: Sequence[float] = (1.0, 1.0),
    rotate: float = 2.5,
    flip: bool = True,
    photometric: bool = True,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    seed: int | None = None,
) -> A.Compose:
    """(Resize →) rotate ±``rotate``° → random crop → flip → colour → normalise → pad → tensor.

    Call it as ``transform(image=rgb_uint8, mask=depth_float32_metres)``. Crops smaller than
    ``crop_size`` are padded bottom/right after normalisation (image 0 = the mean colour, depth 0 =
    invalid), as evaluation pads. Rotation borders are raw 0 in the image (BTS's ``rotate`` fill, before
    the colour step that needs uint8) and 0 (invalid) in depth.
    """
    ch, cw = int(crop_size[0]), int(crop_size[1])
    steps: list[Any] = []
    if short_side or tuple(scale_range) != (1.0, 1.0):
        steps.append(RandomResizeDepth(short_side=short_side, scale_range=scale_range))
    if rotate and rotate > 0:
        steps.append(
            A.Rotate(
                limit=(-float(rotate), float(rotate)),
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=0,
                p=1.0,
            )
        )
    steps.append(RandomCropCatMax(ch, cw, cat_max_ratio=1.0))
    if flip:
        steps.append(A.HorizontalFlip(p=0.5))
    if photometric:
        steps.append(DepthPhotometric())
    steps += [
        A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0),
        pad_if_needed(ch, cw, fill_mask=0),  # image: 0 = mean colour; depth: 0 = invalid
        ToTensorV2(),
    ]
    transform = A.Compose(steps, seed=seed)
    if seed is not None:
        seed_transform(transform, seed)
    return transform


def build_depth_eval_transform(mean: Sequence[float], std: Sequence[float]) -> A.Compose:
    """Normalise only: depth is evaluated at ground-truth resolution, the task resizes the prediction."""
    return A.Compose([A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0), ToTensorV2()])
