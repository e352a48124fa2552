"""toy_det end to end through train.py's job: fast_dev_run, and a short run's contract files + reload."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from siglip_dense.tasks.detection import DetectionTask
from siglip_dense.train import run_train
from tests.conftest import compose_train_cfg
from tests.test_coco_data import toy_coco_root  # noqa: F401 - shared session fixture

SMALL = [
    "data.num_workers=0",
    "data.batch_size=2",
    "data.image_size=128",
    "task.detector.rpn_post_nms_top_n_test=50",
    "task.detector.box_detections_per_img=20",
]


def test_fast_dev_run_toy_det(tmp_path: Path, toy_coco_root: Path, hydra_cleanup: None) -> None:  # noqa: F811
    cfg = compose_train_cfg(
        ["experiment=toy_det", "debug=fdr", *SMALL], tmp_path / "run", data_dir=toy_coco_root.parent
    )
    assert cfg.monitor == "val/bbox_AP" and cfg.monitor_mode == "max"
    run_train(cfg)
    assert (tmp_path / "run" / "config.yaml").exists()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_short_run_writes_metrics_results_and_a_self_describing_checkpoint(
    tmp_path: Path,
    toy_coco_root: Path,  # noqa: F811
    hydra_cleanup: None,
) -> None:
    run_dir = tmp_path / "run"
    overrides = [
        "experiment=toy_det",
        *SMALL,
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=2",
        "+trainer.limit_val_batches=2",
        "num_vis=1",
    ]
    cfg = compose_train_cfg(overrides, run_dir, data_dir=toy_coco_root.parent)
    metrics = run_train(cfg)
    keys = {f"{p}_{k}" for p in ("bbox", "segm") for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")}
    assert set(metrics) == keys
    assert all(v is None or 0.0 <= v <= 1.0 for v in metrics.values())
    assert json.loads((run_dir / "metrics.json").read_text()) == metrics
    assert (run_dir / "predictions.png").stat().st_size > 0

    # the results file is plain COCO: re-scored on the evaluated images it gives the reported numbers
    results = json.loads((run_dir / "coco_results.json").read_text())
    ann = toy_coco_root / "annotations" / "instances_val2017.json"
    if results:
        assert {r["category_id"] for r in results} <= {1, 3, 5, 7, 9}
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO(str(ann))
            ev = COCOeval(gt, gt.loadRes(str(run_dir / "coco_results.json")), "bbox")
            ev.params.imgIds = sorted(gt.getImgIds())[:2]
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        assert metrics["bbox_AP"] == pytest.approx(max(float(ev.stats[0]), 0.0), abs=1e-12)

    ckpt = run_dir / "checkpoints" / "last.ckpt"
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    meta = raw["siglip_dense"]
    assert meta["task"] == "detection" and meta["category_ids"] == [1, 3, 5, 7, 9]
    assert meta["class_names"] == ["ball", "box", "cone", "ring", "flag"]
    assert meta["label_to_category_id"] == {"0": 1, "1": 3, "2": 5, "3": 7, "4": 9}
    task = DetectionTask.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).eval()
    assert task.category_ids == [1, 3, 5, 7, 9]
    again = DetectionTask(**raw["hyper_parameters"]).eval()
    again.load_state_dict(raw["state_dict"])
    x = [torch.randn(3, 100, 140)]
    a, b = task.detect(x)[0], again.detect(x)[0]
    torch.testing.assert_close(a["boxes"], b["boxes"], rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["b16", "l16", "so400m14", "so400m16", "g16"])
def test_coco_recipes_build_on_meta(
    variant: str,
    tmp_path: Path,
    toy_coco_root: Path,  # noqa: F811
    hydra_cleanup: None,
) -> None:
    """Full-size ViTDet Mask R-CNN recipes: shapes only (meta device), classes from a COCO-layout json."""
    from hydra.utils import instantiate

    from siglip_dense.train import build_task

    overrides = [
        f"experiment=coco_maskrcnn_vitdet_{variant}",
        "backbone.checkpoint=null",
        f"data.root={toy_coco_root}",
    ]
    cfg = compose_train_cfg(overrides, tmp_path / "run")
    assert (
        cfg.monitor == "val/bbox_AP"
        and cfg.task.optimizer.lr == 1e-4
        and cfg.task.optimizer.weight_decay == 0.1
    )
    dm = instantiate(cfg.data, _convert_="all")
    with torch.device("meta"):
        task = build_task(cfg, dm)
    assert task.category_ids == [1, 3, 5, 7, 9] and task.has_masks
    pyramid = task.model.backbone
    assert list(pyramid.strides) == ["p2", "p3", "p4", "p5", "p6"]
    assert task.model.transform.size_divisible == pyramid.size_divisibility
    assert cfg.data.image_size % task.backbone.patch_size == 0
