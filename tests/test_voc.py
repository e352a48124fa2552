"""PASCAL VOC 2012 aug: the layout loads (labels as stored, 255 ignored, 21 named classes) and a toy
run in that layout trains."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from siglip_dense.data.io import DataError
from siglip_dense.data.toy import ensure_toy_data
from siglip_dense.data.transforms import IGNORE_INDEX
from siglip_dense.data.voc import VOC_CLASSES, VOCDataModule, VOCSegDataset
from siglip_dense.train import run_train
from tests.conftest import compose_train_cfg


def write_voc(root: Path, labels: dict[str, np.ndarray], split: str = "val") -> None:
    """A hand-made VOC aug layout: one JPEG, one grey PNG label per id, the split list."""
    for d in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for image_id, label in labels.items():
        Image.fromarray(np.full((*label.shape, 3), 90, np.uint8)).save(
            root / "JPEGImages" / f"{image_id}.jpg"
        )
        Image.fromarray(label).save(root / "SegmentationClassAug" / f"{image_id}.png")
    (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(labels) + "\n")


def test_layout_loads_labels_as_stored(tmp_path: Path) -> None:
    label = np.zeros((20, 30), np.uint8)
    label[5:10, 5:12] = 15  # person
    label[12:, 20:] = 20  # tvmonitor
    label[4, :] = 255  # border: ignored
    write_voc(tmp_path, {"2007_000032": label, "2008_000001": np.ones((20, 30), np.uint8)})
    ds = VOCSegDataset(tmp_path, "val")
    assert [p.stem for p, _ in ds.samples] == ["2007_000032", "2008_000001"]
    _, loaded = ds.load(0)
    np.testing.assert_array_equal(loaded, label)  # no reduce_zero_label: background stays class 0
    item = ds[0]
    assert item["mask"].shape == (20, 30) and int((item["mask"] == IGNORE_INDEX).sum()) == 30
    dm = VOCDataModule(tmp_path, num_workers=0, batch_size=1)
    assert dm.class_names == list(VOC_CLASSES) and dm.num_classes == 21
    assert dm.class_names[0] == "background" and dm.class_names[15] == "person"


def test_layout_errors_name_the_file(tmp_path: Path) -> None:
    write_voc(tmp_path, {"a": np.zeros((8, 8), np.uint8)})
    (tmp_path / "ImageSets" / "Segmentation" / "val.txt").write_text("a\nmissing_id\n")
    with pytest.raises(DataError, match="missing_id.jpg not found"):
        VOCSegDataset(tmp_path, "val")
    with pytest.raises(DataError, match="train_aug.txt"):
        VOCSegDataset(tmp_path, "train_aug")
    bad = np.full((8, 8), 21, np.uint8)  # beyond the 21 classes
    write_voc(tmp_path / "bad", {"b": bad})
    with pytest.raises(DataError, match="b.png has label values \\[21\\]"):
        VOCSegDataset(tmp_path / "bad", "val").load(0)


def test_toy_generator_writes_the_layout(tmp_path: Path) -> None:
    root = ensure_toy_data(tmp_path / "voc", num_train=3, num_val=2, layout="voc")
    ids = (root / "ImageSets" / "Segmentation" / "train_aug.txt").read_text().split()
    assert len(ids) == 3
    stored = np.asarray(Image.open(root / "SegmentationClassAug" / f"{ids[0]}.png"))
    _, loaded = VOCSegDataset(root, "train_aug").load(0)
    np.testing.assert_array_equal(loaded, stored)
    assert set(np.unique(stored)) <= set(range(6)) | {255}


@pytest.mark.slow
def test_toy_voc_linear_probe_run_trains(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = [
        "experiment=toy_seg_linear",
        "data=toy_voc",
        "data.toy_num_train=32",
        "data.toy_num_val=3",
        "data.num_workers=0",
        "trainer.max_epochs=2",
        "trainer.log_every_n_steps=1",
        "num_vis=0",
    ]
    cfg = compose_train_cfg(overrides, run_dir, data_dir=tmp_path / "data")
    run_train(cfg)
    assert (tmp_path / "data" / "toy_voc" / "JPEGImages").is_dir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert list(metrics["per_class_IoU"]) == list(VOC_CLASSES)
    assert 0.0 <= metrics["mIoU"] <= 1.0
    assert metrics["per_class_IoU"]["background"] > 0.3  # the most frequent class is learned
    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) >= 6 and np.mean(losses[-3:]) < np.mean(losses[:3])
