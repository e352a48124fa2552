"""COCO-format instance data (the real COCO, your own json, or toy scenes) for torchvision detectors.

Any COCO instances json works: classes come from its ``categories`` (sorted by id) and map to
contiguous labels 0..K-1; the mapping back to the original ids is kept (checkpoint, results). Crowd
annotations are ignore regions for COCO's evaluator and never training targets (detectron2's rule).
Broken inputs fail with a message that names the file and the offending record.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from siglip_dense.data.io import DataError, read_image
from siglip_dense.data.skip import load_or_skip
from siglip_dense.data.transforms import apply_det_transform

REQUIRED_KEYS = ("images", "annotations", "categories")


# ---------------------------------------------------------------------------------------------
# annotation file + category mapping
# ---------------------------------------------------------------------------------------------
def load_coco_json(path: str | Path) -> dict[str, Any]:
    """Read and validate a COCO instances json; every problem names the file and the record."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"COCO annotation file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot parse COCO annotation file {path}: {exc}") from exc
    validate_coco_dict(data, str(path))
    repair_coco_dict(data, str(path))
    return data


def repair_coco_json(src: str | Path, dst: str | Path, image_dir: str | Path | None = None) -> Path:
    """Write the json as our loading repairs it, for scoring with other COCO tools.

    ``image_dir`` also fills missing image sizes from the files (as :class:`CocoDetection` does).
    """
    data = load_coco_json(src)
    if image_dir is not None:
        fill_image_sizes(data, Path(image_dir), str(src))
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps(data))
    return dst


def validate_coco_dict(data: Any, source: str = "<dict>") -> None:
    """The structure COCO tools rely on: images/annotations/categories lists, known ids everywhere."""
    if not isinstance(data, dict) or any(k not in data for k in REQUIRED_KEYS):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise DataError(
            f"{source} is not a COCO instances json: it needs top-level keys {list(REQUIRED_KEYS)}, found {found}"
        )
    for key in REQUIRED_KEYS:
        if not isinstance(data[key], list):
            raise DataError(f"{source}: '{key}' must be a list, got {type(data[key]).__name__}")
    if not data["categories"]:
        raise DataError(f"{source}: 'categories' is empty; detection needs at least one class")
    cat_ids = [c.get("id") for c in data["categories"]]
    check_unique_ids(data["categories"], "categories", "name", source)
    for img in data["images"]:
        if "id" not in img or "file_name" not in img:
            raise DataError(f"{source}: image record without 'id' / 'file_name': {str(img)[:200]}")
    check_unique_ids(data["images"], "images", "file_name", source)
    image_ids = {img["id"] for img in data["images"]}
    warn_repeated_files(data["images"], source)
    known_cats = set(cat_ids)
    for ann in data["annotations"]:
        for k in ("id", "image_id", "category_id", "bbox"):
            if k not in ann:
                raise DataError(f"{source}: annotation without '{k}': {str(ann)[:200]}")
    check_unique_ids(data["annotations"], "annotations", "image_id", source)
    for ann in data["annotations"]:
        if ann["category_id"] not in known_cats:
            raise DataError(
                f"{source}: annotation {ann['id']} has category_id {ann['category_id']}, which is not in "
                f"'categories' (known ids: {sorted(known_cats)})"
            )
        if ann["image_id"] not in image_ids:
            raise DataError(
                f"{source}: annotation {ann['id']} refers to image_id {ann['image_id']}, which is not in 'images'"
            )


def _repeated(keys: Sequence[Any]) -> dict[Any, int]:
    """``{key: count}`` of the keys that occur more than once, in order of first occurrence."""
    counts: dict[Any, int] = {}
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    return {k: n for k, n in counts.items() if n > 1}


