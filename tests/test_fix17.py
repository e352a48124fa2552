"""Issue 17 follow-ups: resuming another task set, monitors checked before training, the app's
return value, configs naming data that is not there or classes by their old paths."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from siglip_dense.checkpoints import load_model
from siglip_dense.train import build_task
from tests.conftest import compose_train_cfg

LEGACY = Path(__file__).parent / "data" / "legacy"
FAST = ["data.num_workers=0", "num_vis=0", "trainer.max_epochs=1", "+trainer.limit_train_batches=1"]


def _ckpt(name: str) -> dict:
    return torch.load(LEGACY / f"{name}.ckpt", map_location="cpu", weights_only=True)


def _build(overrides: list[str], tmp_path: Path) -> tuple[L.LightningModule, L.LightningDataModule]:
    cfg = compose_train_cfg([*overrides, *FAST], tmp_path / "run", data_dir=tmp_path / "data")
    GlobalHydra.instance().clear()
    datamodule = instantiate(cfg.data, _convert_="all")
    return build_task(cfg, datamodule), datamodule


# -- 1. a checkpoint of other tasks ---------------------------------------------------------------------
@pytest.mark.slow
def test_resume_seg_depth_checkpoint_with_seg_depth_det_config_names_file_tasks_and_fix(
    tmp_path: Path,
) -> None:
    """The seg+depth toy_multitask checkpoint (written at d887177) resumed by today's seg+depth+det."""
    task, datamodule = _build(["experiment=toy_multitask"], tmp_path)
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
