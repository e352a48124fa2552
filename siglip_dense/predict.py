"""Predictions with a trained model, no dataset needed: ``model.predict(...)`` and ``tools/predict.py``.

What ``predict`` accepts (:func:`to_rgb_images`), one image or a batch:

- a file path (``str`` / ``Path``): decoded like the datasets do (:func:`siglip_dense.data.io.read_image`:
  grey, RGBA and palette files become RGB, 16-bit grey is scaled to its own maximum);
- a PIL image of any mode: ``image.convert("RGB")`` (grey replicated, alpha dropped, palette expanded;
  16/32-bit grey modes ``I``, ``I;16``, ``I;16B``, ``I;16L``, ``I;16N`` are scaled to their maximum,
  as files are);
- a numpy array, always channels-last: H×W (grey), H×W×1, H×W×3 (RGB) or H×W×4 (RGBA: alpha dropped);
- a torch tensor: H×W, C×H×W (torchvision's layout, ``read_image`` / ``to_tensor``) or H×W×C, with
  C ∈ {1, 3, 4}; the layout is C×H×W when the first dimension is 1, 3 or 4 and the last is not,
  H×W×C in the opposite case; a tensor where both could be the channels is refused;
- values: ``uint8`` in 0..255, or floating point in [0, 1] (torchvision's convention); other dtypes
  and floats outside [0, 1] are refused;
- a batch: a list / tuple of the above, or a 4-D array / tensor (N×H×W×C, tensors also N×C×H×W).

One image in, one result out; a batch in, a list out. Each image is predicted on its own at its own
size, so a result never depends on the rest of the batch. Results per task
(:class:`SegmentationPrediction`, :class:`DepthPrediction`, :class:`DetectionPrediction`,
:class:`NormalsPrediction`); a
multi-task model returns ``{task name: result}`` per image.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_CHANNELS = (1, 3, 4)


# -- results ------------------------------------------------------------------------------------------
@dataclass
class SegmentationPrediction:
    """Semantic segmentation of one image.

    ``labels``: H×W int64 class indices 0..K−1 at the input's size (argmax of the logits resized to
    it); ``class_names[i]`` names index ``i``. ``np.asarray(pred)`` and ``pred.shape`` give the label
    map (what ``predict`` returned before these structures).
    """

    labels: np.ndarray
    class_names: list[str]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.labels.shape)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        return self.labels if dtype is None else self.labels.astype(dtype)


@dataclass
class DepthPrediction:
    """Metric depth of one image: ``depth`` H×W float32 metres at the input's size, clipped to the
    model's ``[min_depth, max_depth]``. ``np.asarray(pred)`` gives the depth map."""

    depth: np.ndarray
    min_depth: float
    max_depth: float

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.depth.shape)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        return self.depth if dtype is None else self.depth.astype(dtype)


@dataclass
class NormalsPrediction:
    """Surface normals of one image: ``normals`` H×W×3 float32 unit vectors at the input's size, in
    the camera frame of the training data (NYUv2: x right, y down, z away from the camera, so a
    surface facing the camera is (0, 0, −1)). ``np.asarray(pred)`` gives the normal map."""

    normals: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.normals.shape)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        return self.normals if dtype is None else self.normals.astype(dtype)