def check_unique_ids(records: list[dict[str, Any]], section: str, field: str, source: str) -> None:
    """Every record of ``section`` has its own ``id``: COCO tools index by id, so a repeated id would
    silently keep only the last record (one image never read, another trained with both boxes).

    Raises:
        DataError: naming ``source``, the section, each repeated id (up to 10) and, per id, the
            ``field`` of its records (an image's ``file_name``, an annotation's ``image_id``).
    """
    repeated = _repeated([r.get("id") for r in records])
    if not repeated:
        return
    shown = []
    for rid in list(repeated)[:10]:
        values = [r.get(field) for r in records if r.get("id") == rid]
        shown.append(f"id {rid!r} ({len(values)} records, {field} {', '.join(repr(v) for v in values)})")
    more = f" and {len(repeated) - 10} more" if len(repeated) > 10 else ""
    raise DataError(
        f"{source}: repeated ids in '{section}': {'; '.join(shown)}{more}. Each record needs its own id"
    )


def warn_repeated_files(images: list[dict[str, Any]], source: str) -> None:
    """An image file listed under several ids is read (and trained on) once per id: warn, naming them."""
    repeated = _repeated([img["file_name"] for img in images])
    if not repeated:
        return
    shown = [
        f"{name!r} (ids {', '.join(repr(i['id']) for i in images if i['file_name'] == name)})"
        for name in list(repeated)[:10]
    ]
    more = f" and {len(repeated) - 10} more" if len(repeated) > 10 else ""
    warnings.warn(
        f"{source}: image files listed more than once in 'images': {'; '.join(shown)}{more}; "
        "each record is a sample of its own",
        stacklevel=3,
    )


def _segmentation_rle(seg: Any, height: int | None, width: int | None) -> Any:
    """Polygons / uncompressed / compressed RLE → one compressed RLE (pycocotools).

    Polygons without a recorded image size are rasterised on a canvas that just holds them: the
    area and the bounding box do not depend on the canvas beyond that.
    """
    from pycocotools import mask as mask_utils

    if isinstance(seg, list):
        polys = [p for p in seg if len(p) >= 6]
        if not polys:
            return None
        if not height or not width:
            height = int(np.ceil(max(max(p[1::2]) for p in polys))) + 1
            width = int(np.ceil(max(max(p[0::2]) for p in polys))) + 1
        return mask_utils.merge(mask_utils.frPyObjects(polys, int(height), int(width)))
    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        if isinstance(seg["counts"], list):
            return mask_utils.frPyObjects(seg, *seg["size"])
        return seg
    return None


def _fmt_ids(ids: list[Any]) -> str:
    return f"{ids[:10]}{' ...' if len(ids) > 10 else ''}"


def polygon_area(polygons: list[list[float]]) -> float:
    """Sum of the shoelace areas of COCO polygons ``[[x0, y0, x1, y1, ...], ...]`` (pixels²).

    The area detectron2's COCO converter (``PolygonMasks.area``) and the COCO tools record for a
    polygon annotation: geometric, not the rasterised pixel count.
    """
    total = 0.0
    for poly in polygons:
        xy = np.asarray(poly, np.float64).reshape(-1, 2)
        if len(xy) < 3:
            continue
        x, y = xy[:, 0], xy[:, 1]
        total += 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))
    return total


def annotation_area(ann: dict[str, Any], height: int | None, width: int | None) -> float:
    """COCO's ``area`` for an annotation without one: polygon area for polygons, the mask area for
    RLE (pycocotools ``area``), box w·h without a segmentation (detectron2 ``convert_to_coco_dict``)."""
    from pycocotools import mask as mask_utils

    seg = ann.get("segmentation")
    if isinstance(seg, list) and seg:
        return polygon_area(seg)
    rle = _segmentation_rle(seg, height, width) if seg else None
    if rle is not None:
        return float(mask_utils.area(rle))
    return float(ann["bbox"][2]) * float(ann["bbox"][3])


