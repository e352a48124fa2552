"""Image, label-map and depth-map I/O (and image/annotation pairing checks) that fail loudly, naming the
file, instead of training on garbage."""

from __future__ import annotations

import warnings
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
            if is_wide_grey(img.mode):
                return np.ascontiguousarray(np.repeat(wide_grey_to_uint8(img)[..., None], 3, axis=2))
            rgb = img.convert("RGB") if img.mode != "RGB" else img
            return np.array(rgb, dtype=np.uint8)  # a writable copy
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise DataError(f"cannot decode image {path}: {exc} (corrupt or truncated file?)") from exc


def is_wide_grey(mode: str) -> bool:
    """PIL's 16/32-bit integer grey modes: ``I``, ``I;16`` and its byte orders ``I;16B/L/N``
    (a big-endian 16-bit TIFF opens as ``I;16B``; ``convert("RGB")`` would clip it to 255)."""
    return mode == "I" or mode.startswith("I;16")


def wide_grey_to_uint8(img: Image.Image) -> np.ndarray:
    """An ``I``/``I;16*`` image → H×W uint8 scaled to its own maximum (``round(v / max · 255)``).

    ``np.asarray`` reads PIL's array interface, which carries the byte order (``>u2`` for
    ``I;16B``), so every byte order gives the same values."""
    arr = np.asarray(img).astype(np.float64)
    return (arr / max(float(arr.max()), 1.0) * 255.0).round().astype(np.uint8)


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
            if is_wide_grey(mode):
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


def read_depth(path: str | Path, depth_scale: float = 1000.0) -> np.ndarray:
    """Decode a depth map to H×W float32 metres: 16-bit PNG ÷ ``depth_scale``, or ``.npy`` (metres).

    An 8-bit or colour PNG is refused (a visualisation, not a measurement), as is a non-float or
    non-2-D ``.npy``; the error names the file. Invalid values are kept here (see
    :func:`siglip_dense.data.depth_folder.sanitize_depth`).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"depth file not found: {path}")
    if path.suffix.lower() == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read depth {path}: {exc}") from exc
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.floating):
            raise DataError(
                f"depth {path} has dtype {arr.dtype} and shape {arr.shape}: a .npy depth map must be a "
                "2-D float array in metres"
            )
        return arr.astype(np.float32)
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            arr = np.asarray(img)
    except (OSError, UnidentifiedImageError, SyntaxError) as exc:
        raise DataError(f"cannot decode depth {path}: {exc} (corrupt or truncated file?)") from exc
    if mode == "F":  # 32-bit float TIFF/PNG-like: already metres
        return arr.astype(np.float32)
    if not is_wide_grey(mode) or arr.ndim != 2:
        raise DataError(
            f"depth {path} is a PIL mode {mode!r} image of dtype {arr.dtype} and shape {arr.shape}: "
            f"expected a single-channel 16-bit PNG in millimetres (depth_scale={depth_scale:g}) or a "
            ".npy in metres"
        )
    return (arr.astype(np.float64) / float(depth_scale)).astype(np.float32)


def orphan_annotations(ann_dir: Path, image_stems: set[str], suffixes: tuple[str, ...]) -> list[Path]:
    """Annotation files in ``ann_dir`` whose image is missing (a split that would silently shrink)."""
    if not ann_dir.is_dir():
        return []
    return sorted(p for p in ann_dir.iterdir() if p.suffix.lower() in suffixes and p.stem not in image_stems)


def report_orphans(orphans: list[Path], kind: str, img_dir: Path, skip_bad: bool) -> int:
    """An annotation without its image is an error naming it, or (``skip_bad``) a counted warning.

    Returns:
        the number of orphans skipped.

    Raises:
        DataError: naming the first orphan and the count, unless ``skip_bad``.
    """
    if not orphans:
        return 0
    if not skip_bad:
        raise DataError(
            f"{kind} {orphans[0]} has no image {img_dir / orphans[0].stem}.* ({len(orphans)} {kind}s in "
            f"{orphans[0].parent} lack one; set data.skip_bad=true to skip them)"
        )
    warnings.warn(
        f"skipped {len(orphans)} {kind}s in {orphans[0].parent} without an image in {img_dir} "
        f"(e.g. {orphans[0].name})",
        stacklevel=4,
    )
    return len(orphans)
