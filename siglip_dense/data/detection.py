"""LightningDataModule for object detection / instance segmentation: COCO-format data (the real COCO, your
own json, or toy scenes) for torchvision detectors."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from siglip_dense.data.base import DenseDataModule, list_batch
from siglip_dense.data.coco import CategoryMap, CocoDetection, load_coco_json
from siglip_dense.data.io import DataError
from siglip_dense.data.samplers import worker_seed
from siglip_dense.data.scan import resolve_root, scan_datamodule
from siglip_dense.data.transforms import build_det_eval_transform, build_det_train_transform

# lists, not stacks: torchvision detectors take images of any sizes and per-image targets
collate_det = functools.partial(list_batch, target="target")


class DetDataModule(DenseDataModule):
    """COCO layout ``ROOT/{train2017,val2017}`` + ``ROOT/annotations/instances_<split>.json``.

    The category mapping is read from the training json at construction (the task is sized from it),
    and during ``fit`` the validation json must use the same categories. Evaluating a checkpoint
    (``validate``) binds against :attr:`eval_category_map`, the categories of the json actually
    evaluated (``val_ann``). ``mean``/``std`` are set by train.py to the backbone's before ``fit``.
    """

    collate_train = staticmethod(collate_det)
    collate_eval = staticmethod(collate_det)

    def __init__(
        self,
        root: str | Path | None,
        toy: bool = False,
        toy_root: str | Path | None = None,
        train_split: str = "train2017",
        val_split: str = "val2017",
        train_ann: str | None = None,
        val_ann: str | None = None,
        image_size: Sequence[int] | int = 1024,
        scale_range: Sequence[float] = (0.1, 2.0),
        min_area: float = 1.0,
        hflip: float = 0.5,
        with_masks: bool = True,
        filter_empty: bool = True,
        batch_size: int = 16,
        val_batch_size: int = 1,
        num_workers: int = 8,
        skip_bad: bool = False,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        seed: int | None = None,
        scan: bool = True,
    ) -> None:
        super().__init__()
        self.root = resolve_root(root, "coco", toy, toy_root)
        self.scan = bool(scan)
        self.toy = toy
        self.train_split, self.val_split = train_split, val_split
        self.train_ann = (
            Path(train_ann) if train_ann else self.root / "annotations" / f"instances_{train_split}.json"
        )
        self.val_ann = Path(val_ann) if val_ann else self.root / "annotations" / f"instances_{val_split}.json"
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.min_area = float(min_area)
        self.hflip = float(hflip)
        self.with_masks = bool(with_masks)
        self.filter_empty = bool(filter_empty)
        self.batch_size, self.val_batch_size = int(batch_size), int(val_batch_size)
        self.num_workers = int(num_workers)
        self.skip_bad = bool(skip_bad)
        self.mean, self.std = tuple(mean), tuple(std)
        self.seed = seed
        ann = self.train_ann if self.train_ann.is_file() else self.val_ann
        self.category_map = CategoryMap.from_coco(load_coco_json(ann))
        self._eval_category_map: CategoryMap | None = None
        self.train_dataset: CocoDetection | None = None
        self.val_dataset: CocoDetection | None = None

    @property
    def class_names(self) -> list[str]:
        return list(self.category_map.names)

    @property
    def num_classes(self) -> int:
        return len(self.category_map)

    @property
    def eval_category_map(self) -> CategoryMap:
        """Categories (ids and names) of ``val_ann``, the json that validation scores against.

        Not the training json's: a checkpoint evaluated on other data must be checked against the
        categories of that data (``DetectionTask.bind_data``).
        """
        if self._eval_category_map is None:
            if self.val_ann == self.train_ann or not self.val_ann.is_file():
                self._eval_category_map = self.category_map
            else:
                with warnings.catch_warnings():  # its repairs are reported once, by setup()
                    warnings.simplefilter("ignore")
                    self._eval_category_map = CategoryMap.from_coco(load_coco_json(self.val_ann))
        return self._eval_category_map

    def task_kwargs(self) -> dict[str, Any]:
        return {
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "category_ids": list(self.category_map.category_ids),
        }

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            transform = build_det_train_transform(
                self.image_size,
                scale_range=self.scale_range,
                min_area=self.min_area,
                hflip=self.hflip,
                mean=self.mean,
                std=self.std,
                seed=worker_seed(self.run_seed, 0, self._global_rank()),
            )
            self.train_dataset = CocoDetection(
                self.root / self.train_split,
                self.train_ann,
                transform=transform,
                with_masks=self.with_masks,
                filter_empty=self.filter_empty,
                category_map=self.category_map,
                skip_bad=self.skip_bad,
            )
            if len(self.train_dataset) == 0:
                raise DataError(f"{self.train_ann}: no training image has a usable annotation")
        self.val_dataset = CocoDetection(
            self.root / self.val_split,
            self.val_ann,
            transform=build_det_eval_transform(self.mean, self.std),
            with_masks=self.with_masks,
            filter_empty=False,
            # training validates on the training categories; evaluating a checkpoint on the json's own
            # (DetectionTask.bind_data has checked them against the checkpoint's, or the user mapped them)
            category_map=self.category_map if stage in (None, "fit") else self.eval_category_map,
            skip_bad=self.skip_bad,
        )
        scan_datamodule(self, stage)


__all__ = ["DetDataModule", "collate_det"]