def repair_coco_dict(data: dict[str, Any], source: str = "<dict>") -> dict[str, list[Any]]:
    """Apply COCO's well-known rules where a field COCO evaluation needs is missing; fail otherwise.

    In place, each repair counted in one warning that lists the annotation ids:
    - ``iscrowd`` missing → 0 (detectron2 / torchvision converters);
    - ``area`` missing → :func:`annotation_area` (polygon area, RLE mask area, else box w·h).
    Zero-width or zero-height boxes are kept as given and counted in the warning: COCO's evaluator
    scores them as ground truth that no detection matches, so the json scores as pycocotools scores
    it; :class:`CocoDetection` leaves them out of training targets (detectron2 drops empty boxes too).
    Returns ``{repair name: [annotation ids]}``.

    Raises:
        DataError: naming ``source`` and the annotation id for a bbox that is not four finite numbers
            or has a negative width / height (``[x1, y1, x2, y2]`` written where COCO wants
            ``[x, y, w, h]``?).
    """
    sizes = {img["id"]: (img.get("height"), img.get("width")) for img in data["images"]}
    repairs: dict[str, list[Any]] = {"iscrowd": [], "area": [], "zero_size": []}
    for ann in data["annotations"]:
        box = ann["bbox"]
        ok = isinstance(box, (list, tuple)) and len(box) == 4
        if ok:
            try:
                box = [float(v) for v in box]
            except (TypeError, ValueError):
                ok = False
        if not ok or not np.isfinite(box).all():
            raise DataError(
                f"{source}: annotation {ann['id']} has bbox {ann['bbox']!r}; COCO needs [x, y, w, h]"
            )
        if box[2] < 0 or box[3] < 0:
            raise DataError(
                f"{source}: annotation {ann['id']} has bbox {ann['bbox']} with a negative width/height; "
                "COCO boxes are [x, y, w, h] (was [x1, y1, x2, y2] written?)"
            )
        if "iscrowd" not in ann:
            ann["iscrowd"] = 0
            repairs["iscrowd"].append(ann["id"])
        if box[2] == 0 or box[3] == 0:
            repairs["zero_size"].append(ann["id"])
        if "area" not in ann:
            ann["area"] = annotation_area(ann, *sizes.get(ann["image_id"], (None, None)))
            repairs["area"].append(ann["id"])
    done = {k: v for k, v in repairs.items() if v}
    if done:
        what = {
            "iscrowd": "without 'iscrowd' set to 0",
            "area": "without 'area' given the polygon / mask area (or box w·h)",
            "zero_size": (
                "with a zero-size box kept for evaluation (COCO scores them as unmatched ground truth) "
                "and left out of training targets"
            ),
        }
        lines = "; ".join(f"{len(v)} annotation(s) {what[k]} (ids {_fmt_ids(v)})" for k, v in done.items())
        warnings.warn(
            f"{source}: repaired by COCO's rules: {lines}. Scores equal pycocotools on the repaired "
            "json (siglip_dense.data.coco.repair_coco_json writes it).",
            stacklevel=3,
        )
    return repairs


class CategoryMap:
    """Original COCO category ids (gapped, e.g. 1..90) ↔ contiguous labels 0..K-1, sorted by id."""

    def __init__(self, category_ids: Sequence[int], names: Sequence[str] | None = None) -> None:
        ids = [int(i) for i in category_ids]
        if len(set(ids)) != len(ids):
            raise ValueError(f"repeated category ids {ids}")
        order = sorted(range(len(ids)), key=lambda i: ids[i])
        self.category_ids = [ids[i] for i in order]
        self.names = (
            [str(names[i]) for i in order] if names is not None else [f"cat_{c}" for c in self.category_ids]
        )
        self._label_of = {c: i for i, c in enumerate(self.category_ids)}

    @classmethod
    def from_coco(cls, data: dict[str, Any]) -> CategoryMap:
        cats = data["categories"]
        return cls([c["id"] for c in cats], [c.get("name", f"cat_{c['id']}") for c in cats])

    def __len__(self) -> int:
        return len(self.category_ids)

    def label(self, category_id: int) -> int:
        try:
            return self._label_of[int(category_id)]
        except KeyError:
            raise DataError(f"category id {category_id} is not one of {self.category_ids}") from None

    def category_id(self, label: int) -> int:
        return self.category_ids[int(label)]

    def to_dict(self) -> dict[str, Any]:
        return {"category_ids": list(self.category_ids), "class_names": list(self.names)}


