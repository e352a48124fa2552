"""NaFlex data: native-aspect-ratio resizing to a patch budget, per-image grids, padded batches.

SigLIP 2's NaFlex variant (Tschannen et al. 2025, Sec. 2.4.3) sees each image at its own aspect
ratio: the image is resized so that its patch grid holds at most ``max_num_patches`` patches, both
sides a multiple of the patch size. Several such images are padded bottom/right into one batch and
the backbone is told each image's grid (``grid_sizes``, B×2 of (h_i, w_i) patches).

The target size is the one transformers' ``Siglip2ImageProcessor`` computes
(``get_image_size_for_max_num_patches``: a bisection on the scale factor, eps 1e-5, scale in
[eps/10, 100]); tests compare ours with that function.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
import torch.nn.functional as F
from albumentations.pytorch import ToTensorV2

from siglip_dense.data.samplers import worker_seed
from siglip_dense.data.segmentation import SegDataModule
from siglip_dense.data.transforms import IGNORE_INDEX, PhotoMetricDistortion, RandomCropCatMax, seed_transform

_EPS = 1e-5


def _scaled_side(size: int, scale: float, patch_size: int) -> int:
    """``size·scale`` rounded UP to a patch multiple, at least one patch."""
    return max(patch_size, math.ceil(size * scale / patch_size) * patch_size)


def naflex_target_size(
    height: int, width: int, patch_size: int, max_num_patches: int, eps: float = _EPS
) -> tuple[int, int]:
    """(H', W') in pixels, patch multiples, with (H'/p)·(W'/p) ≤ ``max_num_patches``, ratio kept.

    The NaFlex processor's rule (transformers ``Siglip2ImageProcessor``): the largest scale ``s``,
    found by bisection to ``eps``, for which ``ceil(H·s/p)·ceil(W·s/p) ≤ max_num_patches``; each side
    at least one patch. Images are up- or downsampled alike (scale up to 100).

    Raises:
        ValueError: non-positive sizes, patch size or budget.
    """
    if min(height, width) <= 0 or patch_size <= 0 or max_num_patches <= 0:
        raise ValueError(
            f"naflex_target_size needs positive sizes, patch_size and max_num_patches; got "
            f"{height}x{width}, patch_size={patch_size}, max_num_patches={max_num_patches}"
        )
    lo, hi = eps / 10, 100.0
    while hi - lo >= eps:
        mid = (lo + hi) / 2
        th, tw = _scaled_side(height, mid, patch_size), _scaled_side(width, mid, patch_size)
        if (th // patch_size) * (tw // patch_size) <= max_num_patches:
            lo = mid
        else:
            hi = mid
    return _scaled_side(height, lo, patch_size), _scaled_side(width, lo, patch_size)


def naflex_resize(image: torch.Tensor, patch_size: int, max_num_patches: int) -> torch.Tensor:
    """C×H×W (or B×C×H×W) image → its NaFlex target size; bilinear with antialias.

    The processor resizes with PIL bilinear, which antialiases when it shrinks; ``antialias=True`` is
    torch's equivalent (and torchvision's, which the fast processor uses).
    """
    h, w = image.shape[-2:]
    size = naflex_target_size(int(h), int(w), patch_size, max_num_patches)
    if size == (h, w):
        return image
    batched = image if image.ndim == 4 else image[None]
    out = F.interpolate(batched.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
    return out.to(image.dtype) if image.ndim == 4 else out[0].to(image.dtype)


def pad_to_batch(
    images: Sequence[torch.Tensor], patch_size: int, fill: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """C×h_i×w_i images (sides multiples of ``patch_size``) → B×C×H×W batch and B×2 ``grid_sizes``.

    Each image sits top-left; the rest is ``fill`` (0 = the mean colour after SigLIP's
    normalisation). ``grid_sizes[i] = (h_i/p, w_i/p)``, the backbone's per-image grid.

    Raises:
        ValueError: no images, differing channel counts, or a side that is not a patch multiple.
    """
    if not images:
        raise ValueError("pad_to_batch needs at least one image")
    channels = {int(x.shape[0]) for x in images}
    if len(channels) != 1:
        raise ValueError(f"images have different channel counts {sorted(channels)}")
    sizes = [(int(x.shape[-2]), int(x.shape[-1])) for x in images]
    bad = [s for s in sizes if s[0] % patch_size or s[1] % patch_size]
    if bad:
        raise ValueError(f"image sizes {bad} are not multiples of the patch size {patch_size}")
    height, width = max(s[0] for s in sizes), max(s[1] for s in sizes)
    batch = images[0].new_full((len(images), channels.pop(), height, width), fill)
    for i, x in enumerate(images):
        batch[i, :, : x.shape[-2], : x.shape[-1]] = x
    grid = torch.tensor([[h // patch_size, w // patch_size] for h, w in sizes], dtype=torch.long)
    return batch, grid


def collate_naflex(images: Sequence[torch.Tensor], patch_size: int, max_num_patches: int) -> dict[str, Any]:
    """Resize each C×H×W image to its NaFlex size and pad them into one batch.

    Returns ``image`` (B×C×H'×W'), ``grid_sizes`` (B×2 long, patches) and ``sizes`` (the original
    (H, W) of each image, for mapping predictions back).
    """
    resized = [naflex_resize(x, patch_size, max_num_patches) for x in images]
    batch, grid = pad_to_batch(resized, patch_size)
    return {"image": batch, "grid_sizes": grid, "sizes": [tuple(x.shape[-2:]) for x in images]}


# -- training ------------------------------------------------------------------------------------
class NaFlexRescale(A.DualTransform):
    """Keep-ratio resize to the image's NaFlex size × ``U(scale_range)`` (bilinear; nearest for masks).

    Scale 1.0 is exactly the size NaFlex evaluation feeds the model, so the training jitter is
    centred on the test resolution of each image (mmseg's ``RandomResize`` centres it on a fixed
    ``(2048, 512)`` instead).
    """

    def __init__(
        self,
        patch_size: int,
        max_num_patches: int,
        scale_range: Sequence[float] = (0.5, 2.0),
        p: float = 1.0,
    ) -> None:
        super().__init__(p=p)
        self.patch_size, self.max_num_patches = int(patch_size), int(max_num_patches)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = params["shape"][:2]
        th, tw = naflex_target_size(h, w, self.patch_size, self.max_num_patches)
        ratio = self.py_random.uniform(*self.scale_range)
        return {"out_size": (max(1, int(th * ratio + 0.5)), max(1, int(tw * ratio + 0.5)))}

    def apply(self, img: np.ndarray, out_size: tuple[int, int], **params: Any) -> np.ndarray:
        return cv2.resize(img, (out_size[1], out_size[0]), interpolation=cv2.INTER_LINEAR)

    def apply_to_mask(self, mask: np.ndarray, out_size: tuple[int, int], **params: Any) -> np.ndarray:
        return cv2.resize(mask, (out_size[1], out_size[0]), interpolation=cv2.INTER_NEAREST)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("patch_size", "max_num_patches", "scale_range")


def build_naflex_seg_train_transform(
    crop_size: Sequence[int],
    patch_size: int,
    max_num_patches: int,
    scale_range: Sequence[float] = (0.5, 2.0),
    cat_max_ratio: float = 0.75,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    ignore_index: int = IGNORE_INDEX,
    seed: int | None = None,
) -> A.Compose:
    """NaFlex rescale → cat-max crop → flip → photometric → pad (0 / ignore) → normalise → tensor.

    Why random crops rather than whole NaFlex-resized images: SigLIP 2 reports its dense probes
    (segmentation, depth, normals) with fixed-size inputs, timm's NaFlex loader also trains on random
    resized crops (then fits them to the patch budget), and mmseg's crop recipe is what ADE20K
    numbers are trained with. A crop never distorts the aspect ratio (what NaFlex exists
    to keep), the NaFlex backbone takes a square grid like any other, and fixed-size batches keep the
    heads' BatchNorm statistics and throughput of the standard recipe. The crop side is chosen so a
    crop holds about ``max_num_patches`` patches, and the rescale is centred on each image's NaFlex
    size, so training sees the same resolution as NaFlex evaluation.
    """
    ch, cw = int(crop_size[0]), int(crop_size[1])
    transform = A.Compose(
        [
            NaFlexRescale(patch_size, max_num_patches, scale_range=scale_range),
            RandomCropCatMax(ch, cw, cat_max_ratio=cat_max_ratio, ignore_index=ignore_index),
            A.HorizontalFlip(p=0.5),
            PhotoMetricDistortion(),
            A.PadIfNeeded(
                min_height=ch,
                min_width=cw,
                position="top_left",
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=ignore_index,
            ),
            A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0),
            ToTensorV2(),
        ],
        seed=seed,
    )
    if seed is not None:
        seed_transform(transform, seed)
    return transform


class NaFlexSegDataModule(SegDataModule):
    """ADE20K-layout data for NaFlex segmentation: crops around each image's NaFlex size for training.

    Evaluation data is as in :class:`SegDataModule` (original images, normalised); the task's
    ``eval.mode=naflex`` resizes and batches them. ``crop_size`` defaults to the square that holds
    ``max_num_patches`` patches (e.g. 512 for 1024 patches of 16 px).
    """

    def __init__(
        self,
        root: str | Path,
        max_num_patches: int = 1024,
        patch_size: int = 16,
        crop_size: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> None:
        self.max_num_patches, self.patch_size = int(max_num_patches), int(patch_size)
        if crop_size is None:
            side = math.isqrt(self.max_num_patches) * self.patch_size
            crop_size = (side, side)
        if "base_size" in kwargs:
            raise ValueError(
                "data.base_size is not used by NaFlexSegDataModule: each image's NaFlex size "
                "(data.max_num_patches) is the scale that data.scale_range jitters"
            )
        super().__init__(root, crop_size=crop_size, **kwargs)

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if stage in (None, "fit"):
            self.train_dataset = self._dataset(
                self.train_split,
                build_naflex_seg_train_transform(
                    self.crop_size,
                    self.patch_size,
                    self.max_num_patches,
                    scale_range=self.scale_range,
                    cat_max_ratio=self.cat_max_ratio,
                    mean=self.mean,
                    std=self.std,
                    ignore_index=IGNORE_INDEX,
                    seed=worker_seed(self.run_seed, 0, self._global_rank()),
                ),
            )


__all__ = [
    "NaFlexRescale",
    "NaFlexSegDataModule",
    "build_naflex_seg_train_transform",
    "collate_naflex",
    "naflex_resize",
    "naflex_target_size",
    "pad_to_batch",
]
