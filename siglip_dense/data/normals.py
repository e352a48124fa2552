"""Surface normals: the NYUv2 layout as commonly distributed, the flip that mirrors normals, the data module.

Layout: ``ROOT/<split>/rgb/<stem>.png`` (or .jpg) with ``ROOT/<split>/normals/<stem>.png``, the
normal stored as an RGB PNG with ``n = value / 127.5 − 1`` per channel, in the camera frame (x right,
y down, z away from the camera: a surface facing the camera has n ≈ (0, 0, −1)); a pixel whose
decoded vector has norm < 0.5 is invalid (e.g. mid-grey 127/128: the zero vector), and so is a pixel
stored as black (0, 0, 0): the NYUv2 normal PNGs as distributed mark missing normals that way (the
GeoNet and Bae et al. loaders mask ``r == 0 & g == 0 & b == 0``), although it would decode to
(−1, −1, −1)/√3 with norm √3. Invalid pixels reach the model as (0, 0, 0).

Geometric augmentation must transform the vectors with the pixels: a horizontal flip mirrors x
(``n_x → −n_x``), which :class:`NormalsHorizontalFlip` does as part of the albumentations
Compose, so the per-sample seeded augmentation (one RNG stream per sample) decides image and normal
flips together. In-plane rotation is not offered (it would need the vectors rotated too).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from siglip_dense.data.base import DenseDataModule, list_batch, stack_batch
from siglip_dense.data.io import DataError, read_image
from siglip_dense.data.samplers import worker_seed
from siglip_dense.data.scan import resolve_root, scan_datamodule
from siglip_dense.data.skip import load_or_skip
from siglip_dense.data.toy import DEFAULT_NUM_TRAIN, DEFAULT_NUM_VAL
from siglip_dense.data.transforms import (
    DepthPhotometric,
    RandomCropCatMax,
    RandomResizeDepth,
    pad_if_needed,
    seed_transform,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MIN_NORM = 0.5  # decoded vectors shorter than this are invalid (the NYUv2 normals convention)


def invalid_normals_rgb(rgb: np.ndarray) -> np.ndarray:
    """H×W bool: stored pixels that hold no normal, i.e. black (0, 0, 0).

    The NYUv2 normal PNGs as commonly distributed (GeoNet's split, Qi et al. CVPR 2018, as used by
    Bae et al. ICCV 2021, github.com/baegwangbin/surface_normal_uncertainty ``data/dataloader_nyu.py``)
    store missing normals as black, and those loaders' valid mask drops exactly the pixels whose
    r, g and b are all 0.
    """
    return ~np.asarray(rgb).any(axis=-1)


def decode_normals(rgb: np.ndarray, min_norm: float = MIN_NORM) -> np.ndarray:
    """H×W×3 uint8 PNG values → H×W×3 float32 unit normals, (0, 0, 0) where invalid.

    Invalid: black pixels (:func:`invalid_normals_rgb`, the NYUv2 "missing" marker) and decoded
    vectors with norm < ``min_norm`` (e.g. mid-grey, the zero vector).
    """
    n = rgb.astype(np.float32) / 127.5 - 1.0
    norm = np.linalg.norm(n, axis=-1, keepdims=True)
    valid = (norm >= min_norm) & ~invalid_normals_rgb(rgb)[..., None]
    return np.where(valid, n / np.maximum(norm, 1e-6), 0.0).astype(np.float32)


def encode_normals(normals: np.ndarray) -> np.ndarray:
    """H×W×3 float normals in [-1, 1] → uint8 PNG values ``round((n + 1) · 127.5)`` (0 vector → 128)."""
    return np.clip(np.round((np.asarray(normals, np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def read_normals(path: str | Path, min_norm: float = MIN_NORM) -> np.ndarray:
    """Decode a normals PNG (RGB, 8 bit) to H×W×3 float32 unit vectors, invalid pixels (0, 0, 0).

    Raises:
        DataError: missing, unreadable or not an 8-bit RGB image (the message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"normals file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            mode, rgb = img.mode, np.asarray(img, dtype=np.uint8) if img.mode == "RGB" else None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise DataError(f"cannot decode normals {path}: {exc}") from exc
    if rgb is None:
        raise DataError(f"normals {path} is a {mode} image; expected 8-bit RGB with n = value / 127.5 - 1")
    return decode_normals(rgb, min_norm)


class NormalsHorizontalFlip(A.HorizontalFlip):
    """albumentations' horizontal flip that also mirrors normal vectors: on a 3-channel mask target
    (the normals, channels last) the x component changes sign after the pixels are flipped."""

    def apply_to_mask(self, mask: np.ndarray, *args: Any, **params: Any) -> np.ndarray:
        flipped = super().apply_to_mask(mask, *args, **params)
        if flipped.ndim == 3 and flipped.shape[-1] == 3:
            flipped = flipped.copy()
            flipped[..., 0] *= -1.0
        return flipped


def build_normals_train_transform(
    crop_size: Sequence[int],
    short_side: int | None = None,
    scale_range: Sequence[float] = (1.0, 1.0),
    flip: bool = True,
    photometric: bool = True,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    seed: int | None = None,
) -> A.Compose:
    """(Resize →) random crop → flip (mirroring n_x) → colour → normalise → pad → tensor.

    Call as ``transform(image=rgb_uint8, mask=normals_float32_HxWx3)``. Normals are resized with
    nearest neighbours (interpolating would shorten vectors and mix in invalid zeros); pads are 0
    (invalid).
    """
    ch, cw = int(crop_size[0]), int(crop_size[1])
    steps: list[Any] = []
    if short_side or tuple(scale_range) != (1.0, 1.0):
        steps.append(RandomResizeDepth(short_side=short_side, scale_range=scale_range))
    steps.append(RandomCropCatMax(ch, cw, cat_max_ratio=1.0))
    if flip:
        steps.append(NormalsHorizontalFlip(p=0.5))
    if photometric:
        steps.append(DepthPhotometric())
    steps += [
        A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0),
        pad_if_needed(ch, cw, fill_mask=0),
        ToTensorV2(),
    ]
    transform = A.Compose(steps, seed=seed)
    if seed is not None:
        seed_transform(transform, seed)
    return transform


