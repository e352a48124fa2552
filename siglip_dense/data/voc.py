"""PASCAL VOC 2012 semantic segmentation, augmented set (SBD labels, "SegmentationClassAug").

Layout (as MMSeg and DeepLab prepare it)::

    ROOT/JPEGImages/<id>.jpg
    ROOT/SegmentationClassAug/<id>.png     label ids as stored: 0 = background, 1..20 classes, 255 ignore
    ROOT/ImageSets/Segmentation/train_aug.txt, val.txt   one <id> a line

A list line may also be DeepLab's two-column form, ``/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png``
(image and label paths relative to ROOT, as DeepLab's ``train_aug.txt`` and other SBD lists write them).

21 classes (background is a class, unlike ADE20K's "other"), so labels are used as stored
(no ``reduce_zero_label``); 255 (object borders, difficult regions) is ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from siglip_dense.data.io import DataError
from siglip_dense.data.scan import resolve_root
from siglip_dense.data.seg_folder import SegFolderDataset
from siglip_dense.data.segmentation import SegDataModule
from siglip_dense.data.toy import DEFAULT_NUM_TRAIN, DEFAULT_NUM_VAL

# Label value = index in this tuple (VOC devkit order).
VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip
assert len(VOC_CLASSES) == 21


class VOCSegDataset(SegFolderDataset):
    """Image ids from ``ROOT/ImageSets/Segmentation/<split>.txt`` (or ``split`` = a .txt path), images
    ``ROOT/<image_dir>/<id>.jpg``, labels ``ROOT/<label_dir>/<id>.png``; labels as stored (0..20, 255)."""

    def __init__(
        self,
        root: str | Path,
        split: str,
        transform: Callable[..., dict[str, Any]] | None = None,
        num_classes: int | None = len(VOC_CLASSES),
        skip_bad: bool = False,
        image_dir: str = "JPEGImages",
        label_dir: str = "SegmentationClassAug",
    ) -> None:
        self.image_dir, self.label_dir = image_dir, label_dir
        candidate = Path(split)
        root = Path(root)
        self.split_file = (
            candidate
            if candidate.suffix == ".txt" and candidate.is_file()
            else root / "ImageSets" / "Segmentation" / f"{split}.txt"
        )
        super().__init__(
            root, split, transform, reduce_zero_label=False, num_classes=num_classes, skip_bad=skip_bad
        )

    def _pair_files(self) -> list[tuple[Path, Path]]:
        if not self.split_file.is_file():
            raise DataError(
                f"split file not found: {self.split_file} (VOC layout: ROOT/ImageSets/Segmentation/"
                f"{self.split}.txt with one image id a line)"
            )
        pairs = [
            self._parse_line(line, number)
            for number, line in enumerate(self.split_file.read_text().splitlines(), start=1)
            if line.strip()
        ]
        ids = [img.stem for img, _ in pairs]
        if not ids:
            raise DataError(f"{self.split_file} lists no image id")
        samples, missing = [], []
        for img, ann in pairs:
            (samples if img.is_file() and ann.is_file() else missing).append((img, ann))
        if missing:
            img, ann = missing[0]
            what = f"{img}" if not img.is_file() else f"{ann}"
            message = f"{self.split_file}: {what} not found ({len(missing)} of {len(ids)} ids lack a file)"
            if not self.skip_bad:
                raise DataError(message + "; set data.skip_bad=true to drop them")
            import warnings

            warnings.warn(f"dropped ids: {message}", stacklevel=3)
        if not samples:
            raise DataError(f"no id of {self.split_file} has both an image and a label")
        self.num_orphans = 0
        return samples

    def _parse_line(self, line: str, number: int) -> tuple[Path, Path]:
        """One list line → (image, label) path: ``<id>`` (MMSeg / devkit) or DeepLab's
        ``/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png`` (paths relative to ROOT).

        Raises:
            DataError: any other form, naming the list file and the line number.
        """
        fields = line.split()
        if len(fields) == 1 and Path(fields[0]).suffix.lower() not in (".jpg", ".jpeg", ".png"):
            image_id = fields[0]
            return (
                self.root / self.image_dir / f"{image_id}.jpg",
                self.root / self.label_dir / f"{image_id}.png",
            )
        if len(fields) == 2:
            return self.root / fields[0].lstrip("/"), self.root / fields[1].lstrip("/")
        raise DataError(
            f"{self.split_file}, line {number}: {line.strip()!r} is neither an image id ('2007_000032') nor "
            "DeepLab's 'image label' pair ('/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png')"
        )


class VOCDataModule(SegDataModule):
    """PASCAL VOC 2012 aug; the 21 VOC class names unless ``classes`` says otherwise.

    Augmentation and evaluation are the segmentation data module's (mmseg's VOC recipe uses the same
    resize ×[0.5, 2.0], crop, flip, photometric pipeline with ``img_scale=(2048, 512)``).
    """

    def __init__(
        self,
        root: str | Path | None,
        toy: bool = False,
        toy_root: str | Path | None = None,
        toy_num_train: int = DEFAULT_NUM_TRAIN,
        toy_num_val: int = DEFAULT_NUM_VAL,
        train_split: str = "train_aug",
        val_split: str = "val",
        image_dir: str = "JPEGImages",
        label_dir: str = "SegmentationClassAug",
        crop_size: Sequence[int] = (512, 512),
        scale_range: Sequence[float] = (0.5, 2.0),
        base_size: Sequence[int] = (2048, 512),
        cat_max_ratio: float = 0.75,
        classes: Sequence[str] | None = None,
        batch_size: int = 16,
        val_batch_size: int = 1,
        num_workers: int = 8,
        skip_bad: bool = False,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        seed: int | None = None,
        scan: bool = True,
        metric_protocol: str = "mmseg",
    ) -> None:
        root_path = resolve_root(root, "voc", toy, toy_root, num_train=toy_num_train, num_val=toy_num_val)
        super().__init__(
            root_path,
            dataset="folder",
            toy=False,
            train_split=train_split,
            val_split=val_split,
            crop_size=crop_size,
            scale_range=scale_range,
            base_size=base_size,
            cat_max_ratio=cat_max_ratio,
            reduce_zero_label=False,
            classes=list(classes) if classes else list(VOC_CLASSES),
            batch_size=batch_size,
            val_batch_size=val_batch_size,
            num_workers=num_workers,
            skip_bad=skip_bad,
            mean=mean,
            std=std,
            seed=seed,
            scan=scan,
            metric_protocol=metric_protocol,
        )
        self.toy = toy
        self.image_dir, self.label_dir = image_dir, label_dir

    def _dataset(self, split: str, transform: Any) -> VOCSegDataset:  # type: ignore[override]
        return VOCSegDataset(
            self.root,
            split,
            transform=transform,
            num_classes=self.num_classes,
            skip_bad=self.skip_bad,
            image_dir=self.image_dir,
            label_dir=self.label_dir,
        )


__all__ = ["VOCDataModule", "VOCSegDataset", "VOC_CLASSES"]
