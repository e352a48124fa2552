"""The data a run reads is the data the user named, and it is readable: checked before training starts.

Two checks, both raising :class:`~siglip_dense.data.io.DataError` naming the path:

- :func:`resolve_root`: ``data.root`` must exist and hold something. Toy scenes are generated only
  when asked for explicitly: ``toy=true``, or no ``root`` at all in a toy config (its ``toy_root``).
  A misspelt ``data.root=/data/ade20`` is an error naming the path and the layout expected, never a
  folder silently filled with toy data.
- :func:`scan_datamodule` (from each data module's ``setup``): every split the run will read is
  scanned before the first training step. Training splits: each file exists and its image header
  decodes, label/depth maps match their image's size (headers only: seconds for ADE20K, tens of
  seconds for COCO train on a few threads). The validation split, read only after a whole training
  interval, is fully decoded (the dataset's own ``load``: label range for segmentation, depth
  validity), so a corrupt validation image stops the run in seconds instead of after an epoch.
  Datasets with ``skip_bad=true`` get a warning with the count instead of an error; the bad
  files of a fully decoded (evaluation) split are also left out of its index, so they are never
  scored (:mod:`siglip_dense.data.skip`). Checks run on threads and never touch the process-wide
  warning filters (``warnings.catch_warnings`` is not thread-safe).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from siglip_dense.data.io import DataError, read_image
from siglip_dense.data.skip import drop_samples

# what each layout looks like on disk (error messages show it)
LAYOUTS: dict[str, str] = {
    "ade20k": "ROOT/images/{training,validation}/*.jpg with label maps ROOT/annotations/{training,validation}/*.png",
    "seg_folder": "ROOT/images/<split>/*.jpg|png, label maps ROOT/annotations/<split>/<stem>.png and "
    "ROOT/classes.txt (one class name per line)",
    "coco": "ROOT/{train2017,val2017}/*.jpg with ROOT/annotations/instances_{train2017,val2017}.json",
    "nyu": "ROOT/splits/{train,val}.txt with 'rgb_relpath depth_relpath [focal]' lines (paths relative to ROOT)",
    "depth_folder": "ROOT/images/<split>/*.jpg|png with depth maps ROOT/depth/<split>/<stem>.png (16-bit) or .npy",
    "nyu_normals": "ROOT/{train,test}/rgb/<stem>.png with normals ROOT/{train,test}/normals/<stem>.png (RGB, n = v/127.5 - 1)",
    "voc": "ROOT/JPEGImages/<id>.jpg, ROOT/SegmentationClassAug/<id>.png, ROOT/ImageSets/Segmentation/{train_aug,val}.txt",
}
# the toy generator's layout for each dataset layout
TOY_LAYOUT: dict[str, str] = {
    "ade20k": "ade20k",
    "seg_folder": "ade20k",
    "coco": "coco",
    "nyu": "nyu",
    "depth_folder": "nyu",
    "nyu_normals": "nyu_normals",
    "voc": "voc",
}


def require_root(root: str | Path, layout: str) -> Path:
    """``root`` as a Path; an error naming it and the expected layout if it is missing or empty."""
    root = Path(root)
    expected = f"expected the {layout} layout: {LAYOUTS[layout]}"
    if not root.exists():
        raise DataError(f"data.root {root} does not exist; {expected}")
    if not root.is_dir():
        raise DataError(f"data.root {root} is a file, not a dataset directory; {expected}")
    if not any(root.iterdir()):
        raise DataError(f"data.root {root} is empty; {expected}")
    return root


def resolve_root(
    root: str | Path | None,
    layout: str,
    toy: bool = False,
    toy_root: str | Path | None = None,
    **toy_kwargs: Any,
) -> Path:
    """The dataset directory a data module reads; toy scenes only where explicitly asked for.

    ``root=None`` with a ``toy_root`` (the toy configs): toy scenes generated there on first use.
    ``toy=True``: toy scenes generated at ``root`` unless a dataset in the layout is already there.
    Otherwise ``root`` must exist and be non-empty.

    Raises:
        DataError: naming the path and the layout expected.
    """
    from siglip_dense.data.toy import ensure_toy_data_unless_present

    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {sorted(LAYOUTS)}")
    if root is None:
        if toy_root is None:
            raise DataError(
                f"data.root is not set; point it at a dataset in the {layout} layout: {LAYOUTS[layout]}"
            )
        root, toy = toy_root, True
    if toy:
        return ensure_toy_data_unless_present(Path(root), layout=TOY_LAYOUT[layout], **toy_kwargs)
    return require_root(root, layout)


# ---------------------------------------------------------------------------------------------
# scanning the files of a split
# ---------------------------------------------------------------------------------------------
def header_size(path: Path) -> tuple[int, int]:
    """(height, width) from an image header (no pixel decoding) or a ``.npy`` header."""
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    try:
        if path.suffix.lower() == ".npy":
            shape = np.load(path, mmap_mode="r").shape
            return int(shape[0]), int(shape[1])
        with Image.open(path) as img:
            return int(img.height), int(img.width)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, IndexError) as exc:
        raise DataError(f"cannot read the header of {path}: {exc} (corrupt or not an image?)") from exc


def check_pair(image: Path, label: Path | None, size: tuple[int, int] | None = None) -> None:
    """Both headers decode and agree in size (with each other, and with ``size`` = (h, w) if given)."""
    hw = header_size(image)
    if size is not None and None not in size and hw != tuple(size):
        raise DataError(f"{image} is {hw[0]}×{hw[1]} (H×W) but its annotation records {size[0]}×{size[1]}")
    if label is not None:
        lhw = header_size(label)
        if lhw != hw:
            raise DataError(f"{label} is {lhw[1]}x{lhw[0]} (WxH) but its image {image} is {hw[1]}x{hw[0]}")


def header_checks(dataset: Any) -> list[Callable[[], None]]:
    """One cheap check per sample of a dataset we know (segmentation, depth, COCO)."""
    samples = getattr(dataset, "samples", None)
    if samples is not None:
        if samples and isinstance(samples[0], tuple):  # SegFolderDataset: (image, annotation)
            return [lambda s=s: check_pair(Path(s[0]), Path(s[1])) for s in samples]
        return [lambda s=s: check_pair(Path(s.image), Path(s.depth)) for s in samples]  # DepthSample
    if hasattr(dataset, "image_ids") and hasattr(dataset, "coco"):
        out = []
        for image_id in dataset.image_ids:
            info = dataset.coco.imgs[image_id]
            size = (info.get("height"), info.get("width"))
            out.append(lambda p=dataset.image_path(image_id), s=size: check_pair(p, None, s))
        return out
    raise TypeError(f"no scan for {type(dataset).__name__}: it has neither samples nor COCO image ids")


def decode_checks(dataset: Any) -> list[Callable[[], None]]:
    """One full decode per sample: the dataset's own ``load`` (COCO: the image, not its masks)."""
    if hasattr(dataset, "image_ids") and hasattr(dataset, "coco"):
        out = []
        for image_id in dataset.image_ids:
            info = dataset.coco.imgs[image_id]
            size = (info.get("height"), info.get("width"))
            out.append(lambda p=dataset.image_path(image_id), s=size: _decode_sized(p, s))
        return out
    return [lambda i=i: dataset.load(i) for i in range(len(dataset))]