def build_normals_eval_transform(mean: Sequence[float], std: Sequence[float]) -> A.Compose:
    """Normalise only: normals are evaluated at ground-truth resolution."""
    return A.Compose([A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0), ToTensorV2()])


class NormalsDataset(Dataset):
    """``ROOT/<split>/rgb/<stem>.png|jpg`` with ``ROOT/<split>/normals/<stem>.png``, paired by stem.

    Items: ``image`` 3×H×W float (normalised), ``normals`` 3×H×W float32 unit vectors (0 = invalid),
    ``meta`` (paths, stem, original size). With ``skip_bad`` a broken sample is skipped (data.skip) instead of the next
    good one, counted in ``num_skipped`` and warned about.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        transform: Callable[..., dict[str, Any]] | None = None,
        skip_bad: bool = False,
        min_norm: float = MIN_NORM,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.transform = (
            transform if transform is not None else build_normals_eval_transform((0.5,) * 3, (0.5,) * 3)
        )
        self.skip_bad = bool(skip_bad)
        self.min_norm = float(min_norm)
        self.num_skipped = 0
        self.split_file = self.root / split  # what error messages and the scan name
        self.samples = self._pair_files()

    def _pair_files(self) -> list[tuple[Path, Path]]:
        rgb_dir, n_dir = self.root / self.split / "rgb", self.root / self.split / "normals"
        images = (
            sorted(p for p in rgb_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if rgb_dir.is_dir()
            else []
        )
        if not images:
            raise DataError(f"no images (*.png, *.jpg) found in {rgb_dir} (normals layout: ROOT/<split>/rgb)")
        samples, missing = [], []
        for img in images:
            target = n_dir / f"{img.stem}.png"
            (samples if target.is_file() else missing).append((img, target))
        if missing:
            if not self.skip_bad:
                img, target = missing[0]
                raise DataError(
                    f"image {img} has no normals {target} ({len(missing)} of {len(images)} images in {rgb_dir} "
                    "lack one; set data.skip_bad=true to drop them)"
                )
            warnings.warn(
                f"dropped {len(missing)} images of {rgb_dir} without normals in {n_dir}", stacklevel=3
            )
        if not samples:
            raise DataError(f"no image in {rgb_dir} has normals in {n_dir}")
        return samples

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Decoded image (H×W×3 uint8) and normals (H×W×3 float32, 0 = invalid), sizes checked."""
        img_path, n_path = self.samples[index]
        image = read_image(img_path)
        normals = read_normals(n_path, self.min_norm)
        if image.shape[:2] != normals.shape[:2]:
            raise DataError(
                f"normals {n_path} are {normals.shape[1]}x{normals.shape[0]} (WxH) but the image {img_path} "
                f"is {image.shape[1]}x{image.shape[0]}"
            )
        return image, normals

    def sample_file(self, index: int) -> Path:
        """The image file of sample ``index`` (what skip totals name)."""
        return self.samples[index][0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        """The sample at ``index``; with ``skip_bad`` a bad one is a skip marker (see :mod:`~siglip_dense.data.skip`)."""
        return load_or_skip(self, index, self._make_item)

    def _make_item(self, i: int) -> dict[str, Any]:
        image, normals = self.load(i)
        out = self.transform(image=image, mask=normals)
        target = torch.as_tensor(out["mask"], dtype=torch.float32).permute(2, 0, 1)
        img_path, n_path = self.samples[i]
        meta = {
            "path": str(img_path),
            "normals_path": str(n_path),
            "stem": img_path.stem,
            "orig_size": (int(image.shape[0]), int(image.shape[1])),
        }
        return {"image": out["image"].float(), "normals": target.contiguous(), "meta": meta}


collate_normals_train = functools.partial(stack_batch, target="normals")
collate_normals_eval = functools.partial(list_batch, target="normals")


class NormalsDataModule(DenseDataModule):
    """The NYUv2 normals layout (or toy scenes written in it); crops, flips that mirror n_x, colour."""

    collate_train = staticmethod(collate_normals_train)
    collate_eval = staticmethod(collate_normals_eval)

    def __init__(
        self,
        root: str | Path | None,
        toy: bool = False,
        toy_root: str | Path | None = None,
        toy_num_train: int = DEFAULT_NUM_TRAIN,
        toy_num_val: int = DEFAULT_NUM_VAL,
        train_split: str = "train",
        val_split: str = "test",
        crop_size: Sequence[int] = (416, 544),
        short_side: int | None = None,
        scale_range: Sequence[float] = (1.0, 1.0),
        flip: bool = True,
        photometric: bool = True,
        min_norm: float = MIN_NORM,
        batch_size: int = 8,
        val_batch_size: int = 1,
        num_workers: int = 8,
        skip_bad: bool = False,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        seed: int | None = None,
        scan: bool = True,
    ) -> None:
        super().__init__()
        self.root = resolve_root(
            root, "nyu_normals", toy, toy_root, num_train=toy_num_train, num_val=toy_num_val
        )
        self.toy, self.scan = toy, bool(scan)
        self.train_split, self.val_split = train_split, val_split
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.short_side = int(short_side) if short_side else None
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.flip, self.photometric = bool(flip), bool(photometric)
        self.min_norm = float(min_norm)
        self.batch_size, self.val_batch_size = int(batch_size), int(val_batch_size)
        self.num_workers = int(num_workers)
        self.skip_bad = bool(skip_bad)
        self.mean, self.std = tuple(mean), tuple(std)
        self.seed = seed
        self.train_dataset: NormalsDataset | None = None
        self.val_dataset: NormalsDataset | None = None

    def task_kwargs(self) -> dict[str, Any]:
        """What the task must know about the data: the validity threshold of ground-truth vectors."""
        return {"min_norm": self.min_norm}

    def _dataset(self, split: str, transform: Any) -> NormalsDataset:
        return NormalsDataset(self.root, split, transform, skip_bad=self.skip_bad, min_norm=self.min_norm)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            transform = build_normals_train_transform(
                self.crop_size,
                short_side=self.short_side,
                scale_range=self.scale_range,
                flip=self.flip,
                photometric=self.photometric,
                mean=self.mean,
                std=self.std,
                seed=worker_seed(self.run_seed, 0, self._global_rank()),
            )
            self.train_dataset = self._dataset(self.train_split, transform)
        self.val_dataset = self._dataset(self.val_split, build_normals_eval_transform(self.mean, self.std))
        scan_datamodule(self, stage)


__all__ = [
    "MIN_NORM",
    "NormalsDataModule",
    "NormalsDataset",
    "NormalsHorizontalFlip",
    "build_normals_eval_transform",
    "build_normals_train_transform",
    "collate_normals_eval",
    "collate_normals_train",
    "decode_normals",
    "encode_normals",
    "invalid_normals_rgb",
    "read_normals",
]
