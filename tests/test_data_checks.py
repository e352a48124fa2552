"""The data a run reads is the data the user named, checked before training (issue 14 items 8, 9)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from siglip_dense.data.io import DataError
from siglip_dense.data.scan import scan_datamodule
from siglip_dense.data.segmentation import SegDataModule
from siglip_dense.data.toy import ensure_toy_data
from tests.conftest import CONFIG_DIR, compose_train_cfg

LAYOUT_WORDS = {"ade20k": "ROOT/images", "coco": "instances_", "nyu": "ROOT/splits", "folder": "ROOT/images"}


@pytest.mark.parametrize(
    ("overrides", "layout"),
    [
        (["experiment=toy_seg"], "ade20k"),
        (["experiment=toy_det"], "coco"),
        (["experiment=toy_depth"], "nyu"),
        (["data=seg_folder"], "folder"),
        (["experiment=toy_depth", "data=depth_folder"], "folder"),
    ],
)
@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_a_missing_or_empty_root_is_an_error_naming_it(
    overrides: list[str], layout: str, kind: str, tmp_path: Path, hydra_cleanup: None
) -> None:
    root = tmp_path / "typo"
    if kind == "empty":
        root.mkdir()
    cfg = compose_train_cfg([*overrides, f"data.root={root}"], tmp_path / "run", data_dir=tmp_path / "d")
    with pytest.raises(Exception, match="data.root") as info:
        instantiate(cfg.data, _convert_="all")
    assert str(root) in str(info.value) and LAYOUT_WORDS[layout] in str(info.value)
    assert not root.exists() or not any(root.iterdir())  # no toy scenes written there
    assert not (tmp_path / "d").exists()


def test_eval_on_a_missing_root_names_it(tmp_path: Path) -> None:
    """tools/eval.py ckpt_path=... data.root=<missing>: the checkpoint's data config, another root."""
    from hydra.core.hydra_config import HydraConfig

    from siglip_dense.evaluate import eval_data_config

    HydraConfig.instance().cfg = None  # as in a fresh eval process: no data=<name> chosen
    stored = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "data" / "toy_seg.yaml"))
    stored["toy_root"] = str(tmp_path / "toy")
    cfg = OmegaConf.create({"ckpt_path": "x.ckpt", "data": {"root": str(tmp_path / "typo")}})
    data = eval_data_config(cfg, SimpleNamespace(data_config=stored))
    with pytest.raises(Exception, match=f"data.root {tmp_path / 'typo'} does not exist"):
        instantiate(data, _convert_="all")
    assert not (tmp_path / "toy").exists()


def test_toy_scenes_only_when_asked(tmp_path: Path) -> None:
    """No root: the toy default is generated; an explicit toy flag generates at the root named."""
    from siglip_dense.data.depth import DepthDataModule

    dm = DepthDataModule(root=None, toy_root=tmp_path / "default", toy_num_train=2, toy_num_val=1)
    assert dm.root == tmp_path / "default" and (dm.root / "splits" / "val.txt").is_file()
    dm = DepthDataModule(root=tmp_path / "mine", toy=True, toy_num_train=2, toy_num_val=1)
    assert (tmp_path / "mine" / "splits" / "train.txt").is_file()
    with pytest.raises(DataError, match="data.root is not set"):
        DepthDataModule(root=None)


# -- scanning before training --------------------------------------------------------------------------
def _copy(toy_data_root: Path, dest: Path) -> Path:
    shutil.copytree(toy_data_root, dest)
    return dest


def _seg_dm(root: Path) -> SegDataModule:
    return SegDataModule(root, crop_size=(64, 64), batch_size=2, num_workers=0)


def test_truncated_validation_image_fails_the_scan(toy_data_root: Path, tmp_path: Path) -> None:
    root = _copy(toy_data_root, tmp_path / "ds")
    bad = sorted((root / "images" / "validation").glob("*.jpg"))[3]
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])  # header intact, pixels cut
    with pytest.raises(DataError, match=str(bad)):
        _seg_dm(root).setup("fit")


def test_training_split_headers_and_sizes_are_checked(toy_data_root: Path, tmp_path: Path) -> None:
    from PIL import Image

    root = _copy(toy_data_root, tmp_path / "ds")
    bad = sorted((root / "images" / "training").glob("*.jpg"))[5]
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(DataError, match=f"cannot read the header of {bad}"):
        _seg_dm(root).setup("fit")
    shutil.copy(toy_data_root / "images" / "training" / bad.name, bad)
    ann = sorted((root / "annotations" / "training").glob("*.png"))[7]
    Image.new("L", (11, 13)).save(ann)
    with pytest.raises(DataError, match=f"{ann} is 11x13"):
        _seg_dm(root).setup("fit")
    dm = SegDataModule(root, crop_size=(64, 64), num_workers=0, skip_bad=True)
    with pytest.warns(UserWarning, match="1 of .* train .* mismatched in size .*EXIF.* will be skipped"):
        dm.setup("fit")


def test_depth_validation_scan_names_the_file(tmp_path: Path) -> None:
    from siglip_dense.data.depth import DepthDataModule

    root = ensure_toy_data(tmp_path / "nyu", num_train=2, num_val=2, layout="nyu")
    depth = root / (root / "splits" / "val.txt").read_text().split()[1]
    depth.write_bytes(depth.read_bytes()[:100])
    with pytest.raises(DataError, match=str(depth)):
        DepthDataModule(root, crop_size=(64, 64), num_workers=0).setup("validate")


