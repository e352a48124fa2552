"""eval.py and predict.py for depth and detection checkpoints, re-scored by independent paths.

Depth: numpy textbook metrics over the saved ``.npy`` files and the 16-bit ground-truth PNGs.
Detection: plain pycocotools over the saved ``coco_results.json``.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from siglip_dense.data.toy import ensure_toy_data
from siglip_dense.evaluate import run_eval
from siglip_dense.train import run_train
from tests.conftest import compose_cfg, compose_train_cfg

REPO = Path(__file__).resolve().parents[1]
SHORT = ["trainer.max_epochs=1", "+trainer.limit_train_batches=2", "data.num_workers=0", "num_vis=0"]


def best_ckpt(run_dir: Path) -> Path:
    return next((run_dir / "checkpoints").glob("epoch_*.ckpt"))


def eval_cfg(ckpt: Path, out: Path, tmp: Path, *extra: str):  # noqa: ANN201
    overrides = [f"ckpt_path={ckpt}", "data.num_workers=0", "save_predictions=true", f"output_dir={out}"]
    return compose_cfg("eval", [*overrides, *extra], tmp / "hydra")


# -- depth -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def depth_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("evdepth")
    root = ensure_toy_data(base / "data" / "toy_depth", num_train=8, num_val=3, seed=1, layout="nyu")
    run_dir = base / "run"
    cfg = compose_train_cfg(
        ["experiment=toy_depth", *SHORT, "data.batch_size=4"], run_dir, data_dir=root.parent
    )
    run_train(cfg)
    return run_dir, root


def numpy_depth_metrics(pred_dir: Path, root: Path, max_depth: float = 10.0) -> dict[str, float]:
    """abs_rel / rmse / delta1 per image (Eigen crop scaled to the GT size), then the mean."""
    per_image = []
    for line in (root / "splits" / "val.txt").read_text().splitlines():
        rgb_rel, depth_rel = line.split()[:2]
        gt = np.asarray(Image.open(root / depth_rel)).astype(np.float64) / 1000.0
        pred = np.load(pred_dir / f"{Path(rgb_rel).stem}.npy").astype(np.float64)
        assert pred.shape == gt.shape and pred.dtype == np.float64
        h, w = gt.shape
        crop = np.zeros_like(gt, dtype=bool)
        y0, y1 = int(45 / 480 * h + 0.5), int(471 / 480 * h + 0.5)
        x0, x1 = int(41 / 640 * w + 0.5), int(601 / 640 * w + 0.5)
        crop[y0:y1, x0:x1] = True
        valid = crop & (gt > 1e-3) & (gt < max_depth)
        g, p = gt[valid], np.clip(pred[valid], 1e-3, max_depth)
        thresh = np.maximum(g / p, p / g)
        per_image.append(
            {
                "abs_rel": np.mean(np.abs(p - g) / g),
                "rmse": np.sqrt(np.mean((p - g) ** 2)),
                "delta1": np.mean(thresh < 1.25),
            }
        )
    return {k: float(np.mean([m[k] for m in per_image])) for k in per_image[0]}


def test_depth_eval_matches_training_and_saved_npy(
    depth_run: tuple[Path, Path], tmp_path: Path, hydra_cleanup: None
) -> None:
    run_dir, root = depth_run
    out = tmp_path / "eval"
    metrics = run_eval(eval_cfg(best_ckpt(run_dir), out, tmp_path))
    trained = json.loads((run_dir / "metrics.json").read_text())
    for key in ("abs_rel", "rmse", "delta1", "silog"):
        assert metrics[key] == pytest.approx(trained[key], rel=1e-6, abs=1e-9), key
    ref = numpy_depth_metrics(out / "predictions", root)
    for key, value in ref.items():
        assert metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_depth_eval_skip_bad_equals_eval_without_the_bad_image(
    depth_run: tuple[Path, Path], tmp_path: Path, hydra_cleanup: None
) -> None:
    """skip_bad leaves a bad validation image out of the depth metrics: the same numbers as the split
    without it (the old skip scored the next image twice), and the skip counted in metrics.json."""
    run_dir, root = depth_run
    skip_root = Path(shutil.copytree(root, tmp_path / "skip"))
    drop_root = Path(shutil.copytree(root, tmp_path / "drop"))
    lines = (root / "splits" / "val.txt").read_text().splitlines()
    bad = skip_root / lines[1].split()[0]
    bad.write_bytes(b"not an image")
    (drop_root / "splits" / "val.txt").write_text("\n".join(lines[:1] + lines[2:]) + "\n")
    ckpt = best_ckpt(run_dir)
    with pytest.warns(UserWarning, match=re.escape(bad.name)):
        skipped = run_eval(
            eval_cfg(ckpt, tmp_path / "e1", tmp_path, f"data.root={skip_root}", "data.skip_bad=true")
        )
    dropped = run_eval(eval_cfg(ckpt, tmp_path / "e2", tmp_path, f"data.root={drop_root}"))
    assert skipped.pop("skipped") == 1 and skipped.pop("skipped_files") == [str(bad)]
    assert json.dumps(skipped, sort_keys=True) == json.dumps(dropped, sort_keys=True)


@pytest.mark.slow
def test_depth_predict_tool(depth_run: tuple[Path, Path], tmp_path: Path) -> None:
    run_dir, root = depth_run
    image = next((root).rglob("*.jpg"))
    out = tmp_path / "pred"
    cmd = [
        sys.executable,
        "tools/predict.py",
        f"ckpt_path={best_ckpt(run_dir)}",
        f"input={image}",
        f"output={out}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    depth = np.load(out / f"{image.name}.npy")
    assert depth.dtype == np.float32 and depth.shape == np.asarray(Image.open(image)).shape[:2]
    assert np.all((depth >= 1e-3) & (depth <= 10.0))
    assert (out / f"{image.name}_vis.png").stat().st_size > 0


# -- detection ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def det_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("evdet")
    root = ensure_toy_data(base / "data" / "toy_det", num_train=6, num_val=4, seed=2, layout="coco")
    run_dir = base / "run"
    small = ["data.batch_size=2", "data.image_size=128", "task.detector.box_detections_per_img=20"]
    cfg = compose_train_cfg(["experiment=toy_det", *SHORT, *small], run_dir, data_dir=root.parent)
    run_train(cfg)
    return run_dir, root


def test_detection_eval_results_rescored_by_pycocotools(
    det_run: tuple[Path, Path], tmp_path: Path, hydra_cleanup: None
) -> None:
    run_dir, root = det_run
    out = tmp_path / "eval"
    metrics = run_eval(eval_cfg(best_ckpt(run_dir), out, tmp_path))
    trained = json.loads((run_dir / "metrics.json").read_text())
    assert metrics.keys() == trained.keys()
    for key, value in trained.items():
        assert metrics[key] is None if value is None else metrics[key] == pytest.approx(value, abs=1e-9), key
    results_path = out / "coco_results.json"
    results = json.loads(results_path.read_text())
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(root / "annotations" / "instances_val2017.json"))
        if results:
            dt = gt.loadRes(str(results_path))
        else:  # the 1-epoch model may detect nothing: score an empty detection set the same way
            dt = COCO()
            dt.dataset = {
                "images": gt.dataset["images"],
                "categories": gt.dataset["categories"],
                "annotations": [],
            }
            dt.createIndex()
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    for name, stat in zip(("AP", "AP50", "AP75", "APs", "APm", "APl"), ev.stats[:6]):
        assert metrics[f"bbox_{name}"] == (None if stat < 0 else pytest.approx(float(stat), abs=1e-12)), name


def _pad_coco_image(root: Path, split: str, image_id: int, bottom: int, right: int) -> None:
    """Pad one image of a COCO split bottom/right with grey; its annotations keep their coordinates
    (masks stored as RLE are re-encoded at the new size, polygons and boxes are unchanged)."""
    from pycocotools import mask as mask_utils

    ann_file = root / "annotations" / f"instances_{split}.json"
    data = json.loads(ann_file.read_text())
    info = next(im for im in data["images"] if im["id"] == image_id)
    path = root / split / info["file_name"]
    rgb = np.asarray(Image.open(path).convert("RGB"))
    Image.fromarray(np.pad(rgb, ((0, bottom), (0, right), (0, 0)), constant_values=127)).save(
        path, quality=95
    )
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_file))
    for ann in data["annotations"]:
        if ann["image_id"] == image_id and isinstance(ann["segmentation"], dict):
            mask = np.pad(gt.annToMask(ann), ((0, bottom), (0, right)))
            rle = mask_utils.encode(np.asfortranarray(mask))
            ann["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("utf-8")}
    info["height"], info["width"] = info["height"] + bottom, info["width"] + right
    ann_file.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def det_data_landscape_first(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Toy COCO data whose first validation image is landscape (2.5:1), its second portrait."""
    root = ensure_toy_data(
        tmp_path_factory.mktemp("evdet_order") / "data" / "toy_det",
        num_train=4,
        num_val=3,
        seed=3,
        layout="coco",
    )
    images = {
        im["id"]: im
        for im in json.loads((root / "annotations" / "instances_val2017.json").read_text())["images"]
    }
    first, second = images[1], images[2]
    _pad_coco_image(root, "val2017", 1, 0, int(2.5 * first["height"]) - first["width"])
    _pad_coco_image(root, "val2017", 2, int(2.5 * second["width"]) - second["height"], 0)
    return root


