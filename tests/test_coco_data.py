"""COCO data: toy layout, category mapping, crowd / degenerate boxes, LSJ alignment, bad inputs."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest

from siglip_dense.data.coco import CategoryMap, CocoDetection, load_coco_json
from siglip_dense.data.detection import DetDataModule
from siglip_dense.data.io import DataError
from siglip_dense.data.toy import ensure_toy_data
from siglip_dense.data.transforms import (
    apply_det_transform,
    build_det_eval_transform,
    build_det_train_transform,
)

MEAN = STD = (0.5, 0.5, 0.5)


@pytest.fixture(scope="session")
def toy_coco_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small toy dataset in the COCO layout, at ``<data_dir>/toy_det`` as the toy_det config expects."""
    root = tmp_path_factory.getbasetemp() / "det_data" / "toy_det"
    return ensure_toy_data(root, num_train=8, num_val=6, seed=0, layout="coco")


def _write(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def _tiny_coco(tmp_path: Path, anns: list[dict], cats: list[dict] | None = None) -> tuple[Path, Path]:
    """Two 40×60 images (one black, one white) and the given annotations."""
    from PIL import Image

    img_dir = tmp_path / "imgs"
    img_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(img_dir / "a.jpg")
    Image.fromarray(np.full((40, 60, 3), 255, np.uint8)).save(img_dir / "b.jpg")
    data = {
        "images": [
            {"id": 10, "file_name": "a.jpg", "height": 40, "width": 60},
            {"id": 20, "file_name": "b.jpg", "height": 40, "width": 60},
        ],
        "annotations": anns,
        "categories": cats or [{"id": 4, "name": "x"}, {"id": 17, "name": "y"}],
    }
    return img_dir, _write(tmp_path / "ann.json", data)


def test_toy_layout_has_gapped_ids_crowd_and_both_mask_encodings(toy_coco_root: Path) -> None:
    for split in ("train2017", "val2017"):
        data = load_coco_json(toy_coco_root / "annotations" / f"instances_{split}.json")
        assert [c["id"] for c in data["categories"]] == [1, 3, 5, 7, 9]
        assert all((toy_coco_root / split / im["file_name"]).is_file() for im in data["images"])
        kinds = {type(a["segmentation"]).__name__ for a in data["annotations"]}
        assert kinds == {"list", "dict"}
        assert sum(a["iscrowd"] for a in data["annotations"]) == 1
        assert all(a["area"] > 0 and a["bbox"][2] > 0 and a["bbox"][3] > 0 for a in data["annotations"])


def test_category_mapping_round_trips_gapped_ids(toy_coco_root: Path) -> None:
    cmap = CategoryMap([9, 1, 5, 3, 7], ["flag", "ball", "cone", "box", "ring"])
    assert cmap.category_ids == [1, 3, 5, 7, 9] and cmap.names == ["ball", "box", "cone", "ring", "flag"]
    assert [cmap.category_id(cmap.label(c)) for c in (1, 3, 5, 7, 9)] == [1, 3, 5, 7, 9]
    assert [cmap.label(cmap.category_id(i)) for i in range(5)] == list(range(5))
    with pytest.raises(DataError, match="category id 2"):
        cmap.label(2)
    # every (non-crowd) annotation's label maps back to its original category id
    ds = CocoDetection(
        toy_coco_root / "val2017",
        toy_coco_root / "annotations" / "instances_val2017.json",
        transform=build_det_eval_transform(MEAN, STD),
        with_masks=True,
    )
    for i in range(len(ds)):
        sample = ds[i]
        anns = [a for a in ds.coco.imgToAnns[sample["meta"]["image_id"]] if not a["iscrowd"]]
        got = sorted(ds.category_map.category_id(int(lab)) for lab in sample["target"]["labels"])
        assert got == sorted(a["category_id"] for a in anns)
        assert sample["target"]["masks"].shape[0] == len(anns)
        assert tuple(sample["target"]["masks"].shape[1:]) == sample["meta"]["orig_size"]


def test_crowd_is_not_a_training_target_and_masks_match_boxes(toy_coco_root: Path) -> None:
    ds = CocoDetection(
        toy_coco_root / "train2017",
        toy_coco_root / "annotations" / "instances_train2017.json",
        transform=build_det_eval_transform(MEAN, STD),
        with_masks=True,
    )
    assert ds.num_crowd == 1
    first = ds.image_ids.index(1)  # the toy writer marks a crowd region in the first image
    sample = ds[first]
    anns = ds.coco.imgToAnns[1]
    assert len(sample["target"]["boxes"]) == len(anns) - 1
    for box, mask in zip(sample["target"]["boxes"].numpy(), sample["target"]["masks"].numpy()):
        ys, xs = np.nonzero(mask)
        # polygons traced from pixel masks lose up to ~2 px at the far edges
        np.testing.assert_allclose(box, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], atol=2.5)


