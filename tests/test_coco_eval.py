"""COCO evaluation: GT-as-prediction = 1.0, our results file re-scored by plain pycocotools, backends agree."""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from siglip_dense.evaluation.coco_eval import (
    dedup_results,
    detections_to_coco,
    evaluate_coco,
    write_coco_results,
)
from tests.test_coco_data import toy_coco_root  # noqa: F401 - shared session fixture

NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _gt(root: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(root / "annotations" / "instances_val2017.json"))


def _rle(coco: COCO, ann: dict) -> dict:
    rle = coco.annToRLE(ann)  # compressed; counts are str when the json already held a compressed RLE
    counts = rle["counts"]
    return {
        "size": list(rle["size"]),
        "counts": counts.decode("utf-8") if isinstance(counts, bytes) else counts,
    }


def _gt_as_predictions(coco: COCO) -> list[dict]:
    return [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": list(a["bbox"]),
            "score": 1.0,
            "segmentation": _rle(coco, a),
        }
        for a in coco.dataset["annotations"]
        if not a["iscrowd"]
    ]


def _noisy_predictions(coco: COCO, seed: int = 0) -> list[dict]:
    """Jittered ground truth, some wrong classes and false positives, random scores."""
    rng = np.random.default_rng(seed)
    cats = coco.getCatIds()
    out = []
    for a in coco.dataset["annotations"]:
        x, y, w, h = a["bbox"]
        img = coco.imgs[a["image_id"]]
        for _ in range(2):
            j = rng.normal(0, 0.12, 4) * [w, h, w, h]
            box = [max(x + j[0], 0), max(y + j[1], 0), max(w + j[2], 1), max(h + j[3], 1)]
            cat = a["category_id"] if rng.random() < 0.8 else int(rng.choice(cats))
            m = np.zeros((img["height"], img["width"]), np.uint8)
            x0, y0 = int(box[0]), int(box[1])
            m[y0 : y0 + int(box[3]) + 1, x0 : x0 + int(box[2]) + 1] = 1
            m &= coco.annToMask(a) if rng.random() < 0.5 else 1
            rle = mask_utils.encode(np.asfortranarray(m))
            rle["counts"] = rle["counts"].decode("utf-8")
            out.append(
                {
                    "image_id": a["image_id"],
                    "category_id": cat,
                    "bbox": [float(v) for v in box],
                    "score": float(rng.random()),
                    "segmentation": rle,
                }
            )
    return out


@pytest.mark.parametrize("evaluator", ["pycocotools", "faster_coco_eval"])
def test_ground_truth_as_prediction_scores_one(toy_coco_root: Path, evaluator: str) -> None:  # noqa: F811
    coco = _gt(toy_coco_root)
    metrics = evaluate_coco(coco, _gt_as_predictions(coco), ("bbox", "segm"), evaluator=evaluator)
    assert metrics["bbox_AP"] == pytest.approx(1.0) and metrics["segm_AP"] == pytest.approx(1.0)
    for prefix in ("bbox", "segm"):
        for n in NAMES:
            v = metrics[f"{prefix}_{n}"]
            assert v is None or v == pytest.approx(1.0), (prefix, n, v)


