"""Shared fixtures: composing the Hydra configs the way train.py does."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, open_dict, read_write  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"


def compose_train_cfg(overrides: list[str], run_dir: Path, data_dir: Path | None = None) -> DictConfig:
    """Compose ``configs/train.yaml`` as ``python train.py <overrides>`` would, with a fixed run dir."""
    return compose_cfg("train", overrides, run_dir, data_dir)


def compose_cfg(
    config_name: str, overrides: list[str], run_dir: Path, data_dir: Path | None = None
) -> DictConfig:
    """Compose an entry config (train / eval) as its Hydra app would, with a fixed run dir."""
    GlobalHydra.instance().clear()
    extra = [f"hydra.run.dir={run_dir}", f"paths.log_dir={run_dir.parent}"]
    if data_dir is not None:
        extra.append(f"paths.data_dir={data_dir}")
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose(config_name, overrides=[*overrides, *extra], return_hydra_config=True)
    # hydra.runtime.output_dir is filled by Hydra's job runner, which compose() does not run
    with read_write(cfg), open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.paths.output_dir = str(run_dir)
    HydraConfig().set_config(cfg)
    with read_write(cfg), open_dict(cfg):
        del cfg["hydra"]  # as @hydra.main hands it to the task function
    return cfg


@pytest.fixture(scope="session")
def toy_data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One generated toy dataset (ADE20K layout) shared by the session's tests."""
    from siglip_dense.data.toy import ensure_toy_data

    root = tmp_path_factory.mktemp("data") / "toy_seg"
    ensure_toy_data(root)
    return root


@pytest.fixture()
def hydra_cleanup() -> Iterator[None]:
    yield
    GlobalHydra.instance().clear()