def test_degenerate_and_out_of_image_boxes_are_counted_and_empty_images_kept(tmp_path: Path) -> None:
    anns = [
        {"id": 1, "image_id": 10, "category_id": 4, "bbox": [5, 5, 10, 10], "area": 100, "iscrowd": 0},
        {"id": 2, "image_id": 10, "category_id": 17, "bbox": [20, 5, 0, 10], "area": 0, "iscrowd": 0},
        {"id": 3, "image_id": 10, "category_id": 17, "bbox": [50, 30, 30, 30], "area": 100, "iscrowd": 0},
        {"id": 4, "image_id": 10, "category_id": 4, "bbox": [70, 50, 5, 5], "area": 25, "iscrowd": 0},
    ]
    img_dir, ann = _tiny_coco(tmp_path, anns)
    tf = build_det_eval_transform(MEAN, STD)
    # the zero-width box stays in the json (COCO scores it as a miss) and, with the out-of-image one,
    # is left out of the training targets
    with pytest.warns(UserWarning) as record:
        ds = CocoDetection(img_dir, ann, transform=tf, with_masks=True)
    messages = " | ".join(str(w.message) for w in record)
    assert re.search(r"zero-size box kept for evaluation.*\(ids \[2\]\)", messages), messages
    assert 2 in ds.coco.anns
    assert re.search(r"dropped 2 annotation.*clipped 1", messages), messages
    assert len(ds) == 2  # image 20 has no annotations: kept as a negative for evaluation
    boxes = ds[0]["target"]["boxes"].numpy()
    np.testing.assert_allclose(boxes, [[5, 5, 15, 15], [50, 30, 60, 40]])
    assert ds[1]["target"]["boxes"].shape == (0, 4) and ds[1]["target"]["masks"].shape == (0, 40, 60)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train = CocoDetection(img_dir, ann, transform=tf, filter_empty=True)
    assert train.image_ids == [10]


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ([1, 2, 3], "not a COCO instances json"),
        ({"images": [], "annotations": []}, "not a COCO instances json"),
        ({"images": [], "annotations": [], "categories": []}, "'categories' is empty"),
    ],
)
def test_json_that_is_not_coco_is_a_clear_error(tmp_path: Path, data: object, match: str) -> None:
    path = _write(tmp_path / "bad.json", data)
    with pytest.raises(DataError, match=match):
        load_coco_json(path)


