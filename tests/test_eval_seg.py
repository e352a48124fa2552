"""Segmentation checkpoints in use: eval.py, saved predictions, export + load_model, predict.py.

The saved PNGs are re-scored by an independent numpy confusion matrix over the annotation files, so
the predictions on disk, not just the logged numbers, carry the reported mIoU.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from siglip_dense import load_model
from siglip_dense.checkpoints import CheckpointFormatError, export, load_task, read_meta
from siglip_dense.data.io import DataError
from siglip_dense.evaluate import run_eval
from siglip_dense.tasks.segmentation import SegmentationTask
from siglip_dense.train import run_train
from tests.conftest import compose_cfg, compose_train_cfg

REPO = Path(__file__).resolve().parents[1]
SHORT = [
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=3",
    "data.num_workers=0",
    "data.batch_size=4",
    "num_vis=0",
]


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory: pytest.TempPathFactory, toy_data_root: Path) -> Path:
    run_dir = tmp_path_factory.mktemp("segeval") / "run"
    cfg = compose_train_cfg(["experiment=toy_seg", *SHORT], run_dir, data_dir=toy_data_root.parent)
    run_train(cfg)
    return run_dir


def best_ckpt(run_dir: Path) -> Path:
    return next((run_dir / "checkpoints").glob("epoch_*.ckpt"))


def numpy_miou(pred_dir: Path, ann_dir: Path, num_classes: int) -> tuple[float, float]:
    """mIoU / aAcc from PNG files: ADE values (0 = ignore, c + 1 = class c) on both sides."""
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    for ann_path in sorted(ann_dir.glob("*.png")):
        gt = np.asarray(Image.open(ann_path)).astype(np.int64) - 1
        pred = np.asarray(Image.open(pred_dir / ann_path.name)).astype(np.int64) - 1
        assert pred.shape == gt.shape, ann_path.name
        valid = gt >= 0
        conf += np.bincount(gt[valid] * num_classes + pred[valid], minlength=num_classes**2).reshape(
            num_classes, num_classes
        )
    inter = np.diag(conf).astype(float)
    union = conf.sum(0) + conf.sum(1) - inter
    return float(np.mean(inter[union > 0] / union[union > 0])), float(inter.sum() / conf.sum())


def test_eval_matches_training_metrics_and_saved_pngs(
    seg_run: Path, toy_data_root: Path, tmp_path: Path, hydra_cleanup: None
) -> None:
    out = tmp_path / "eval"
    overrides = [f"ckpt_path={best_ckpt(seg_run)}", "data.num_workers=0", "save_predictions=true"]
    cfg = compose_cfg("eval", [*overrides, f"output_dir={out}"], tmp_path / "hydra")
    metrics = run_eval(cfg)
    trained = json.loads((seg_run / "metrics.json").read_text())
    assert metrics["mIoU"] == pytest.approx(trained["mIoU"], abs=1e-6)
    assert json.loads((out / "metrics.json").read_text())["aAcc"] == pytest.approx(trained["aAcc"], abs=1e-6)
    num_classes = len(trained["per_class_IoU"])
    miou, aacc = numpy_miou(out / "predictions", toy_data_root / "annotations" / "validation", num_classes)
    assert miou == pytest.approx(metrics["mIoU"], abs=1e-6)
    assert aacc == pytest.approx(metrics["aAcc"], abs=1e-6)


def test_eval_refuses_data_with_other_classes(seg_run: Path, tmp_path: Path, hydra_cleanup: None) -> None:
    root = tmp_path / "other"
    (root / "images" / "validation").mkdir(parents=True)
    (root / "annotations" / "validation").mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "images" / "validation" / "a.jpg")
    Image.fromarray(np.ones((32, 32), np.uint8)).save(root / "annotations" / "validation" / "a.png")
    (root / "classes.txt").write_text("x\ny\n")
    cfg = compose_cfg(
        "eval", [f"ckpt_path={best_ckpt(seg_run)}", f"data.root={root}", "data.num_workers=0"], tmp_path / "h"
    )
    with pytest.raises(ValueError, match="2 .*classes|classes.*2"):
        run_eval(cfg)


def test_export_and_load_model_predict_like_the_checkpoint(seg_run: Path, tmp_path: Path) -> None:
    ckpt = best_ckpt(seg_run)
    out = export(ckpt, tmp_path / "export")
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json"}
    assert read_meta(out)["task"] == "segmentation"
    a, b = load_task(ckpt), load_model(str(out))
    rgb = np.random.default_rng(0).integers(0, 256, size=(97, 143, 3), dtype=np.uint8)
    pa, pb = a.predict([rgb])[0], b.predict([rgb])[0]
    assert pa.shape == (97, 143)
    np.testing.assert_array_equal(pa, pb)
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


@pytest.mark.slow
def test_predict_tool_handles_gray_rgba_and_odd_sizes(seg_run: Path, tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (50, 77), dtype=np.uint8), "L").save(src / "gray.png")
    Image.fromarray(rng.integers(0, 256, (61, 40, 4), dtype=np.uint8), "RGBA").save(src / "rgba.png")
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "tools/predict.py",
        f"ckpt_path={best_ckpt(seg_run)}",
        f"input={src}",
        f"output={out}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert np.asarray(Image.open(out / "gray.png.png")).shape == (50, 77)
    assert np.asarray(Image.open(out / "rgba.png.png")).shape == (61, 40)
    assert (out / "gray.png_vis.png").stat().st_size > 0


def test_init_from_another_backbone_variant_is_refused(seg_run: Path) -> None:
    hp = torch.load(best_ckpt(seg_run), map_location="cpu", weights_only=True)["hyper_parameters"]
    arch = dict(hp["backbone"]["arch_config"], embed_dim=96, num_heads=2, mlp_dim=384, arch=None)
    hp["backbone"] = dict(hp["backbone"], arch_config=arch)
    hp["init_from"] = str(best_ckpt(seg_run))
    with pytest.raises(
        CheckpointFormatError, match=r"vit_tiny_patch16_siglip_128.*'embed_dim': 192.*'embed_dim': 96"
    ):
        SegmentationTask(**hp)


def test_not_a_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "random.ckpt"
    torch.save({"weights": torch.zeros(2)}, bad)
    with pytest.raises(CheckpointFormatError, match="random.ckpt"):
        load_task(bad)


@pytest.mark.parametrize("kind", ["under a file", "no permission"])
def test_eval_refuses_an_unwritable_output_dir_before_evaluating(
    seg_run: Path, tmp_path: Path, hydra_cleanup: None, kind: str
) -> None:
    """An output_dir that cannot be written is refused first, naming it: the data root here does not
    exist, so an evaluation that started would stop on the data instead (and, with data, would run to
    the end and then lose its metrics)."""
    if kind == "under a file":
        (tmp_path / "notes.txt").write_text("a file, not a folder")
        out = tmp_path / "notes.txt" / "eval"
    elif os.geteuid() != 0:
        (tmp_path / "locked").mkdir(mode=0o555)
        out = tmp_path / "locked" / "eval"
    else:  # root writes through permission bits; sysfs refuses new entries to everyone
        out = Path("/sys/siglip_dense_eval")
    over = [f"ckpt_path={best_ckpt(seg_run)}", f"output_dir={out}", f"data.root={tmp_path / 'no_data'}"]
    with pytest.raises(
        DataError, match=rf"output_dir={re.escape(str(out))} is not writable .*nothing was evaluated"
    ):
        run_eval(compose_cfg("eval", over, tmp_path / "h"))


def test_eval_prints_the_metrics_before_writing_them(
    seg_run: Path,
    toy_data_root: Path,
    tmp_path: Path,
    hydra_cleanup: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A write that fails after the evaluation (here metrics.json is taken by a folder) still leaves
    the numbers on the console."""
    out = tmp_path / "eval"
    (out / "metrics.json").mkdir(parents=True)
    over = [f"ckpt_path={best_ckpt(seg_run)}", f"output_dir={out}", f"data.root={toy_data_root}"]
    with pytest.raises(IsADirectoryError):
        run_eval(compose_cfg("eval", [*over, "data.num_workers=0"], tmp_path / "h"))
    assert re.search(r"mIoU: \d+\.\d\d", capsys.readouterr().out)  # format_seg_table, in percent


