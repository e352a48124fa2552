"""Held-out classes: the seen-only copy of a segmentation folder, the seen/unseen mIoU split, and a toy
run trained without the unseen names then evaluated on all of them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from siglip_dense.data.io import DataError
from siglip_dense.openvocab.heldout import seen_unseen_miou, write_seen_split
from tests.conftest import REPO

HELD_OUT = ["ball", "ring"]


def test_seen_split_relabels(toy_data_root, tmp_path):
    names = (toy_data_root / "classes.txt").read_text().split()
    dst = tmp_path / "seen"
    seen = write_seen_split(toy_data_root, dst, HELD_OUT)
    assert seen == [n for n in names if n not in HELD_OUT]
    assert (dst / "classes.txt").read_text().split() == seen
    anns = sorted((toy_data_root / "annotations").glob("*/*.png"))
    assert anns
    for ann in anns:
        full = np.asarray(Image.open(ann)).astype(int)
        ours = np.asarray(Image.open(dst / ann.relative_to(toy_data_root))).astype(int)
        # independent, per pixel: ADE convention (0 ignored, class i stored as i + 1)
        expected = np.zeros_like(full)
        for v in np.unique(full):
            if v > 0 and names[v - 1] not in HELD_OUT:
                expected[full == v] = seen.index(names[v - 1]) + 1
        assert np.array_equal(ours, expected)
    for img in sorted((toy_data_root / "images").glob("*/*")):
        assert (dst / img.relative_to(toy_data_root)).read_bytes() == img.read_bytes()
    with pytest.raises(DataError, match="exists"):
        write_seen_split(toy_data_root, dst, HELD_OUT)
    with pytest.raises(ValueError, match="unicorn"):
        write_seen_split(toy_data_root, tmp_path / "x", ["unicorn"])


def test_seen_unseen_miou():
    split = seen_unseen_miou({"a": 0.5, "b": None, "c": 0.3, "d": 0.1, "e": float("nan")}, ["c", "d", "e"])
    assert split["mIoU_seen"] == pytest.approx(0.5)  # b absent from the data: left out
    assert split["mIoU_unseen"] == pytest.approx(0.2)
    assert split["hIoU"] == pytest.approx(2 * 0.5 * 0.2 / 0.7)
    assert math.isnan(seen_unseen_miou({"a": 0.5, "b": None}, ["b"])["hIoU"])
    with pytest.raises(ValueError, match="zebra"):
        seen_unseen_miou({"a": 0.5}, ["zebra"])


@pytest.mark.slow
def test_toy_train_seen_eval_unseen(toy_data_root, tmp_path, hydra_cleanup):
    """train.py experiment=toy_openvocab on the seen-only copy (the head never embeds the unseen names),
    then the zero-shot evaluation on the full label set with open_vocab.held_out."""
    from siglip_dense.openvocab.run import run_zero_shot_eval
    from tests.conftest import compose_cfg
    from tests.test_openvocab import _run_tool, _save_checkpoint

    _, clip, *_ = _save_checkpoint("siglip", tmp_path / "clip")
    seen_root = tmp_path / "seen"
    seen = write_seen_split(toy_data_root, seen_root, HELD_OUT)
    run = tmp_path / "run"
    _run_tool(
        str(REPO / "train.py"),
        "experiment=toy_openvocab",
        f"backbone.checkpoint={clip}",
        f"data.root={seen_root}",
        "data.num_workers=0",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=3",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
    )
    ckpt = run / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    (key,) = [k for k in state if k.endswith("head.class_embeddings")]
    assert state[key].shape[0] == len(seen)  # trained on the seen label set only

    out = tmp_path / "eval"
    held = ",".join(HELD_OUT)
    cfg = compose_cfg(
        "eval",
        [
            "zero_shot=true",
            f"ckpt_path={ckpt}",
            f"output_dir={out}",
            f"data.root={toy_data_root}",
            "data.num_workers=0",
            f"open_vocab.held_out=[{held}]",
        ],
        out,
    )
    run_zero_shot_eval(cfg)
    metrics = json.loads((out / "metrics.json").read_text())
    names = (toy_data_root / "classes.txt").read_text().split()
    assert list(metrics["per_class_IoU"]) == names  # evaluated on seen + unseen names
    iou = metrics["per_class_IoU"]
    seen_iou = [iou[n] for n in seen if iou[n] is not None]
    unseen_iou = [iou[n] for n in HELD_OUT if iou[n] is not None]
    assert metrics["mIoU_seen"] == pytest.approx(np.mean(seen_iou), abs=1e-9)
    assert metrics["mIoU_unseen"] == pytest.approx(np.mean(unseen_iou), abs=1e-9)