def test_bad_annotation_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found.*missing.json"):
        load_coco_json(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot parse.*broken.json"):
        load_coco_json(tmp_path / "broken.json")
    unknown_cat = [{"id": 1, "image_id": 10, "category_id": 99, "bbox": [1, 1, 5, 5], "iscrowd": 0}]
    img_dir, ann = _tiny_coco(tmp_path / "u", unknown_cat)
    with pytest.raises(DataError, match=r"annotation 1 has category_id 99.*not in 'categories'"):
        CocoDetection(img_dir, ann)
    missing_img = [{"id": 7, "image_id": 999, "category_id": 4, "bbox": [1, 1, 5, 5], "iscrowd": 0}]
    img_dir, ann = _tiny_coco(tmp_path / "m", missing_img)
    with pytest.raises(DataError, match=r"annotation 7 refers to image_id 999"):
        CocoDetection(img_dir, ann)


def _two_photos(tmp_path: Path, images: list[dict], anns: list[dict], cats: list[dict] | None = None) -> Path:
    """A COCO layout with two different photos (black a.jpg, white b.jpg) and the given records."""
    img_dir, _ = _tiny_coco(tmp_path, [])
    data = {"images": images, "annotations": anns, "categories": cats or [{"id": 4, "name": "x"}]}
    _write(tmp_path / "annotations" / "instances_train2017.json", data)
    _write(tmp_path / "annotations" / "instances_val2017.json", data)
    (tmp_path / "train2017").symlink_to(img_dir)
    (tmp_path / "val2017").symlink_to(img_dir)
    return tmp_path


def _box(ann_id: int, image_id: int, cat: int = 4) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": cat, "bbox": [5, 5, 10, 10], "iscrowd": 0}


A, B = (
    {"id": 1, "file_name": "a.jpg", "height": 40, "width": 60},
    {"file_name": "b.jpg", "height": 40, "width": 60},
)


@pytest.mark.parametrize(
    ("images", "anns", "cats", "match"),
    [
        (  # two photos under one image id: pycocotools would keep b.jpg only, with both boxes
            [A, {**B, "id": 1}],
            [_box(1, 1), _box(2, 1)],
            None,
            r"instances_train2017\.json: repeated ids in 'images': id 1 \(2 records, file_name 'a\.jpg', 'b\.jpg'\)",
        ),
        (
            [A, {**B, "id": 2}],
            [_box(5, 1), _box(5, 2)],
            None,
            r"instances_train2017\.json: repeated ids in 'annotations': id 5 \(2 records, image_id 1, 2\)",
        ),
        (
            [A, {**B, "id": 2}],
            [_box(1, 1)],
            [{"id": 4, "name": "x"}, {"id": 4, "name": "y"}, {"id": 6, "name": "z"}],
            r"instances_train2017\.json: repeated ids in 'categories': id 4 \(2 records, name 'x', 'y'\)",
        ),
    ],
    ids=["images", "annotations", "categories"],
)
def test_repeated_ids_are_an_error_naming_them_and_the_file(
    tmp_path: Path, images: list[dict], anns: list[dict], cats: list[dict] | None, match: str
) -> None:
    """COCO indexes records by id: a repeated image, annotation or category id is refused, naming the
    ids and their records, by the data module a training run builds (not only by the json reader)."""
    root = _two_photos(tmp_path, images, anns, cats)
    with pytest.raises(DataError, match=match):
        DetDataModule(root=root, num_workers=0).setup("fit")


def test_a_file_listed_under_two_ids_is_a_warning_naming_both(tmp_path: Path) -> None:
    """Same photo, two ids: both records are samples (as COCO reads them); the warning names the file
    and the ids, and each id keeps its own boxes."""
    root = _two_photos(tmp_path, [A, {**A, "id": 7}], [_box(1, 1), _box(2, 7), _box(3, 7)])
    with pytest.warns(
        UserWarning, match=r"image files listed more than once in 'images': 'a\.jpg' \(ids 1, 7\)"
    ):
        ds = CocoDetection(root / "train2017", root / "annotations" / "instances_train2017.json")
    assert ds.image_ids == [1, 7]
    assert [len(ds.load(i)[1]) for i in range(2)] == [1, 2]


def test_missing_and_corrupt_image_files_name_the_file(tmp_path: Path) -> None:
    anns = [{"id": 1, "image_id": 10, "category_id": 4, "bbox": [5, 5, 10, 10], "iscrowd": 0}]
    img_dir, ann = _tiny_coco(tmp_path, anns)
    ds = CocoDetection(img_dir, ann, transform=build_det_eval_transform(MEAN, STD))
    (img_dir / "a.jpg").unlink()
    with pytest.raises(DataError, match=r"not found.*a\.jpg"):
        ds[0]
    (img_dir / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(DataError, match=r"cannot decode.*b\.jpg"):
        ds[1]


def test_datamodule_reads_classes_from_the_json(toy_coco_root: Path) -> None:
    dm = DetDataModule(toy_coco_root, image_size=128, num_workers=0, batch_size=2)
    kw = dm.task_kwargs()
    assert kw["category_ids"] == [1, 3, 5, 7, 9] and kw["num_classes"] == 5
    assert kw["class_names"] == ["ball", "box", "cone", "ring", "flag"]
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert len(batch["image"]) == 2 and batch["image"][0].shape == (3, 128, 128)
    assert set(batch["target"][0]) == {"boxes", "labels", "masks"}


def _rect_scene(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Five disjoint rectangles (one per column band) painted 40·(k+1) in red, label k, plus a 1-px box."""
    h, w = int(rng.integers(80, 200)), int(rng.integers(100, 200))
    image = np.zeros((h, w, 3), np.uint8)
    boxes, masks = [], []
    band = w // 5
    for k in range(5):
        bw, bh = int(rng.integers(4, band - 2)), int(rng.integers(4, h // 2))
        x, y = k * band + int(rng.integers(0, band - bw)), int(rng.integers(0, h - bh))
        m = np.zeros((h, w), np.uint8)
        m[y : y + bh, x : x + bw] = 1
        image[m.astype(bool), 0] = 40 * (k + 1)
        boxes.append([x, y, bw, bh])
        masks.append(m)
    boxes.append([0, 0, 1, 1])  # a 1-px box: dropped by min_area
    m = np.zeros((h, w), np.uint8)
    m[0, 0] = 1
    masks.append(m)
    return image, np.array(boxes, np.float32), np.arange(6), np.stack(masks)


def test_lsj_keeps_boxes_labels_masks_aligned_and_drops_masks_of_dropped_boxes() -> None:
    tf = build_det_train_transform(
        128, scale_range=(0.1, 2.0), min_area=4.0, mean=(0, 0, 0), std=(1, 1, 1), seed=3
    )
    rng = np.random.default_rng(0)
    seen_drop = False
    for _ in range(25):
        image, boxes, labels, masks = _rect_scene(rng)
        out = apply_det_transform(tf, image, boxes, labels, masks)
        assert tuple(out["image"].shape) == (3, 128, 128)
        red = out["image"][0].numpy() * 255.0
        n = len(out["boxes"])
        assert out["masks"].shape == (n, 128, 128) and len(out["labels"]) == n
        assert 5 not in out["labels"]  # the 1-px box never survives min_area
        seen_drop |= n < 5
        for box, lab, mask in zip(out["boxes"], out["labels"], out["masks"]):
            assert box[2] > box[0] and box[3] > box[1] and (box >= 0).all() and (box <= 128).all()
            ys, xs = np.nonzero(mask)
            assert len(xs), "a kept box lost its mask"
            # rectangles stay rectangles: the mask's extent is the box (nearest resize: ±1.5 px)
            np.testing.assert_allclose(box, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], atol=1.5)
            # the label travelled with its own rectangle: the pixels under the mask carry its paint
            inner = cv2.erode(mask, np.ones((3, 3), np.uint8)).astype(bool)  # away from blended edges
            if inner.any():
                assert abs(np.median(red[inner]) - 40 * (lab + 1)) < 12
    assert seen_drop
