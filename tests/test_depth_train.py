"""Depth end to end on toy NYUv2-layout data: fast_dev_run, contract files, checkpoint reload, recipes."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from siglip_dense.data.depth import DepthDataModule
from siglip_dense.data.toy import ensure_toy_data
from siglip_dense.evaluation.depth_metrics import DEPTH_METRIC_KEYS
from siglip_dense.tasks.depth import DepthTask
from siglip_dense.train import build_task, run_train
from tests.conftest import CONFIG_DIR, compose_train_cfg

NUM_TRAIN, NUM_VAL = 12, 4
SMALL_DATA = [f"data.toy_num_train={NUM_TRAIN}", f"data.toy_num_val={NUM_VAL}", "data.num_workers=0"]
SHORT = [
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=3",
    "+trainer.limit_val_batches=3",
    "data.batch_size=4",
    "num_vis=2",
]
# the depth recipes (nyu_dpt_*, nyu_linear_*); nyu_normals_* are the normals task's (tests/test_normals.py)
NYU_RECIPES = sorted(
    p.stem for p in (CONFIG_DIR / "experiment").glob("nyu_*.yaml") if not p.stem.startswith("nyu_normals")
)


@pytest.fixture(scope="session")
def toy_depth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small toy dataset in the NYUv2 layout where experiment=toy_depth looks for it."""
    return ensure_toy_data(
        tmp_path_factory.mktemp("depthdata") / "toy_depth", num_train=NUM_TRAIN, num_val=NUM_VAL, layout="nyu"
    )


def test_fast_dev_run(tmp_path: Path, toy_depth_root: Path, hydra_cleanup: None) -> None:
    overrides = ["experiment=toy_depth", "debug=fdr", *SMALL_DATA]
    cfg = compose_train_cfg(overrides, tmp_path / "run", data_dir=toy_depth_root.parent)
    assert cfg.monitor == "val/abs_rel" and cfg.monitor_mode == "min"
    run_train(cfg)
    assert (tmp_path / "run" / "config.yaml").exists()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory, toy_depth_root: Path) -> Path:
    run_dir = tmp_path_factory.mktemp("depth") / "run"
    cfg = compose_train_cfg(
        ["experiment=toy_depth", *SMALL_DATA, *SHORT], run_dir, data_dir=toy_depth_root.parent
    )
    metrics = run_train(cfg)
    assert set(metrics) >= set(DEPTH_METRIC_KEYS)
    return run_dir


def test_run_writes_contract_files(trained_run: Path) -> None:
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert set(metrics) >= set(DEPTH_METRIC_KEYS)
    assert metrics["num_images"] == 3  # limit_val_batches=3 at one image per batch
    for key in ("delta1", "delta2", "delta3"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["delta1"] <= metrics["delta2"] <= metrics["delta3"]
    assert metrics["abs_rel"] > 0 and metrics["rmse"] > 0
    assert (trained_run / "predictions.png").stat().st_size > 0
    assert (trained_run / "checkpoints" / "last.ckpt").exists()


def test_checkpoint_reload_gives_identical_predictions(trained_run: Path) -> None:
    ckpt_path = trained_run / "checkpoints" / "last.ckpt"
    raw = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    meta = raw["siglip_dense"]
    assert meta["task"] == "depth" and meta["arch"] == "vit_tiny_patch16_siglip_128"
    assert meta["min_depth"] == pytest.approx(1e-3) and meta["max_depth"] == 10.0
    assert meta["eval_crop"] == "eigen"
    assert raw["hyper_parameters"]["backbone"]["checkpoint"] is None
    task = DepthTask.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True).eval()
    assert (task.min_depth, task.max_depth, task.eval_crop) == (1e-3, 10.0, "eigen")
    state = {k.removeprefix("model."): v for k, v in raw["state_dict"].items() if k.startswith("model.")}
    again = DepthTask(**raw["hyper_parameters"]).eval()
    again.model.load_state_dict(state)
    x = torch.randn(2, 3, 150, 203)
    with torch.no_grad():
        a, b = task.predict_depth(x), again.predict_depth(x)
    assert a.shape == (2, 150, 203)
    assert (a >= 1e-3).all() and (a <= 10.0).all()
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_data_decides_the_protocol(tmp_path: Path, toy_depth_root: Path, hydra_cleanup: None) -> None:
    """max_depth / eval_crop come from the data config unless the task config fixes them."""
    overrides = ["experiment=toy_depth", *SMALL_DATA, "data.max_depth=80", "data.eval_crop=garg"]
    cfg = compose_train_cfg(overrides, tmp_path / "run", data_dir=toy_depth_root.parent)
    dm = instantiate(cfg.data, _convert_="all")
    task = build_task(cfg, dm)
    assert (task.max_depth, task.eval_crop) == (80.0, "garg")
    assert task.model.head.max_depth == 80.0 and task.val_metric.crop == "garg"
    cfg = compose_train_cfg(
        [*overrides, "task.max_depth=20"], tmp_path / "run", data_dir=toy_depth_root.parent
    )
    assert build_task(cfg, instantiate(cfg.data, _convert_="all")).max_depth == 20.0


@pytest.mark.parametrize("experiment", NYU_RECIPES)
def test_nyu_recipe_composes(experiment: str, tmp_path: Path, hydra_cleanup: None) -> None:
    cfg = compose_train_cfg([f"experiment={experiment}"], tmp_path / "run")
    assert cfg.monitor == "val/abs_rel" and cfg.monitor_mode == "min"
    assert cfg.task._target_ == "siglip_dense.tasks.depth.DepthTask" and cfg.task.neck is None
    patch = 14 if "14" in experiment else 16
    assert cfg.data.crop_size[0] % patch == 0 and cfg.data.crop_size[1] % patch == 0


@pytest.mark.parametrize("experiment", ["nyu_dpt_so400m14", "nyu_linear_so400m14", "nyu_dpt_b16"])
def test_nyu_recipe_instantiates_on_meta(
    experiment: str, tmp_path: Path, toy_depth_root: Path, hydra_cleanup: None
) -> None:
    """Published recipes: full-size model on the meta device, data module for real (toy NYUv2 layout)."""
    overrides = [f"experiment={experiment}", "backbone.checkpoint=null", f"data.root={toy_depth_root}"]
    cfg = compose_train_cfg(overrides, tmp_path / "run")
    dm = instantiate(cfg.data, _convert_="all")
    assert isinstance(dm, DepthDataModule) and isinstance(dm, L.LightningDataModule)
    with torch.device("meta"):
        task = build_task(cfg, dm)
    assert task.backbone.arch == cfg.backbone.arch
    assert (task.min_depth, task.max_depth, task.eval_crop) == (1e-3, 10.0, "eigen")
    if cfg.task.get("freeze_backbone"):
        assert not any(p.requires_grad for p in task.backbone.parameters())
    else:
        assert task.model.head.patch_size == task.backbone.patch_size