@dataclass
class DetectionPrediction:
    """Detections in one image, highest score first.

    ``boxes``: N×4 float32 ``x0, y0, x1, y1`` in the input's pixels; ``scores``: N float32;
    ``labels``: N int64 contiguous class indices 0..K−1; ``category_ids``: N int64, the dataset's
    own category ids (COCO's 1..90 with gaps: what ``coco_results.json`` uses);
    ``category_names``: N class names; ``masks``: N×H×W bool at the input's size (mask
    probability > the model's ``mask_threshold``), ``None`` for detectors without a mask head;
    ``score_threshold``: the threshold applied (detections kept have score > it).
    ``pred["boxes"]`` etc. also work (the keys ``predict`` returned before these structures).
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    category_ids: np.ndarray
    category_names: list[str]
    masks: np.ndarray | None = None
    score_threshold: float = 0.0
    _keys: ClassVar[tuple[str, ...]] = ("boxes", "scores", "labels", "masks")

    def __len__(self) -> int:
        return len(self.scores)

    def __getitem__(self, key: str) -> Any:
        if key not in self._keys or (key == "masks" and self.masks is None):
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key: object) -> bool:
        return key in self._keys and not (key == "masks" and self.masks is None)


# -- inputs ---------------------------------------------------------------------------------------------
class RGBImages(list):
    """Images already converted by :func:`to_rgb_images` (3×H×W float32 in [0, 1]): the internal form
    ``DenseModule.predict`` hands its tasks, passed through unchanged. Converting twice would read a
    3×H×3 tensor (a 3-pixel-wide image) as ambiguous and refuse it."""


def to_rgb_images(images: Any) -> tuple[RGBImages, bool]:
    """Whatever ``predict`` accepts → (3×H×W float32 CPU tensors in [0, 1], whether it was a batch).

    uint8 values become ``v / 255`` in float32 (so a float32 ``array / 255`` gives the same tensor).
    An :class:`RGBImages` (already converted) is returned as is, as a batch.

    Raises:
        ValueError / TypeError: an item that is not an image as listed in the module docstring; the
            message names the item's index, its type and shape or dtype.
    """
    if isinstance(images, RGBImages):
        return images, True
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("predict got an empty list of images")
        return RGBImages(_one_image(x, i) for i, x in enumerate(images)), True
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return RGBImages(_one_image(x, i, in_batch=True) for i, x in enumerate(images)), True
    return RGBImages([_one_image(images, 0)]), False


def _one_image(item: Any, index: int, in_batch: bool = False) -> torch.Tensor:
    where = f"image {index} ({_describe(item)})"
    if isinstance(item, (str, os.PathLike)):
        from siglip_dense.data.io import DataError, read_image

        try:
            return _from_hwc(torch.from_numpy(read_image(item)), where)
        except DataError as exc:  # missing / corrupt: the message names the file, add its index
            raise DataError(f"image {index}: {exc}") from exc
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - PIL is a dependency
        Image = None  # noqa: N806
    if Image is not None and isinstance(item, Image.Image):
        from siglip_dense.data.io import is_wide_grey, wide_grey_to_uint8

        if is_wide_grey(item.mode):  # 16/32-bit grey, any byte order: scaled as read_image does
            return _from_hwc(torch.from_numpy(wide_grey_to_uint8(item)[..., None]), where)
        return _from_hwc(torch.from_numpy(np.array(item.convert("RGB"), dtype=np.uint8)), where)
    if isinstance(item, np.ndarray):
        if item.ndim == 2:
            item = item[..., None]
        if item.ndim != 3 or item.shape[-1] not in _CHANNELS:
            hint = ""
            if item.ndim == 3 and item.shape[0] in _CHANNELS:
                hint = " (numpy images are channels-last: use array.transpose(1, 2, 0))"
            raise ValueError(f"{where}: expected H×W, H×W×1, H×W×3 or H×W×4{hint}")
        return _from_hwc(torch.from_numpy(np.array(item)), where)  # a copy: arrays may be read-only
    if isinstance(item, torch.Tensor):
        t = item.detach().cpu()
        if t.ndim == 2:
            return _from_hwc(t[..., None], where)
        if t.ndim == 3:
            first, last = t.shape[0] in _CHANNELS, t.shape[-1] in _CHANNELS
            if first and not last:
                return _from_hwc(t.permute(1, 2, 0), where)
            if last and not first:
                return _from_hwc(t, where)
            what = "both C×H×W and H×W×C" if first else "neither C×H×W nor H×W×C (C = 1, 3 or 4)"
            raise ValueError(f"{where}: the layout is {what}; pass a channels-last numpy array instead")
        raise ValueError(f"{where}: expected a 2-D or 3-D tensor (or a 4-D batch)")
    raise TypeError(
        f"{where}: not an image; predict takes file paths, PIL images, numpy arrays or torch tensors "
        "(or a list / 4-D batch of them)"
    )


def _from_hwc(t: torch.Tensor, where: str) -> torch.Tensor:
    """H×W×C (C = 1, 3, 4) uint8 / float → 3×H×W float32 in [0, 1]: grey repeated, alpha dropped."""
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{where}: empty image")
    if t.dtype == torch.uint8:
        x = t.float() / 255.0
    elif t.is_floating_point():
        x = t.float()
        lo, hi = float(x.min()), float(x.max())
        if not (lo >= 0.0 and hi <= 1.0):
            raise ValueError(
                f"{where}: float images must be in [0, 1], got values in [{lo:g}, {hi:g}] "
                "(pass uint8 for 0..255)"
            )
    else:
        raise ValueError(f"{where}: dtype {t.dtype} not supported: use uint8 (0..255) or float in [0, 1]")
    if x.shape[-1] == 1:
        x = x.expand(-1, -1, 3)
    return x[..., :3].permute(2, 0, 1).contiguous()


def _describe(item: Any) -> str:
    if isinstance(item, (np.ndarray, torch.Tensor)):
        return f"{type(item).__module__.split('.')[0]}.{type(item).__name__} shape {tuple(item.shape)} {item.dtype}"
    if isinstance(item, (str, os.PathLike)):
        return f"path {item}"
    mode = getattr(item, "mode", None)
    return f"{type(item).__name__}" + (f" mode {mode}" if mode else "")


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """3×H×W float in [0, 1] → H×W×3 uint8 (exact for images that were uint8)."""
    return (image.permute(1, 2, 0) * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()


def normalize(image: torch.Tensor, mean: Sequence[float], std: Sequence[float], device: Any) -> torch.Tensor:
    """3×H×W in [0, 1] → 1×3×H×W on ``device`` with the backbone's mean/std (SigLIP: 0.5, 0.5)."""
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return (image.to(device)[None] - m) / s