def _decode_sized(path: Path, size: tuple[int | None, int | None]) -> None:
    h, w = read_image(path).shape[:2]
    if None not in size and (h, w) != tuple(size):
        raise DataError(f"{path} is {h}×{w} (H×W) but its annotation records {size[0]}×{size[1]}")


def run_checks(checks: Iterable[Callable[[], None]], workers: int) -> list[tuple[int, DataError]]:
    """Run checks on a few threads (PIL decodes without the GIL); (sample index, error) in sample order.

    The global warning filters are never touched from the pool threads (not thread-safe)."""

    def one(item: tuple[int, Callable[[], None]]) -> tuple[int, DataError] | None:
        try:
            item[1]()
        except DataError as exc:
            return item[0], exc
        return None

    # Warnings a check raises are not silenced here: ``warnings.catch_warnings`` swaps the process-wide
    # filter list and is not thread-safe (it can leave an "ignore" filter installed for good). The
    # checks load without warning (label/depth problems raise DataError); Python's default filter
    # shows a repeated warning once per call site anyway.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return [r for r in pool.map(one, enumerate(checks)) if r is not None]


def scan_dataset(
    dataset: Any, split: str, decode: bool, workers: int = 4, when: str = "before training"
) -> int:
    """Check every sample of ``dataset`` (``decode``: fully, else headers); returns the bad count.

    With ``skip_bad``: a warning with the count and the files. A fully decoded (evaluation) split
    also drops its bad samples from the index (:func:`~siglip_dense.data.skip.drop_samples`,
    ``dataset.dropped_files``): a metric over the remaining images, never a substitute scored twice.
    Training splits keep them (a seeded substitute replaces each when it is drawn).

    Raises:
        DataError: the first bad sample's message (with the count), unless ``dataset.skip_bad``.
    """
    if len(dataset) == 0:
        raise DataError(f"the {split} split has no samples")
    checks = decode_checks(dataset) if decode else header_checks(dataset)
    errors = run_checks(checks, workers)
    if not errors:
        return 0
    what = f"{len(errors)} of {len(checks)} {split} samples are {_kind(errors)}"
    if not getattr(dataset, "skip_bad", False):
        raise DataError(f"{errors[0][1]} ({what}; checked {when}; set data.skip_bad=true to skip them)")
    if decode and hasattr(dataset, "sample_file"):
        files = drop_samples(dataset, [i for i, _ in errors])
        shown = ", ".join(files[:10]) + (f", ... (+{len(files) - 10})" if len(files) > 10 else "")
        warnings.warn(
            f"{what} and are left out of evaluation (skip_bad=true; files: {shown}); e.g. {errors[0][1]}",
            stacklevel=2,
        )
    else:
        warnings.warn(f"{what} and will be skipped (skip_bad=true), e.g. {errors[0][1]}", stacklevel=2)
    return len(errors)


