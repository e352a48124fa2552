"""Image and label-map I/O that fails loudly, naming the file, instead of training on garbage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError


class DataError(ValueError):
    """A dataset problem the user must fix (missing, corrupt or inconsistent files)."""


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image to H×W×3 uint8 RGB.

    PIL decodes lazily, so ``load()`` is forced here: a truncated JPEG must raise now, naming the file,
    not later inside a transform. ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left False on purpose.
    EXIF orientation is not applied: label maps are aligned with the stored pixel grid.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode == "I;16" or img.mode == "I":
                arr = np.asarray(img).astype(np.float64)
                arr = (arr / max(float(arr.max()), 1.0) * 255.0).round().astype(np.uint8)
                return np.ascontiguousarray(np.repeat(arr[..., None], 3, axis=2))
            rgb = img.convert("RGB") if img.mode != "RGB" else img
            return np.array(rgb, dtype=np.uint8)  # a writable copy
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise DataError(f"cannot decode image {path}: {exc} (corrupt or truncated file?)") from exc


def read_label(path: str | Path) -> np.ndarray:
    """Decode a label map to H×W uint8 class ids (PNG mode L or P; P's indices are the ids)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"annotation file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode in ("L", "P"):
                return np.array(img, dtype=np.uint8)
            if mode == "1":
                return np.array(img, dtype=np.uint8)
            if mode in ("I", "I;16", "I;16B", "I;16L"):
                arr = np.asarray(img)
                if arr.size and (arr.max() > 255 or arr.min() < 0):
                    raise DataError(
                        f"annotation {path} has values up to {int(arr.max())}; "
                        "segmentation label maps here hold uint8 class ids (0..255)"
                    )
                return arr.astype(np.uint8)
    except (OSError, UnidentifiedImageError, SyntaxError) as exc:
        raise DataError(f"cannot decode annotation {path}: {exc} (corrupt or truncated file?)") from exc
    raise DataError(
        f"annotation {path} has PIL mode {mode!r}: label maps must be single-channel class ids "
        "(8-bit grayscale 'L' or palette 'P' PNG), not colour-coded RGB images; convert the colours "
        "to class indices first"
    )


def write_label(path: str | Path, array: np.ndarray) -> None:
    """Write an H×W uint8 label map as a grayscale PNG (lossless, the ADE20K convention)."""
    arr = np.asarray(array)
    if arr.ndim != 2:
        raise ValueError(f"label map must be H×W, got shape {arr.shape} for {path}")
    if arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ValueError(f"label values {arr.min()}..{arr.max()} do not fit uint8 for {path}")
        arr = arr.astype(np.uint8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)  # 2-D uint8 -> mode "L"