def test_results_file_rescored_by_plain_pycocotools_gives_our_numbers(
    toy_coco_root: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    coco = _gt(toy_coco_root)
    results = _noisy_predictions(coco)
    ours = evaluate_coco(coco, results, ("bbox", "segm"))
    assert 0.05 < ours["bbox_AP"] < 0.95
    path = write_coco_results(tmp_path / "coco_results.json", results)
    loaded = json.loads(path.read_text())
    assert isinstance(loaded[0]["segmentation"]["counts"], str)
    for iou_type in ("bbox", "segm"):
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO(str(toy_coco_root / "annotations" / "instances_val2017.json"))
            ev = COCOeval(gt, gt.loadRes(str(path)), iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        for n, s in zip(NAMES, ev.stats[:6]):
            assert ours[f"{iou_type}_{n}"] == (None if s < 0 else float(s)), (iou_type, n)


def test_pycocotools_and_faster_coco_eval_agree(toy_coco_root: Path) -> None:  # noqa: F811
    coco = _gt(toy_coco_root)
    results = _noisy_predictions(coco, seed=1)
    a = evaluate_coco(coco, results, ("bbox", "segm"), evaluator="pycocotools")
    b = evaluate_coco(coco, results, ("bbox", "segm"), evaluator="faster_coco_eval")
    assert set(a) == set(b)
    for k in a:
        assert (a[k] is None) == (b[k] is None), k
        if a[k] is not None:
            assert a[k] == pytest.approx(b[k], abs=1e-9), k


def test_subset_of_images_and_empty_results(toy_coco_root: Path) -> None:  # noqa: F811
    coco = _gt(toy_coco_root)
    first = sorted(coco.getImgIds())[:2]
    res = [r for r in _gt_as_predictions(coco) if r["image_id"] in first]
    # scored on the predicted images only: perfect; on all images the rest are misses
    assert evaluate_coco(coco, res, image_ids=first)["bbox_AP"] == pytest.approx(1.0)
    assert evaluate_coco(coco, res)["bbox_AP"] < 1.0
    assert evaluate_coco(coco, [], ("bbox", "segm"), image_ids=first)["bbox_AP"] == 0.0
    with pytest.raises(ValueError, match="absent from the ground truth"):
        evaluate_coco(coco, [{**res[0], "image_id": 123456}])
    with pytest.raises(ValueError, match="evaluator must be one of"):
        evaluate_coco(coco, res, evaluator="nope")


def test_detections_to_coco_maps_labels_boxes_and_masks() -> None:
    masks = torch.zeros(2, 1, 20, 30)
    masks[0, 0, 2:6, 3:9] = 0.9
    masks[1, 0, 10:12, 0:5] = 0.7
    res = detections_to_coco(
        7,
        boxes=torch.tensor([[3.0, 2.0, 9.0, 6.0], [0.0, 10.0, 5.0, 12.0]]),
        scores=torch.tensor([0.9, 0.4]),
        labels=torch.tensor([1, 4]),
        category_ids=[1, 3, 5, 7, 9],
        masks=masks,
    )
    assert [r["category_id"] for r in res] == [3, 9]
    assert res[0]["bbox"] == [3.0, 2.0, 6.0, 4.0] and res[1]["bbox"] == [0.0, 10.0, 5.0, 2.0]
    assert isinstance(res[0]["segmentation"]["counts"], str)
    rle = {**res[0]["segmentation"], "counts": res[0]["segmentation"]["counts"].encode()}
    assert mask_utils.decode(rle).sum() == 24 and mask_utils.area(rle) == 24
    with pytest.raises(ValueError, match="outside 0..4"):
        detections_to_coco(1, torch.zeros(1, 4), torch.ones(1), torch.tensor([5]), [1, 3, 5, 7, 9])


def test_ddp_padding_repeats_count_once() -> None:
    r = lambda img, s: {"image_id": img, "category_id": 1, "bbox": [0, 0, 1, 1], "score": s}  # noqa: E731
    rank0 = {1: [r(1, 0.9)], 2: [r(2, 0.8), r(2, 0.7)]}
    rank1 = {3: [], 1: [r(1, 0.1)]}  # image 1 repeated by the sampler's padding
    merged, ids = dedup_results([rank0, rank1])
    assert ids == [1, 2, 3]
    assert sorted(x["score"] for x in merged) == [0.7, 0.8, 0.9]


def test_gather_results_under_an_initialised_process_group(tmp_path: Path) -> None:
    """The all_gather_object path (one gloo rank here; DDP ranks merge the same way as dedup_results)."""
    import torch.distributed as dist

    from siglip_dense.evaluation.coco_eval import gather_results

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        per_image = {5: [{"image_id": 5, "category_id": 1, "bbox": [0, 0, 2, 2], "score": 0.5}], 6: []}
        merged, ids = gather_results(per_image)
    finally:
        dist.destroy_process_group()
    assert ids == [5, 6] and merged == per_image[5]


def _large_only_gt() -> dict:
    """Two 200×200 images, large objects only: COCO's APs / APm are undefined (-1)."""
    images = [{"id": i, "file_name": f"{i}.jpg", "height": 200, "width": 200} for i in (1, 2)]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 120, 110], "area": 13200.0, "iscrowd": 0},
        {"id": 2, "image_id": 2, "category_id": 5, "bbox": [50, 40, 140, 150], "area": 21000.0, "iscrowd": 0},
    ]
    return {
        "images": images,
        "annotations": anns,
        "categories": [{"id": 3, "name": "a"}, {"id": 5, "name": "b"}],
    }