def _kind(errors: list[tuple[int, DataError]]) -> str:
    """'unreadable', or 'mismatched in size' when every error is an image/annotation size mismatch."""
    if all(_is_size_mismatch(e) for _, e in errors):
        return (
            "mismatched in size with their annotation (an image saved with an EXIF orientation? "
            "images are read without applying it)"
        )
    return "unreadable"


def _is_size_mismatch(error: DataError) -> bool:
    text = str(error)
    return " but its image " in text or " but the image " in text or "but its annotation records" in text


def scan_datamodule(dm: Any, stage: str | None) -> None:
    """Scan the splits ``stage`` reads, once per data module (``setup`` runs again for validate).

    ``fit``: training split headers and the validation split fully; ``validate``/``test``: the
    validation split fully. Skipped when ``dm.scan`` is false. An empty COCO validation annotation
    list is an error when fitting (every metric would be null) and a warning otherwise.
    """
    if not getattr(dm, "scan", True):
        return
    done: set[str] = dm.__dict__.setdefault("_scanned_splits", set())
    workers = max(1, min(8, int(getattr(dm, "num_workers", 1) or 1)))
    splits = [("train", dm.train_dataset, False)] if stage in (None, "fit") else []
    splits.append(("validation", dm.val_dataset, True))
    for name, dataset, decode in splits:
        if dataset is None or name in done:
            continue
        label = f"{name} ({_describe(dataset)})"
        when = "before training" if stage in (None, "fit") else "before evaluation"
        scan_dataset(dataset, label, decode=decode, workers=workers, when=when)
        if name == "validation":
            _check_coco_annotations(dataset, label, fitting=stage in (None, "fit"))
        done.add(name)


def _describe(dataset: Any) -> str:
    for attr in ("split_file", "ann_file"):
        if hasattr(dataset, attr):
            return str(getattr(dataset, attr))
    root, split = getattr(dataset, "root", None), getattr(dataset, "split", None)
    return f"{root}/images/{split}" if root is not None else type(dataset).__name__


def _check_coco_annotations(dataset: Any, split: str, fitting: bool) -> None:
    coco = getattr(dataset, "coco", None)
    if coco is None or len(coco.anns):
        return
    message = f"the {split} split has no annotations: every detection metric would be null"
    if fitting:
        raise DataError(message + "; point data.val_ann at an annotated validation set")
    warnings.warn(message, stacklevel=3)