def test_coco_validation_without_annotations(tmp_path: Path) -> None:
    from siglip_dense.data.detection import DetDataModule

    root = ensure_toy_data(tmp_path / "coco", num_train=2, num_val=2, layout="coco")
    ann = root / "annotations" / "instances_val2017.json"
    data = json.loads(ann.read_text())
    ann.write_text(json.dumps({**data, "annotations": []}))
    with pytest.raises(DataError, match="has no annotations"):
        DetDataModule(root, image_size=64, num_workers=0).setup("fit")
    dm = DetDataModule(root, image_size=64, num_workers=0)
    with pytest.warns(UserWarning, match="has no annotations"):
        dm.setup("validate")
    bad = root / "val2017" / data["images"][1]["file_name"]
    bad.write_bytes(bad.read_bytes()[:300])
    with pytest.raises(DataError, match=str(bad)):
        DetDataModule(root, image_size=64, num_workers=0).setup("validate")


def test_scan_runs_once_per_split(toy_data_root: Path, tmp_path: Path) -> None:
    dm = _seg_dm(_copy(toy_data_root, tmp_path / "ds"))
    dm.setup("fit")
    bad = sorted((dm.root / "images" / "validation").glob("*.jpg"))[0]
    bad.write_bytes(b"x")  # after the scan: a second setup (trainer.validate) does not rescan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dm.setup("validate")
    dm.scan = False
    dm._scanned_splits.clear()
    scan_datamodule(dm, "validate")  # scan=false: nothing checked


# -- end to end: train.py ----------------------------------------------------------------------------
def _train(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "train.py", *args, f"hydra.run.dir={tmp_path / 'run'}"]
    cmd += [f"paths.data_dir={tmp_path / 'data'}", "trainer.max_epochs=1", "data.num_workers=0"]
    return subprocess.run(cmd, cwd=CONFIG_DIR.parent, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_train_on_a_misspelt_root_exits_naming_it(tmp_path: Path) -> None:
    proc = _train(["experiment=toy_seg", f"data.root={tmp_path / 'typo'}"], tmp_path)
    assert proc.returncode != 0
    assert f"data.root {tmp_path / 'typo'} does not exist" in proc.stdout + proc.stderr
    assert not (tmp_path / "typo").exists()


@pytest.mark.slow
def test_corrupt_validation_image_stops_train_before_any_step(toy_data_root: Path, tmp_path: Path) -> None:
    root = _copy(toy_data_root, tmp_path / "ds")
    bad = sorted((root / "images" / "validation").glob("*.jpg"))[-1]
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    proc = _train(["experiment=toy_seg", f"data.root={root}"], tmp_path)
    assert proc.returncode != 0
    assert str(bad) in proc.stdout + proc.stderr
    assert not list((tmp_path / "run").rglob("*.ckpt"))
    logged = "".join(p.read_text() for p in (tmp_path / "run").rglob("metrics.csv"))
    assert "train/loss" not in logged


def test_annotation_without_its_image_is_an_error_naming_it(toy_data_root: Path, tmp_path: Path) -> None:
    """A deleted validation image used to shrink the validation set silently (its annotation ignored)."""
    root = _copy(toy_data_root, tmp_path / "ds")
    gone = sorted((root / "images" / "validation").glob("*.jpg"))[2]
    gone.unlink()
    orphan = root / "annotations" / "validation" / f"{gone.stem}.png"
    with pytest.raises(DataError, match=f"annotation {orphan} has no image"):
        _seg_dm(root).setup("validate")
    dm = SegDataModule(root, crop_size=(64, 64), num_workers=0, skip_bad=True)
    with pytest.warns(UserWarning, match="skipped 1 annotations"):
        dm.setup("validate")


def test_coco_image_missing_on_disk_is_named_by_the_scan(tmp_path: Path) -> None:
    from siglip_dense.data.detection import DetDataModule

    root = ensure_toy_data(tmp_path / "coco", num_train=2, num_val=2, layout="coco")
    data = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    gone = root / "val2017" / data["images"][1]["file_name"]
    gone.unlink()
    with pytest.raises(DataError, match=str(gone)):
        DetDataModule(root, image_size=64, num_workers=0).setup("validate")


def test_depth_map_without_its_image_is_an_error_naming_it(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from siglip_dense.data.depth_folder import DepthFolderDataset

    for stem in ("a", "b", "c"):
        (tmp_path / "depth" / "val").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8), 1000, np.uint16)).save(tmp_path / "depth" / "val" / f"{stem}.png")
        if stem != "c":
            (tmp_path / "images" / "val").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8)).save(tmp_path / "images" / "val" / f"{stem}.png")
    orphan = tmp_path / "depth" / "val" / "c.png"
    with pytest.raises(DataError, match=f"depth map {orphan} has no image"):
        DepthFolderDataset(tmp_path, "val")
    with pytest.warns(UserWarning, match="skipped 1 depth maps"):
        assert len(DepthFolderDataset(tmp_path, "val", skip_bad=True)) == 2


def test_multitask_member_data_errors_name_the_member_key(toy_data_root: Path, tmp_path: Path) -> None:
    from siglip_dense.data.multitask import MultiTaskDataModule

    seg = {
        "_target_": "siglip_dense.data.segmentation.SegDataModule",
        "crop_size": [64, 64],
        "num_workers": 0,
    }
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=rf"data\.datamodules\.seg\.root {missing} does not exist"):
        MultiTaskDataModule({"seg": {**seg, "root": str(missing)}})
    root = _copy(toy_data_root, tmp_path / "ds")
    bad = sorted((root / "images" / "validation").glob("*.jpg"))[0]
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    dm = MultiTaskDataModule({"seg": {**seg, "root": str(root)}})
    with pytest.raises(DataError, match=r"set data\.datamodules\.seg\.skip_bad=true"):
        dm.setup("validate")