DETECTOR_RUNS = {
    "faster_rcnn": ["task=det_faster_rcnn", "data.with_masks=false", "task.detector.box_score_thresh=0.0"],
    "mask_rcnn": ["task.detector.box_score_thresh=0.0"],
    "retinanet": ["task=det_retinanet", "neck.top_block=false", "task.detector.score_thresh=0.0"],
    "fcos": ["task=det_fcos", "neck.top_block=false", "task.detector.score_thresh=0.0"],
}


def _sorted_results(path: Path) -> list[dict]:
    return sorted(json.loads(path.read_text()), key=lambda r: (r["image_id"], -r["score"], r["bbox"]))


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(DETECTOR_RUNS))
def test_detection_eval_equals_the_training_validation_whatever_the_first_image(
    kind: str, det_data_landscape_first: Path, tmp_path: Path, hydra_cleanup: None
) -> None:
    """tools/eval.py on a fresh process's model gives the training run's own validation results.

    The first evaluated image is landscape: torchvision's RoI pooler inferred its scales from it
    (the training run's from its square crops), so R-CNN results used to differ.
    """
    root = det_data_landscape_first
    run_dir = tmp_path / "run"
    small = ["data.batch_size=2", "data.image_size=128", "task.detector.box_detections_per_img=20"]
    overrides = ["experiment=toy_det", *SHORT, *small, *DETECTOR_RUNS[kind]]
    if kind in ("retinanet", "fcos"):
        overrides.append("task.detector.detections_per_img=20")
    run_train(compose_train_cfg(overrides, run_dir, data_dir=root.parent))
    metrics = run_eval(eval_cfg(best_ckpt(run_dir), tmp_path / "eval", tmp_path))
    trained = _sorted_results(run_dir / "coco_results.json")
    evaluated = _sorted_results(tmp_path / "eval" / "coco_results.json")
    assert {r["image_id"] for r in trained} == {1, 2, 3}
    assert evaluated == trained
    assert metrics == json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.slow
