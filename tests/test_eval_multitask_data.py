"""tools/eval.py's data overrides on a multi-task checkpoint: per task, as ``data.datamodules.<name>.*``."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra.utils import instantiate

from siglip_dense.evaluate import eval_data_config
from tests.conftest import compose_cfg


def _multitask_checkpoint_data(root: Path) -> dict:
    """The data config a toy_multitask checkpoint stores (members with their toy roots)."""
    seg = {"_target_": "siglip_dense.data.segmentation.SegDataModule", "root": str(root / "seg"), "toy": True}
    depth = {"_target_": "siglip_dense.data.depth.DepthDataModule", "root": str(root / "nyu"), "toy": True}
    return {
        "_target_": "siglip_dense.data.multitask.MultiTaskDataModule",
        "_recursive_": False,
        "datamodules": {"seg": {**seg, "crop_size": [64, 64]}, "depth": {**depth, "crop_size": [64, 64]}},
    }


def test_member_root_override_reaches_that_member_only(tmp_path: Path, hydra_cleanup: None) -> None:
    checkpoint = SimpleNamespace(data_config=_multitask_checkpoint_data(tmp_path))
    new_root = tmp_path / "real_ade"
    cfg = compose_cfg("eval", ["ckpt_path=x.ckpt", f"data.datamodules.seg.root={new_root}"], tmp_path / "h")
    data = eval_data_config(cfg, checkpoint)
    assert data["datamodules"]["seg"]["root"] == str(new_root) and data["datamodules"]["seg"]["toy"] is False
    assert data["datamodules"]["depth"] == _multitask_checkpoint_data(tmp_path)["datamodules"]["depth"]
    # the member resolves its root itself: a missing one is named by its member key
    with pytest.raises(Exception, match=rf"data\.datamodules\.seg\.root {new_root} does not exist"):
        instantiate(data, _convert_="all")


def test_top_level_root_on_a_multitask_checkpoint_names_the_member_keys(
    tmp_path: Path, hydra_cleanup: None
) -> None:
    checkpoint = SimpleNamespace(data_config=_multitask_checkpoint_data(tmp_path))
    cfg = compose_cfg("eval", ["ckpt_path=x.ckpt", f"data.root={tmp_path}"], tmp_path / "h")
    with pytest.raises(ValueError, match=r"data\.datamodules\.seg\.root=DIR"):
        eval_data_config(cfg, checkpoint)
    cfg = compose_cfg("eval", ["ckpt_path=x.ckpt", f"+data.datamodules.sge.root={tmp_path}"], tmp_path / "h")
    with pytest.raises(ValueError, match=r"no task 'sge'"):
        eval_data_config(cfg, checkpoint)