def _direct_pycocotools(gt: dict, results: list[dict]) -> list[float]:
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = json.loads(json.dumps(gt))
        coco.createIndex()
        if results:
            dt = coco.loadRes(json.loads(json.dumps(results)))
        else:  # what pycocotools' own tooling would do with a file of no detections
            dt = COCO()
            dt.dataset = {"images": gt["images"], "categories": gt["categories"], "annotations": []}
            dt.createIndex()
        ev = COCOeval(coco, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return list(ev.stats[:6])


@pytest.mark.parametrize("evaluator", ["pycocotools", "faster_coco_eval"])
def test_metric_set_does_not_depend_on_detections(evaluator: str) -> None:
    gt = _large_only_gt()
    one = [{"image_id": 1, "category_id": 3, "bbox": [12, 10, 118, 110], "score": 0.9}]
    m_one = evaluate_coco(gt, one, evaluator=evaluator)
    m_none = evaluate_coco(gt, [], evaluator=evaluator)
    assert set(m_one) == set(m_none) == {f"bbox_{n}" for n in NAMES}
    # undefined for both (no small / medium ground truth): None, never 0.0
    for stats, m in ((_direct_pycocotools(gt, one), m_one), (_direct_pycocotools(gt, []), m_none)):
        for n, s in zip(NAMES, stats):
            assert (m[f"bbox_{n}"] is None) == (s < 0), n
            if s >= 0:
                assert m[f"bbox_{n}"] == pytest.approx(s, abs=1e-9), n
    assert m_none["bbox_APs"] is None and m_none["bbox_APm"] is None and m_none["bbox_AP"] == 0.0
    # nothing scored at all: everything undefined
    assert set(evaluate_coco(gt, [], image_ids=[]).values()) == {None}


def test_ground_truth_without_iscrowd_is_a_clear_error_not_a_keyerror() -> None:
    gt = _large_only_gt()
    del gt["annotations"][1]["iscrowd"]
    with pytest.raises(ValueError, match=r"lack 'iscrowd'.*ids \[2\]"):
        evaluate_coco(gt, [])


def _shoelace(polygons: list[list[float]]) -> float:
    """Polygon area by the trapezoid form of the shoelace formula, summed over the polygons."""
    total = 0.0
    for p in polygons:
        x, y = np.asarray(p[0::2], float), np.asarray(p[1::2], float)
        xc, yc = np.append(x, x[0]), np.append(y, y[0])
        total += abs(float(np.sum((xc[1:] - xc[:-1]) * (yc[1:] + yc[:-1])))) / 2
    return total


def test_missing_area_is_polygon_area_for_polygons_mask_area_for_rle_box_area_otherwise(
    tmp_path: Path,
) -> None:
    from siglip_dense.data.coco import load_coco_json

    tri = [[10.0, 10.0, 50.0, 10.0, 30.0, 45.5]]  # area 40·35.5/2 = 710, rasterised to another pixel count
    two = [[0.0, 0.0, 4.0, 0.0, 4.0, 3.0, 0.0, 3.0], [60.0, 60.0, 70.5, 61.0, 64.0, 75.0]]
    rle = mask_utils.encode(np.asfortranarray((np.arange(80 * 90).reshape(80, 90) % 7 == 0).astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    gt = {
        "images": [{"id": 1, "file_name": "a.jpg", "height": 80, "width": 90}],
        "categories": [{"id": 1, "name": "a"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 35.5], "segmentation": tri},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [0, 0, 70.5, 75], "segmentation": two},
            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [0, 0, 90, 80], "segmentation": rle},
            {"id": 4, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3.5, 4]},
        ],
    }
    path = tmp_path / "instances_area.json"
    path.write_text(json.dumps(gt))
    with pytest.warns(UserWarning, match=r"4 annotation\(s\) without 'area'"):
        areas = {a["id"]: a["area"] for a in load_coco_json(path)["annotations"]}
    assert areas[1] == pytest.approx(710.0) and areas[1] == pytest.approx(_shoelace(tri))
    assert areas[2] == pytest.approx(_shoelace(two))
    assert areas[3] == float((np.arange(80 * 90) % 7 == 0).sum())
    assert areas[4] == 14.0
    raster = mask_utils.area(mask_utils.merge(mask_utils.frPyObjects(tri, 80, 90)))
    assert raster != pytest.approx(710.0)  # the old rule (pixel count) differs on this polygon