# -- files ------------------------------------------------------------------------------------------------
def is_predict_output(path: Path) -> bool:
    """Whether ``path`` is named as :func:`run_predict` names its files: ``<name><ext>.png`` or
    ``<name><ext>_vis.png`` with ``<ext>`` an image extension (``x.jpg.png``, ``x.jpg_vis.png``)."""
    name = path.name
    for tail in ("_vis.png", ".png"):
        if name.endswith(tail) and Path(name[: -len(tail)]).suffix.lower() in IMAGE_SUFFIXES:
            return True
    return False


def list_images(source: str | Path, exclude: str | Path | None = None) -> list[Path]:
    """One image file, or every image under a directory (recursive, sorted by relative path).

    Under ``exclude`` (the output folder, when it lies inside the input or is the input) only the
    files a previous prediction wrote (:func:`is_predict_output`) are left out.
    """
    source = Path(source)
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise FileNotFoundError(f"input not found: {source}")
    skip = Path(exclude).resolve() if exclude is not None else None
    files = sorted(
        (p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
        key=lambda p: p.relative_to(source).as_posix(),
    )
    if skip is not None:
        files = [p for p in files if not (p.resolve().is_relative_to(skip) and is_predict_output(p))]
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {source}")
    return files


def output_name(path: Path, source: Path) -> str:
    """The base of an input's output files: its path relative to the input folder, extension kept.

    ``x.jpg`` and ``x.png`` give ``x.jpg`` and ``x.png`` (→ ``x.jpg.png``, ``x.png.png``, ...), and
    ``a/x.jpg`` keeps its folder: file names are unique in a folder, so no output overwrites another.
    """
    if source.is_dir():
        return path.relative_to(source).as_posix()
    return path.name


def run_predict(
    ckpt_path: str | Path,
    source: str | Path,
    output: str | Path,
    device: str = "cpu",
    score_threshold: float | None = None,
) -> list[Path]:
    """Write each image's raw prediction and a visualisation into ``output``; returns the files.

    Files per input ``<name>`` (its path under the input folder, extension kept, see
    :func:`output_name`): segmentation ``<name>.png`` (label values in the dataset's convention) and
    ``<name>_vis.png``; depth ``<name>.npy`` (float32 metres) and ``<name>_vis.png``; detection
    ``<name>.json`` and ``<name>_vis.png``. Multi-task models write into ``output/<task>/``.

    A file that cannot be read (corrupt, not an image) is skipped with a warning naming it and the
    run goes on; at the end the failures are listed and a :class:`DataError` raised (the CLI exits
    with status 1 and one ``error:`` line), after every readable image has been written.
    ``output`` may be the input folder: only files named like these outputs are then left out.

    Raises:
        DataError: naming the files that could not be read (or the input, if it has no image).
    """
    from siglip_dense.checkpoints import load_model
    from siglip_dense.data.io import DataError

    source, out_dir = Path(source), Path(output)
    try:
        files = list_images(source, exclude=out_dir)
    except FileNotFoundError as exc:
        raise DataError(str(exc)) from exc
    model = load_model(ckpt_path, device=device)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    failed: list[str] = []
    for path in files:
        try:  # decoded once: the prediction and the picture see the same pixels
            rgb = to_rgb_images(path)[0][0]
        except DataError as exc:
            failed.append(str(path))
            warnings.warn(f"skipped {path}: {exc}", stacklevel=2)
            continue
        prediction = model.predict(RGBImages([rgb]), score_threshold=score_threshold)[0]
        new = model.write_outputs(to_uint8(rgb), prediction, out_dir, output_name(path, source))
        written += new
        print(f"{path} -> {', '.join(str(p.relative_to(out_dir)) for p in new)}")
    if failed:
        raise DataError(
            f"{len(failed)} of {len(files)} images could not be read (the other {len(files) - len(failed)} "
            f"were predicted into {out_dir}): {', '.join(failed)}"
        )
    return written
