"""Configs stored by checkpoints written before the layout change still instantiate (siglip_dense.legacy)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import OmegaConf

from siglip_dense.data.toy import write_ade20k_layout, write_coco_layout, write_nyu_layout
from siglip_dense.legacy import LEGACY_TARGETS, upgrade_config, upgrade_target
from tests.conftest import compose_train_cfg

# (data config, the _target_ checkpoints written before the move store, toy layout writer)
OLD_DATA_CONFIGS: list[tuple[str, str, Callable[..., Path]]] = [
    ("toy_seg", "siglip_dense.data.datamodule.SegDataModule", write_ade20k_layout),
    ("toy_depth", "siglip_dense.data.nyu.DepthDataModule", write_nyu_layout),
    ("toy_det", "siglip_dense.data.coco.DetDataModule", write_coco_layout),
]


@pytest.mark.parametrize(
    ("name", "old_target", "writer"), OLD_DATA_CONFIGS, ids=[c[0] for c in OLD_DATA_CONFIGS]
)
def test_old_data_config_upgrades_and_instantiates(
    name: str, old_target: str, writer: Callable[..., Path], tmp_path: Path, hydra_cleanup: None
) -> None:
    """The data config as a checkpoint stores it (resolved), with the target of the old layout."""
    root = writer(tmp_path / name, num_train=2, num_val=1)
    cfg = compose_train_cfg([f"data={name}", f"data.root={root}"], tmp_path / "run")
    stored = OmegaConf.to_container(cfg.data, resolve=True)
    stored["_target_"] = old_target
    before = copy.deepcopy(stored)

    with pytest.raises(InstantiationException, match="Error locating target"):
        instantiate(stored, _convert_="all")  # why the table exists: the old path no longer imports
    upgraded = upgrade_config(stored)
    datamodule = instantiate(upgraded, _convert_="all")

    new_target = LEGACY_TARGETS[old_target]
    assert f"{type(datamodule).__module__}.{type(datamodule).__qualname__}" == new_target
    assert upgraded == {**before, "_target_": new_target}  # nothing else changed
    assert stored == before  # the input is left as it was
    assert Path(datamodule.root) == root


def test_nested_targets_of_a_multitask_config_are_upgraded(tmp_path: Path) -> None:
    """A multi-task data config holds its members' targets one level down (and lists may hold more)."""
    old = {
        "_target_": "siglip_dense.data.multitask.MultiTaskDataModule",
        "_recursive_": False,
        "datamodules": {
            "seg": {"_target_": "siglip_dense.data.datamodule.SegDataModule", "root": "a"},
            "depth": {"_target_": "siglip_dense.data.nyu.DepthDataModule", "root": "b"},
        },
        "extra": [{"_target_": "siglip_dense.data.coco.DetDataModule"}, ("x", 1), None],
    }
    new = upgrade_config(OmegaConf.create(old))  # an OmegaConf container is read as plain containers
    assert new["_target_"] == old["_target_"]  # not moved: kept
    assert new["datamodules"]["seg"] == {
        "_target_": "siglip_dense.data.segmentation.SegDataModule",
        "root": "a",
    }
    assert new["datamodules"]["depth"]["_target_"] == "siglip_dense.data.depth.DepthDataModule"
    assert new["extra"][0] == {"_target_": "siglip_dense.data.detection.DetDataModule"}
    assert new["extra"][1:] == [["x", 1], None]
    assert upgrade_config(old)["extra"][1] == ("x", 1)  # plain tuples stay tuples


def _resolve(target: str) -> object | None:
    try:
        return get_object(target)
    except (ImportError, AttributeError, ValueError):
        return None


@pytest.mark.parametrize("old", sorted(LEGACY_TARGETS))
def test_every_table_entry_points_at_a_real_object(old: str) -> None:
    """Each new path resolves; an old one resolves no more, or (imported there) to the same object."""
    new = upgrade_target(old)
    assert _resolve(new) is not None, f"{old} -> {new}: the new path does not resolve"
    assert _resolve(old) in (None, _resolve(new))
    assert upgrade_target(new) == new  # no chains
