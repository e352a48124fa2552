"""Issue 17 follow-ups: resuming another task set, monitors checked before training, the app's
return value, configs naming data that is not there or classes by their old paths."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from siglip_dense.checkpoints import load_model
from siglip_dense.cli import monitored_metric, train_app
from siglip_dense.train import build_task, run_train
from tests.conftest import compose_train_cfg

LEGACY = Path(__file__).parent / "data" / "legacy"
FAST = ["data.num_workers=0", "num_vis=0", "trainer.max_epochs=1", "+trainer.limit_train_batches=1"]


def _ckpt(name: str) -> dict:
    return torch.load(LEGACY / f"{name}.ckpt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One toy data folder for the module's multi-task runs (generated on first use)."""
    return tmp_path_factory.mktemp("fix17_data")


def _build(
    overrides: list[str], tmp_path: Path, data_dir: Path
) -> tuple[L.LightningModule, L.LightningDataModule]:
    cfg = compose_train_cfg([*overrides, *FAST], tmp_path / "run", data_dir=data_dir)
    GlobalHydra.instance().clear()
    datamodule = instantiate(cfg.data, _convert_="all")
    return build_task(cfg, datamodule), datamodule


# -- 1. a checkpoint of other tasks ---------------------------------------------------------------------
@pytest.mark.slow
def test_resume_seg_depth_checkpoint_with_seg_depth_det_config_names_file_tasks_and_fix(
    tmp_path: Path, data_dir: Path
) -> None:
    """The seg+depth toy_multitask checkpoint (written at d887177) resumed by today's seg+depth+det."""
    task, datamodule = _build(["experiment=toy_multitask"], tmp_path, data_dir)
    trainer = L.Trainer(
        max_steps=1, logger=False, enable_checkpointing=False, accelerator="cpu", enable_progress_bar=False
    )
    ckpt = LEGACY / "multitask.ckpt"
    with pytest.raises(ValueError) as info:
        trainer.fit(task, datamodule=datamodule, ckpt_path=str(ckpt))
    message = str(info.value)
    assert str(ckpt) in message
    assert "tasks [seg (segmentation), depth (depth)]" in message
    assert "tasks [seg (segmentation), depth (depth), det (detection)]" in message
    assert "'~task.tasks.det' '~data.datamodules.det' '~task.loss_weights.det'" in message
    assert "trainer.gradient_clip_val=null" in message


def test_single_task_model_refuses_multitask_checkpoint_and_other_kind() -> None:
    seg = load_model(LEGACY / "seg.ckpt")
    with pytest.raises(
        ValueError,
        match=r"trained as a multi-task model with tasks \[seg \(segmentation\), "
        r"depth \(depth\)\], but the config builds a single-task segmentation model",
    ):
        seg.on_load_checkpoint(_ckpt("multitask"))
    det = load_model(LEGACY / "det.ckpt")
    with pytest.raises(
        ValueError,
        match="trained as a single-task segmentation model, but the config "
        "builds a single-task detection model",
    ):
        det.on_load_checkpoint(_ckpt("seg"))
    multi = load_model(LEGACY / "multitask.ckpt")
    with pytest.raises(ValueError, match="single-task detection model, but the config builds a multi-task"):
        multi.on_load_checkpoint(_ckpt("det"))
    multi.on_load_checkpoint(_ckpt("multitask"))  # the same tasks: no complaint


# -- 4. what the train app returns -----------------------------------------------------------------------
def test_monitor_null_metric_is_nan_with_warning() -> None:
    """A COCO size bucket without objects is null in metrics.json: NaN for the sweeper, no crash."""
    cfg = OmegaConf.create({"monitor": "val/det/bbox_APl"})
    with pytest.warns(UserWarning, match="val/det/bbox_APl is null"):
        value = monitored_metric(cfg, {"seg": {"mIoU": 0.5}, "det": {"bbox_APl": None}})
    assert math.isnan(value)


def test_monitor_of_a_logged_metric_is_its_last_value() -> None:
    cfg = OmegaConf.create({"monitor": "train/loss"})
    with pytest.warns(UserWarning, match="last logged value"):
        assert monitored_metric(cfg, {"mIoU": 0.5}, {"train/loss": 1.25, "val/mIoU": 0.5}) == 1.25


@pytest.mark.slow
def test_train_app_with_monitor_train_loss_returns_the_last_logged_loss(tmp_path: Path) -> None:
    """A complete run monitoring ``train/loss`` returns the loss of its last step (the CSV log's)."""
    from siglip_dense.data.toy import ensure_toy_data

    ensure_toy_data(tmp_path / "data" / "toy_seg", num_train=2, num_val=2)
    overrides = [
        *FAST,
        "data.batch_size=2",
        "monitor=train/loss",
        "monitor_mode=min",
        "trainer.log_every_n_steps=1",
    ]
    cfg = compose_train_cfg(overrides, tmp_path / "run", tmp_path / "data")
    with pytest.warns(UserWarning, match="last logged value"):
        value = train_app(cfg)
    (log,) = (tmp_path / "run").rglob("metrics.csv")
    rows = [r for r in csv.DictReader(log.open()) if r.get("train/loss")]
    assert isinstance(value, float) and value == pytest.approx(float(rows[-1]["train/loss"]), rel=1e-6)