# ---------------------------------------------------------------------------------------------
# dataset
# ---------------------------------------------------------------------------------------------
def _quiet_coco(data: dict[str, Any]) -> Any:
    import contextlib
    import io

    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def fill_image_sizes(data: dict[str, Any], image_dir: Path, source: str) -> list[Any]:
    """Image records without ``height``/``width`` get them from the file's header (counted warning).

    COCO's mask evaluation rasterises polygons at the recorded size. Returns the repaired image ids;
    a file that is missing or unreadable is a DataError naming it.
    """
    from PIL import Image

    filled = []
    for img in data["images"]:
        if img.get("height") and img.get("width"):
            continue
        path = image_dir / img["file_name"]
        try:
            with Image.open(path) as im:
                img["width"], img["height"] = im.size
        except (OSError, ValueError) as exc:
            raise DataError(
                f"{source}: image {img['id']} has no height/width and {path} cannot be read: {exc}"
            ) from exc
        filled.append(img["id"])
    if filled:
        warnings.warn(
            f"{source}: {len(filled)} image record(s) without height/width took them from the files "
            f"(ids {_fmt_ids(filled)})",
            stacklevel=3,
        )
    return filled


class CocoDetection(Dataset):
    """COCO-layout images + instances json → normalised image tensors and torchvision targets.

    ``__getitem__`` returns ``{"image": 3×H×W, "target": {"boxes" xyxy float32, "labels" int64 0..K-1,
    ["masks" uint8 N×H×W]}, "meta": {"image_id", "path", "orig_size"}}``. Boxes are clipped to the
    image; boxes with no area after clipping are dropped (counted, one warning per dataset).
    ``filter_empty`` drops images without usable (non-crowd) annotations: training only — evaluation
    keeps them as negatives. ``skip_bad``: an unreadable image is skipped (counted, warned about, named
    in ``meta["skipped"]``) instead of raising.
    """

    def __init__(
        self,
        image_dir: str | Path,
        ann_file: str | Path,
        transform: Any = None,
        with_masks: bool = False,
        filter_empty: bool = False,
        category_map: CategoryMap | None = None,
        skip_bad: bool = False,
    ) -> None:
        self.image_dir = Path(image_dir)
        self.skip_bad = bool(skip_bad)
        self.num_skipped = 0
        self.ann_file = Path(ann_file)
        if not self.image_dir.is_dir():
            raise DataError(f"COCO image directory not found: {self.image_dir}")
        data = load_coco_json(self.ann_file)
        fill_image_sizes(data, self.image_dir, str(self.ann_file))
        self.coco = _quiet_coco(data)
        self.category_map = category_map or CategoryMap.from_coco(data)
        own = {c["id"] for c in data["categories"]}
        missing = own - set(self.category_map.category_ids)
        if missing:
            raise DataError(
                f"{self.ann_file} has categories {sorted(missing)} that the training categories "
                f"{self.category_map.category_ids} do not know"
            )
        self.transform = transform
        self.with_masks = bool(with_masks)
        self.num_dropped = 0
        self.num_clipped = 0
        self.num_crowd = 0
        self._anns: dict[int, list[dict[str, Any]]] = {}
        for img in data["images"]:
            self._anns[img["id"]] = self._clean(img, self.coco.imgToAnns.get(img["id"], []))
        self.image_ids = [img["id"] for img in data["images"]]
        if filter_empty:
            self.image_ids = [i for i in self.image_ids if self._anns[i]]
        if self.num_dropped or self.num_clipped:
            warnings.warn(
                f"{self.ann_file}: dropped {self.num_dropped} annotation(s) with zero-area or out-of-image "
                f"boxes, clipped {self.num_clipped} to the image",
                stacklevel=2,
            )

    def _clean(self, img: dict[str, Any], anns: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Training targets of one image: no crowd, boxes clipped to the image, degenerate ones dropped."""
        h, w = img.get("height"), img.get("width")
        kept = []
        for ann in anns:
            if ann.get("iscrowd", 0):
                self.num_crowd += 1
                continue
            x, y, bw, bh = (float(v) for v in ann["bbox"])
            x0, y0, x1, y1 = x, y, x + bw, y + bh
            if w is not None and h is not None:
                cx0, cy0 = min(max(x0, 0.0), w), min(max(y0, 0.0), h)
                cx1, cy1 = min(max(x1, 0.0), w), min(max(y1, 0.0), h)
                if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1) and cx1 > cx0 and cy1 > cy0:
                    self.num_clipped += 1
                x0, y0, x1, y1 = cx0, cy0, cx1, cy1
            if not (x1 - x0 > 0 and y1 - y0 > 0) or not np.isfinite([x0, y0, x1, y1]).all():
                self.num_dropped += 1
                continue
            kept.append({**ann, "bbox": [x0, y0, x1 - x0, y1 - y0]})
        return kept

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def class_names(self) -> list[str]:
        return list(self.category_map.names)

    def image_path(self, image_id: int) -> Path:
        return self.image_dir / self.coco.imgs[image_id]["file_name"]

    def load(
        self, index: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, dict[str, Any]]:
        """Raw image, xywh boxes, labels and masks (original pixels) of one sample, before transforms."""
        image_id = self.image_ids[index]
        info = self.coco.imgs[image_id]
        path = self.image_path(image_id)
        image = read_image(path)
        h, w = image.shape[:2]
        if (info.get("height"), info.get("width")) not in ((h, w), (None, None)):
            raise DataError(
                f"{path} is {h}×{w} but {self.ann_file} records {info.get('height')}×{info.get('width')}"
            )
        anns = self._anns[image_id]
        boxes = np.array([a["bbox"] for a in anns], np.float32).reshape(-1, 4)
        labels = np.array([self.category_map.label(a["category_id"]) for a in anns], np.int64)
        masks = None
        if self.with_masks:
            masks = np.zeros((len(anns), h, w), np.uint8)
            for i, a in enumerate(anns):
                masks[i] = self._ann_mask(a, h, w)
        meta = {"image_id": int(image_id), "path": str(path), "orig_size": (h, w)}
        return image, boxes, labels, masks, meta

    def _ann_mask(self, ann: dict[str, Any], h: int, w: int) -> np.ndarray:
        """Polygons or RLE → binary mask; a box-only annotation falls back to its filled box."""
        from pycocotools import mask as mask_utils

        seg = ann.get("segmentation")
        if not seg:
            x, y, bw, bh = ann["bbox"]
            m = np.zeros((h, w), np.uint8)
            m[int(y) : int(np.ceil(y + bh)), int(x) : int(np.ceil(x + bw))] = 1
            return m
        if isinstance(seg, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
        elif isinstance(seg.get("counts"), list):
            rle = mask_utils.frPyObjects(seg, h, w)
        else:
            rle = seg
        return mask_utils.decode(rle).astype(np.uint8)

    def sample_file(self, index: int) -> Path:
        """The image file of sample ``index`` (what skip totals name)."""
        return self.image_path(self.image_ids[index])

    def __getitem__(self, index: int) -> dict[str, Any]:
        """The sample at ``index``; with ``skip_bad`` a bad one is a skip marker (see :mod:`~siglip_dense.data.skip`)."""
        return load_or_skip(self, index, lambda i: self._make_item(*self.load(i)))

    def _make_item(
        self,
        image: np.ndarray,
        boxes: np.ndarray,
        labels: np.ndarray,
        masks: np.ndarray | None,
        meta: dict[str, Any],
    ) -> dict[str, Any]:
        if self.transform is None:
            raise RuntimeError("CocoDetection needs a transform (normalise + to tensor) to produce tensors")
        out = apply_det_transform(self.transform, image, boxes, labels, masks)
        target = {"boxes": torch.from_numpy(out["boxes"]), "labels": torch.from_numpy(out["labels"])}
        if out["masks"] is not None:
            target["masks"] = torch.from_numpy(out["masks"])
        return {"image": out["image"], "target": target, "meta": meta}


__all__ = [
    "CategoryMap",
    "CocoDetection",
    "fill_image_sizes",
    "annotation_area",
    "load_coco_json",
    "polygon_area",
    "repair_coco_dict",
    "repair_coco_json",
    "validate_coco_dict",
    "check_unique_ids",
    "warn_repeated_files",
]
