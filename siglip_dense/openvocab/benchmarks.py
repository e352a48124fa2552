"""The open-vocabulary benchmarks as CAT-Seg / detectron2 prepare them: class names and the eval reader.

Class names are the benchmarks' own lists, copied verbatim from CAT-Seg's ``datasets/*.json`` (source
commit and blob hashes in ``classnames/README.md``). The reader follows detectron2's ``load_sem_seg``:
images and ground-truth maps in two folders, paired by file stem; the labels may be 16-bit TIFF
(ADE20K-847, Pascal Context-459), with the benchmark's own ignore value (65535, 459 or 255).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from siglip_dense.data.io import DataError, read_image

CLASSNAMES_DIR = Path(__file__).parent / "classnames"

# benchmark -> (CAT-Seg file, extra names appended): VOC-21 is VOC-20 + "background", as CAT-Seg's
# register_pascal_20.py registers voc_2012_test_background_sem_seg (label 20 = background)
BENCHMARK_FILES: dict[str, tuple[str, tuple[str, ...]]] = {
    "cocostuff171": ("coco.json", ()),
    "ade150": ("ade150.json", ()),
    "ade847": ("ade847.json", ()),
    "pc59": ("pc59.json", ()),
    "pc459": ("pc459.json", ()),
    "voc20": ("voc20.json", ()),
    "voc21": ("voc20.json", ("background",)),
}


def benchmark_classes(name: str) -> list[str]:
    """The benchmark's class names in label order (index i = label value i).

    Raises ValueError for an unknown benchmark name (listing the known ones).
    """
    if name not in BENCHMARK_FILES:
        raise ValueError(f"unknown benchmark {name!r}; known: {sorted(BENCHMARK_FILES)}")
    file, extra = BENCHMARK_FILES[name]
    return [*json.loads((CLASSNAMES_DIR / file).read_text()), *extra]


def _class_names(classes: str | Sequence[str]) -> list[str]:
    """A benchmark name (``ade847``) or an explicit list."""
    if isinstance(classes, str):
        return benchmark_classes(classes)
    names = [str(c) for c in classes]
    if not names:
        raise ValueError("classes: empty list")
    return names


def read_sem_seg_label(path: str | Path) -> np.ndarray:
    """A ground-truth map as H×W int64: 8-bit PNG or 16-bit TIFF/PNG (PIL mode L, P, I;16 or I),
    values kept as stored (detectron2 reads them the same way). DataError names the file otherwise."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in ("L", "P", "I;16", "I;16B", "I;16L", "I"):
                raise DataError(f"label map {path} has mode {img.mode}: expected one channel (L, P, I;16)")
            return np.asarray(img).astype(np.int64)
    except (OSError, UnidentifiedImageError, SyntaxError) as exc:
        raise DataError(f"cannot decode label map {path}: {exc}") from exc