# -- 3. the monitor is checked before training --------------------------------------------------------------
@pytest.mark.slow
def test_monitor_of_a_dropped_task_fails_before_training(tmp_path: Path, data_dir: Path) -> None:
    """toy_multitask without seg keeps monitor=val/seg/mIoU: refused before the first step."""
    drop = ["~task.tasks.seg", "~data.datamodules.seg", "~task.loss_weights.seg"]
    cfg = compose_train_cfg(["experiment=toy_multitask", *drop, *FAST], tmp_path / "run", data_dir)
    with pytest.raises(
        ValueError, match=r"monitor=val/seg/mIoU: there is no task 'seg' \(tasks: \['depth', 'det'\]\)"
    ) as info:
        run_train(cfg)
    assert "val/depth/abs_rel" in str(info.value) and "val/det/bbox_AP," in str(info.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_monitor_must_be_a_metric_the_task_logs() -> None:
    seg = load_model(LEGACY / "seg.ckpt")
    seg.check_monitor("val/mIoU")
    seg.check_monitor("train/loss")
    seg.check_monitor("step")
    for wrong in ("val/bbox_AP", "val/seg/mIoU"):
        with pytest.raises(
            ValueError, match=f"monitor={wrong}: this segmentation model logs no .*val/mIoU, val/aAcc"
        ):
            seg.check_monitor(wrong)
    multi = load_model(LEGACY / "multitask.ckpt")
    multi.check_monitor("val/depth/abs_rel")
    multi.check_monitor("train/seg/loss")
    with pytest.raises(ValueError, match="task depth logs no 'mIoU'"):
        multi.check_monitor("val/depth/mIoU")
    with pytest.raises(ValueError, match="there is no task 'det'"):
        multi.check_monitor("train/det/loss")


# -- 5. configs naming data that is not there, or classes by their old paths ---------------------------------
def test_task_without_data_member_is_named_before_interpolation(tmp_path: Path) -> None:
    """'~data.datamodules.det' alone: not OmegaConf's 'data.datamodules.det.image_size' not found."""
    cfg = compose_train_cfg(["experiment=toy_multitask", "~data.datamodules.det", *FAST], tmp_path / "run")
    with pytest.raises(ValueError) as info:
        run_train(cfg)
    message = str(info.value)
    assert (
        "task.tasks: ['seg', 'depth', 'det']" in message and "data.datamodules: ['seg', 'depth']" in message
    )
    assert "task det has no data: drop the task too ('~task.tasks.det' '~task.loss_weights.det')" in message
    cfg = compose_train_cfg(
        ["experiment=toy_multitask", "~task.tasks.det", "~task.loss_weights.det", *FAST], tmp_path / "run"
    )
    with pytest.raises(
        ValueError, match=r"data.datamodules.det has no task: drop it \('~data.datamodules.det'\)"
    ):
        run_train(cfg)


def test_old_data_target_is_upgraded_with_a_warning(tmp_path: Path) -> None:
    from siglip_dense.cli import upgrade_legacy_targets
    from siglip_dense.data.segmentation import SegDataModule

    old = "siglip_dense.data.datamodule.SegDataModule"
    cfg = compose_train_cfg([f"data._target_={old}", *FAST], tmp_path / "run", tmp_path / "data")
    GlobalHydra.instance().clear()
    with pytest.warns(
        FutureWarning, match=f"data._target_: {old} moved to siglip_dense.data.segmentation.SegDataModule"
    ):
        assert upgrade_legacy_targets(cfg) == [
            ("data._target_", old, "siglip_dense.data.segmentation.SegDataModule")
        ]
    assert get_class(cfg.data._target_) is SegDataModule


@pytest.mark.slow
def test_train_app_runs_a_recipe_naming_the_old_data_target(tmp_path: Path) -> None:
    from siglip_dense.data.toy import ensure_toy_data

    ensure_toy_data(tmp_path / "data" / "toy_seg", num_train=2, num_val=2)
    overrides = [*FAST, "data.batch_size=2", "data._target_=siglip_dense.data.datamodule.SegDataModule"]
    cfg = compose_train_cfg(overrides, tmp_path / "run", tmp_path / "data")
    with pytest.warns(FutureWarning, match="siglip_dense.data.datamodule.SegDataModule moved"):
        value = train_app(cfg)
    assert value == json.loads((tmp_path / "run" / "metrics.json").read_text())["mIoU"]