@pytest.mark.parametrize("evaluator", ["pycocotools", "faster_coco_eval"])
def test_zero_size_boxes_score_as_pycocotools_on_the_raw_json(
    toy_coco_root: Path,  # noqa: F811
    tmp_path: Path,
    evaluator: str,
) -> None:
    """A json with zero-size boxes (area/iscrowd given) scores as pycocotools on the file as given."""
    from siglip_dense.data.coco import CocoDetection
    from siglip_dense.data.transforms import build_det_eval_transform

    data = json.loads((toy_coco_root / "annotations" / "instances_val2017.json").read_text())
    data["annotations"][0]["bbox"][2] = 0
    data["annotations"][1]["bbox"][3] = 0
    data["annotations"][1]["segmentation"] = []
    raw = tmp_path / "val_zero.json"
    raw.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="zero-size box kept for evaluation"):
        ds = CocoDetection(
            toy_coco_root / "val2017", raw, transform=build_det_eval_transform((0.5,) * 3, (0.5,) * 3)
        )
    results = _noisy_predictions(_gt(toy_coco_root), seed=5)  # detections near the unedited boxes
    ours = evaluate_coco(ds.coco, results, ("bbox",), evaluator=evaluator)
    res_path = write_coco_results(tmp_path / "res.json", results)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(raw))
        ev = COCOeval(gt, gt.loadRes(str(res_path)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    for n, s in zip(NAMES, ev.stats[:6]):
        assert ours[f"bbox_{n}"] == (None if s < 0 else pytest.approx(float(s), abs=1e-12)), n
    # mask AP (pycocotools cannot score a ground truth without a segmentation): that one left out
    no_seg = data["annotations"][1]["id"]
    with pytest.warns(
        UserWarning, match=rf"segm AP leaves out 1 .*without a segmentation \(ids \[{no_seg}\]\)"
    ):
        ours_segm = evaluate_coco(ds.coco, results, ("segm",), evaluator=evaluator)
    masked = {**data, "annotations": [a for a in data["annotations"] if a["id"] != no_seg]}
    (tmp_path / "val_zero_masked.json").write_text(json.dumps(masked))
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(tmp_path / "val_zero_masked.json"))
        ev = COCOeval(gt, gt.loadRes(str(res_path)), "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    for n, s in zip(NAMES, ev.stats[:6]):
        assert ours_segm[f"segm_{n}"] == (None if s < 0 else pytest.approx(float(s), abs=1e-12)), n
    # neither zero-size box is a training target
    zero_ids = {data["annotations"][0]["id"], data["annotations"][1]["id"]}
    assert ds.num_dropped >= 2 and not zero_ids & {a["id"] for anns in ds._anns.values() for a in anns}


def _strip_for_repair(src: Path, dst_dir: Path) -> tuple[Path, Path, int]:
    """The toy val split with the fields COCO tools often omit removed, plus a zero-size box with a mask
    (box-only ones: test_zero_size_boxes_score_as_pycocotools_on_the_raw_json); images copied so the
    layout is real."""
    import shutil

    data = json.loads(src.read_text())
    for a in data["annotations"]:
        a.pop("area", None)
        if not a["iscrowd"]:
            del a["iscrowd"]
    with_mask = next(a for a in data["annotations"] if isinstance(a.get("segmentation"), list))
    with_mask["bbox"] = [with_mask["bbox"][0], with_mask["bbox"][1], 0.0, with_mask["bbox"][3]]
    del data["images"][0]["height"], data["images"][0]["width"]
    img_dir = dst_dir / "val2017"
    shutil.copytree(src.parents[1] / "val2017", img_dir)
    ann = dst_dir / "annotations" / "instances_val2017.json"
    ann.parent.mkdir(parents=True)
    ann.write_text(json.dumps(data))
    return img_dir, ann, with_mask["id"]


def test_json_without_area_and_iscrowd_is_repaired_and_scores_as_pycocotools_on_the_repaired_file(
    toy_coco_root: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    from siglip_dense.data.coco import CocoDetection, repair_coco_json
    from siglip_dense.data.transforms import build_det_eval_transform

    img_dir, ann, fixed_id = _strip_for_repair(
        toy_coco_root / "annotations" / "instances_val2017.json", tmp_path
    )
    with pytest.warns(UserWarning) as record:
        ds = CocoDetection(
            img_dir, ann, transform=build_det_eval_transform((0.5,) * 3, (0.5,) * 3), with_masks=True
        )
    msg = " | ".join(str(w.message) for w in record)
    assert str(ann) in msg
    assert "without 'iscrowd' set to 0" in msg
    assert "without 'area' given the polygon / mask area (or box w·h) (ids" in msg
    assert (
        f"zero-size box kept for evaluation (COCO scores them as unmatched ground truth) and left out of training targets (ids [{fixed_id}])"
        in msg
    )
    assert "1 image record(s) without height/width" in msg
    repaired = ds.coco.dataset
    assert all("area" in a and "iscrowd" in a for a in repaired["annotations"])
    # zero-size boxes stay in the evaluated json as given (pycocotools counts them as misses)
    assert next(a["bbox"] for a in repaired["annotations"] if a["id"] == fixed_id)[2] == 0.0
    # the polygon rule: area is the polygons' shoelace area (detectron2's converter), not a pixel count
    fixed = next(a for a in repaired["annotations"] if a["id"] == fixed_id)
    assert fixed["area"] == pytest.approx(_shoelace(fixed["segmentation"]), rel=1e-12)
    # our evaluation on the dataset's COCO == pycocotools run directly on the repaired json file
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        repaired_file = repair_coco_json(ann, tmp_path / "repaired.json", image_dir=img_dir)
    results = _noisy_predictions(ds.coco, seed=3)
    ours = evaluate_coco(ds.coco, results, ("bbox", "segm"))
    res_path = write_coco_results(tmp_path / "res.json", results)
    for iou_type in ("bbox", "segm"):
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO(str(repaired_file))
            ev = COCOeval(gt, gt.loadRes(str(res_path)), iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        for n, s in zip(NAMES, ev.stats[:6]):
            assert ours[f"{iou_type}_{n}"] == (None if s < 0 else float(s)), (iou_type, n)
    assert 0.05 < ours["bbox_AP"] < 0.95


@pytest.mark.parametrize(
    ("bbox", "match"),
    [
        ([10, 10, 5, -3], r"annotation 5 has bbox \[10, 10, 5, -3\] with a negative width"),
        ([1, 2, 3], "annotation 5 has bbox"),
    ],
)
def test_unrepairable_boxes_name_the_file_and_annotation(tmp_path: Path, bbox: list, match: str) -> None:
    from siglip_dense.data.coco import load_coco_json
    from siglip_dense.data.io import DataError

    gt = _large_only_gt()
    gt["annotations"][0].update(id=5, bbox=bbox)
    path = tmp_path / "instances_x.json"
    path.write_text(json.dumps(gt))
    with pytest.raises(DataError, match=rf"instances_x\.json: {match}"):
        load_coco_json(path)