class SemSegBenchmarkDataset:
    """detectron2 ``load_sem_seg`` pairs: ``image_dir/<stem>.<image_ext>`` with ``gt_dir/<stem>.<gt_ext>``.

    Images without a map are dropped with a warning (VOC's prepare script writes no map for an
    all-ignored image; Pascal's JPEGImages/ holds train and val images), as detectron2 does. A sample is
    ``{"image": 3×H×W float (normalised), "mask": H×W int64, "path": str}``; mask values outside
    0..num_classes-1 other than ``ignore_index`` raise a DataError naming the file.
    """

    def __init__(
        self,
        image_dir: Path,
        gt_dir: Path,
        num_classes: int,
        ignore_index: int,
        image_ext: str = "jpg",
        gt_ext: str = "png",
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
    ) -> None:
        self.num_classes, self.ignore_index = int(num_classes), int(ignore_index)
        self.mean, self.std = tuple(mean), tuple(std)
        self.samples = self._pair(Path(image_dir), Path(gt_dir), image_ext, gt_ext)

    @staticmethod
    def _pair(image_dir: Path, gt_dir: Path, image_ext: str, gt_ext: str) -> list[tuple[Path, Path]]:
        gts = sorted(gt_dir.glob(f"*.{gt_ext}")) if gt_dir.is_dir() else []
        if not gts:
            raise DataError(f"no ground-truth maps (*.{gt_ext}) found in {gt_dir}")
        pairs = [(image_dir / f"{gt.stem}.{image_ext}", gt) for gt in gts]
        missing = [img for img, _ in pairs if not img.is_file()]
        if missing:
            raise DataError(
                f"{len(missing)} of {len(gts)} maps in {gt_dir} have no image in {image_dir} "
                f"(e.g. {missing[0].name})"
            )
        n_images = sum(1 for _ in image_dir.glob(f"*.{image_ext}"))
        if n_images > len(pairs):
            warnings.warn(
                f"{n_images - len(pairs)} of {n_images} images in {image_dir} have no map in {gt_dir}: "
                "evaluated without them (as detectron2's load_sem_seg does)",
                stacklevel=3,
            )
        return pairs

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        img_path, gt_path = self.samples[index]
        image = read_image(img_path)
        mask = read_sem_seg_label(gt_path)
        if mask.shape != image.shape[:2]:
            raise DataError(f"label map {gt_path} is {mask.shape}, its image {img_path} {image.shape[:2]}")
        bad = (mask != self.ignore_index) & ((mask < 0) | (mask >= self.num_classes))
        if bad.any():
            raise DataError(
                f"label map {gt_path}: values {np.unique(mask[bad])[:8].tolist()} are outside "
                f"0..{self.num_classes - 1} and not the ignore value {self.ignore_index}"
            )
        x = torch.from_numpy(image).permute(2, 0, 1).float() / 255.0
        x = (x - torch.tensor(self.mean)[:, None, None]) / torch.tensor(self.std)[:, None, None]
        return {"image": x, "mask": torch.from_numpy(mask), "path": str(img_path)}


class SemSegBenchmarkData:
    """Validation-only data for ``tools/eval.py zero_shot=true``: a prepared benchmark folder.

    ``root`` is the benchmark's folder (e.g. ``$DETECTRON2_DATASETS/ADE20K_2021_17_01``); ``image_dir``
    and ``gt_dir`` are relative to it. ``classes`` is a benchmark name (:data:`BENCHMARK_FILES`) or a
    list. ``ignore_index`` is the benchmark's ignore value (CAT-Seg's register files: 65535 for
    ADE-847's uint16 maps, 459 for PC-459, 255 otherwise). ``metric_protocol`` is the mIoU rule:
    ``detectron2`` (classes with ground-truth pixels, detectron2's ``SemSegEvaluator``), as CAT-Seg and
    the SigLIP 2 paper score these benchmarks; see :mod:`siglip_dense.evaluation.seg_metrics`.
    """

    def __init__(
        self,
        root: str | Path,
        classes: str | Sequence[str],
        image_dir: str,
        gt_dir: str,
        ignore_index: int = 255,
        image_ext: str = "jpg",
        gt_ext: str = "png",
        num_workers: int | None = None,
        val_batch_size: int | None = None,
        skip_bad: bool | None = None,
        datamodules: Any = None,
        metric_protocol: str = "detectron2",
    ) -> None:
        # num_workers .. datamodules: the keys configs/eval.yaml sets for every data config; evaluation
        # here reads one image at a time in-process, so they have no effect
        self.root = Path(root)
        self.class_names = _class_names(classes)
        self.image_dir, self.gt_dir = self.root / image_dir, self.root / gt_dir
        self.ignore_index = int(ignore_index)
        self.metric_protocol = str(metric_protocol)  # checked by the metric
        self.image_ext, self.gt_ext = image_ext.lstrip("."), gt_ext.lstrip(".")
        self.mean: tuple[float, ...] = (0.5, 0.5, 0.5)
        self.std: tuple[float, ...] = (0.5, 0.5, 0.5)
        self.val_dataset: SemSegBenchmarkDataset | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def setup(self, stage: str | None = None) -> None:
        """Pairs the files (any stage: the benchmarks have a validation split only)."""
        self.val_dataset = SemSegBenchmarkDataset(
            self.image_dir,
            self.gt_dir,
            self.num_classes,
            self.ignore_index,
            self.image_ext,
            self.gt_ext,
            self.mean,
            self.std,
        )