def test_detection_predict_tool(det_run: tuple[Path, Path], tmp_path: Path) -> None:
    run_dir, root = det_run
    image = sorted((root / "val2017").glob("*.jpg"))[0]
    out = tmp_path / "pred"
    cmd = [
        sys.executable,
        "tools/predict.py",
        f"ckpt_path={best_ckpt(run_dir)}",
        f"input={image}",
        f"output={out}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dets = json.loads((out / f"{image.name}.json").read_text())["detections"]
    cat_ids = {
        c["id"]
        for c in json.loads((root / "annotations" / "instances_val2017.json").read_text())["categories"]
    }
    assert all(d["category_id"] in cat_ids and len(d["bbox_xyxy"]) == 4 for d in dets)
    assert (out / f"{image.name}_vis.png").stat().st_size > 0


def test_detector_backbone_and_neck_start_a_new_dataset(det_run: tuple[Path, Path]) -> None:
    """init_from a COCO-trained detector with filter backbone+neck: heads stay fresh for new classes."""
    import torch

    from siglip_dense.tasks.detection import DetectionTask

    ckpt = best_ckpt(det_run[0])
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    hp = dict(raw["hyper_parameters"])
    k = hp["num_classes"] + 2
    hp.update(
        num_classes=k,
        class_names=[f"n{i}" for i in range(k)],
        category_ids=list(range(1, k + 1)),
        init_from=str(ckpt),
        init_from_filter="backbone+neck",
    )
    task = DetectionTask(**hp)
    loaded = set(task.init_report.loaded)
    assert loaded and all(n.startswith(("model.backbone.body.", "model.backbone.neck.")) for n in loaded)
    src = raw["state_dict"]
    assert loaded == {n for n in src if n.startswith(("model.backbone.body.", "model.backbone.neck."))}
    own = task.state_dict()
    for name in loaded:
        torch.testing.assert_close(own[name], src[name])


# -- detection on other data: categories, old checkpoints, stable metric set ---------------------------
def _renumbered_copy(root: Path, dst: Path, shift: int = 10) -> Path:
    """The same toy COCO data with every category id moved by ``shift`` (another dataset's ids)."""
    import shutil

    for split in ("train2017", "val2017"):
        shutil.copytree(root / split, dst / split)
        data = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
        for c in data["categories"]:
            c["id"] += shift
        for a in data["annotations"]:
            a["category_id"] += shift
        (dst / "annotations").mkdir(parents=True, exist_ok=True)
        (dst / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return dst


@pytest.mark.slow
def test_category_mismatch_exits_nonzero_naming_ids_unless_mapped(
    det_run: tuple[Path, Path], tmp_path: Path, hydra_cleanup: None
) -> None:
    run_dir, root = det_run
    ckpt = best_ckpt(run_dir)
    other = _renumbered_copy(root, tmp_path / "other")
    cmd = [
        sys.executable,
        "tools/eval.py",
        f"ckpt_path={ckpt}",
        f"data.root={other}",
        "data.num_workers=0",
        f"output_dir={tmp_path / 'refused'}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    err = proc.stderr + proc.stdout
    assert "ids only in the checkpoint [1, 3, 5, 7, 9]" in err, err[-2000:]
    assert "ids only in the data [11, 13, 15, 17, 19]" in err, err[-2000:]
    assert not (tmp_path / "refused" / "metrics.json").exists()
    # an explicit map scores the renumbered data exactly as the original ids score the original data
    same = run_eval(eval_cfg(ckpt, tmp_path / "same", tmp_path))
    mapped = run_eval(
        eval_cfg(
            ckpt,
            tmp_path / "mapped",
            tmp_path,
            f"data.root={other}",
            "category_map={1: 11, 3: 13, 5: 15, 7: 17, 9: 19}",
        )
    )
    assert mapped == same
    results = json.loads((tmp_path / "mapped" / "coco_results.json").read_text())
    assert results and {r["category_id"] for r in results} <= {11, 13, 15, 17, 19}
    # a partial map drops the unmapped classes' detections (and says so)
    with pytest.warns(UserWarning, match=r"leaves checkpoint categories \[5, 7, 9\] unmapped"):
        run_eval(
            eval_cfg(ckpt, tmp_path / "part", tmp_path, f"data.root={other}", "category_map={1: 11, 3: 13}")
        )
    part = json.loads((tmp_path / "part" / "coco_results.json").read_text())
    assert {r["category_id"] for r in part} <= {11, 13}
    with pytest.raises(ValueError, match=r"category_map values \[99\] are not category ids"):
        run_eval(eval_cfg(ckpt, tmp_path / "bad", tmp_path, f"data.root={other}", "category_map={1: 99}"))


def test_checkpoint_with_a_one_conv_rpn_loads_and_evaluates(
    det_run: tuple[Path, Path], tmp_path: Path, hydra_cleanup: None
) -> None:
    """Checkpoints written before rpn_conv_depth existed (torchvision's 1-conv RPN) still evaluate;
    a conv count that contradicts the stored config is an error naming the setting."""
    import torch

    from siglip_dense.checkpoints import load_task

    run_dir, _ = det_run
    raw = torch.load(best_ckpt(run_dir), map_location="cpu", weights_only=True)
    assert "model.rpn.head.conv.1.0.weight" in raw["state_dict"]  # the recipes' ViTDet RPN: 2 convs
    raw["state_dict"] = {
        k: v for k, v in raw["state_dict"].items() if not k.startswith("model.rpn.head.conv.1.")
    }
    contradicting = tmp_path / "contradicting.ckpt"
    torch.save(raw, contradicting)
    with pytest.raises(ValueError, match=r"RPN head has 1 conv\(s\).*rpn_conv_depth=1"):
        load_task(contradicting)
    raw["hyper_parameters"]["detector"].pop("rpn_conv_depth")
    raw["hyper_parameters"]["detector"].pop("test_protocol")
    old = tmp_path / "epoch_old.ckpt"
    torch.save(raw, old)
    task = load_task(old)
    assert len(task.model.rpn.head.conv) == 1
    torch.testing.assert_close(
        task.model.rpn.head.conv[0][0].weight, raw["state_dict"]["model.rpn.head.conv.0.0.weight"]
    )
    metrics = run_eval(eval_cfg(old, tmp_path / "old", tmp_path))
    assert set(metrics) == set(json.loads((run_dir / "metrics.json").read_text()))


def test_console_summary_and_metrics_json_read_the_same(det_run: tuple[Path, Path], tmp_path: Path) -> None:
    from siglip_dense.checkpoints import load_task
    from siglip_dense.evaluation.coco_eval import evaluate_coco

    task = load_task(best_ckpt(det_run[0]))
    gt = json.loads((det_run[1] / "annotations" / "instances_val2017.json").read_text())
    gt["annotations"] = [a for a in gt["annotations"] if a["area"] > 32**2 or a["iscrowd"]]  # no small ones
    metrics = evaluate_coco(gt, [], ("bbox", "segm"))
    text = task.summarize(metrics)
    written = json.loads(json.dumps(metrics))
    for prefix in ("bbox", "segm"):
        line = next(ln for ln in text.splitlines() if ln.startswith(prefix))
        for name in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
            value = written[f"{prefix}_{name}"]
            shown = line.split(f"{name} ", 1)[1].split()[0]
            assert shown == ("null" if value is None else f"{100 * value:.1f}"), (prefix, name, shown)
    assert written["bbox_APs"] is None and written["bbox_AP"] == 0.0


def _val_variant(root: Path, dst: Path, edit: str) -> Path:
    """The toy val json with its categories edited: ``swapped`` names of ids 1↔3 (labels follow the
    names), ``subset`` without category 9, ``otherids`` every id +10."""
    data = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    if edit == "swapped":
        swap = {1: 3, 3: 1}
        names = {c["id"]: c["name"] for c in data["categories"]}
        for c in data["categories"]:
            c["name"] = names[swap.get(c["id"], c["id"])]
        for a in data["annotations"]:
            a["category_id"] = swap.get(a["category_id"], a["category_id"])
    elif edit == "subset":
        data["categories"] = [c for c in data["categories"] if c["id"] != 9]
        data["annotations"] = [a for a in data["annotations"] if a["category_id"] != 9]
    else:
        for c in data["categories"]:
            c["id"] += 10
        for a in data["annotations"]:
            a["category_id"] += 10
    dst.write_text(json.dumps(data))
    return dst


def test_eval_binds_categories_of_the_evaluated_json_not_the_training_json(
    det_run: tuple[Path, Path], tmp_path: Path, hydra_cleanup: None
) -> None:
    """``+data.val_ann=`` with the training json still present: the check reads the evaluated json."""
    run_dir, root = det_run
    ckpt = best_ckpt(run_dir)
    swapped = _val_variant(root, tmp_path / "val_swapped.json", "swapped")
    cmd = [
        sys.executable,
        "tools/eval.py",
        f"ckpt_path={ckpt}",
        f"+data.val_ann={swapped}",
        "data.num_workers=0",
        f"output_dir={tmp_path / 'swapped'}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    err = proc.stderr + proc.stdout
    assert proc.returncode != 0 and str(swapped) in err, err[-2000:]
    assert "1: 'ball' in the checkpoint, 'box' in the data" in err, err[-2000:]
    assert "3: 'box' in the checkpoint, 'ball' in the data" in err, err[-2000:]
    assert "category_map='{1: 3, 3: 1, 5: 5, 7: 7, 9: 9}'" in err, err[-2000:]  # matched by name
    assert not (tmp_path / "swapped" / "metrics.json").exists()

    subset = _val_variant(root, tmp_path / "val_subset.json", "subset")
    with pytest.raises(ValueError, match=r"ids only in the checkpoint \[9\], ids only in the data \[\]"):
        run_eval(eval_cfg(ckpt, tmp_path / "subset", tmp_path, f"+data.val_ann={subset}"))
    # a subset mapped explicitly scores as pycocotools scores the model's detections on that json
    same = run_eval(eval_cfg(ckpt, tmp_path / "same", tmp_path))
    # the swapped json mapped by name is the original data relabelled: the same mean APs
    by_name = run_eval(
        eval_cfg(
            ckpt,
            tmp_path / "by_name",
            tmp_path,
            f"+data.val_ann={swapped}",
            "category_map={1: 3, 3: 1, 5: 5, 7: 7, 9: 9}",
        )
    )
    assert by_name.keys() == same.keys()
    for key, value in same.items():
        assert by_name[key] is None if value is None else by_name[key] == pytest.approx(value, abs=1e-12), key
    with pytest.warns(UserWarning, match=r"leaves checkpoint categories \[9\] unmapped"):
        part = run_eval(
            eval_cfg(
                ckpt,
                tmp_path / "part",
                tmp_path,
                f"+data.val_ann={subset}",
                "category_map={1: 1, 3: 3, 5: 5, 7: 7}",
            )
        )
    results = json.loads((tmp_path / "part" / "coco_results.json").read_text())
    assert {r["category_id"] for r in results} <= {1, 3, 5, 7}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(subset))
        if results:
            ev = COCOeval(gt, gt.loadRes(results), "bbox")
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            assert part["bbox_AP"] == pytest.approx(max(float(ev.stats[0]), 0.0), abs=1e-12)

    other = _val_variant(root, tmp_path / "val_otherids.json", "otherids")
    with pytest.raises(
        ValueError, match=r"ids only in the checkpoint \[1, 3, 5, 7, 9\], ids only in the data \[11"
    ):
        run_eval(eval_cfg(ckpt, tmp_path / "other", tmp_path, f"+data.val_ann={other}"))
    mapped = run_eval(
        eval_cfg(
            ckpt,
            tmp_path / "mapped",
            tmp_path,
            f"+data.val_ann={other}",
            "category_map={1: 11, 3: 13, 5: 15, 7: 17, 9: 19}",
        )
    )
    assert mapped == same