@pytest.mark.slow
def test_eval_tool_fails_loudly_on_a_missing_checkpoint(tmp_path: Path) -> None:
    missing = tmp_path / "nope.ckpt"
    cmd = [sys.executable, "tools/eval.py", f"ckpt_path={missing}", f"hydra.run.dir={tmp_path / 'h'}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "nope.ckpt" in proc.stdout + proc.stderr


@pytest.mark.parametrize("scan", ["true", "false"])
def test_eval_skip_bad_equals_eval_without_the_bad_image(
    seg_run: Path, toy_data_root: Path, tmp_path: Path, hydra_cleanup: None, scan: str
) -> None:
    """skip_bad leaves a bad validation image out of the metric (never scores another image twice):
    the same metrics as the data with that image removed, and the skip counted in metrics.json.
    scan=false: the image fails in the loader and is dropped from its batch."""
    skip_root = Path(shutil.copytree(toy_data_root, tmp_path / "skip"))
    drop_root = Path(shutil.copytree(toy_data_root, tmp_path / "drop"))
    bad = sorted((skip_root / "images" / "validation").iterdir())[1]
    bad.write_bytes(b"not an image")
    (drop_root / "images" / "validation" / bad.name).unlink()
    (drop_root / "annotations" / "validation" / f"{bad.stem}.png").unlink()

    def evaluate(root: Path, *extra: str) -> dict:
        overrides = [f"ckpt_path={best_ckpt(seg_run)}", f"data.root={root}", "data.num_workers=0", *extra]
        return run_eval(compose_cfg("eval", [*overrides, f"output_dir={root}_eval"], root.parent / "h"))

    with pytest.warns(UserWarning, match=re.escape(bad.name)):
        skipped = evaluate(skip_root, "data.skip_bad=true", f"+data.scan={scan}")
    dropped = evaluate(drop_root)
    assert skipped.pop("skipped") == 1 and skipped.pop("skipped_files") == [str(bad)]
    assert json.dumps(skipped, sort_keys=True) == json.dumps(dropped, sort_keys=True)
    assert json.loads((tmp_path / "skip_eval" / "metrics.json").read_text())["skipped"] == 1
