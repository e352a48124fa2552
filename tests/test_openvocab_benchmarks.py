"""The benchmarks' class names are CAT-Seg's files byte for byte, and zero-shot evaluation reads the
prepared layouts (16-bit TIFF maps of ADE-847 / PC-459 with their ignore values) and scores them as
detectron2's ``SemSegEvaluator`` (re-typed in tests/helpers/peer_rules.py), as CAT-Seg does; the data
config picks the metric protocol of the trained task too."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from omegaconf import OmegaConf
from PIL import Image

from siglip_dense.data.io import DataError
from siglip_dense.openvocab import load_model
from siglip_dense.openvocab.benchmarks import CLASSNAMES_DIR, SemSegBenchmarkData, benchmark_classes
from tests.conftest import REPO
from tests.helpers.peer_rules import detectron2_sem_seg
from tests.test_openvocab import _save_checkpoint

# git blob hashes of datasets/<file> in KU-CVLAB/CAT-Seg at 6d3a188af95165147fe2f34a8237fa7d2633e784
# (git rev-parse HEAD:datasets/<file>), with each list's length
CATSEG_BLOBS = {
    "ade150.json": ("58772475641879daf8ada3e5c5204773b576780a", 150),
    "ade847.json": ("5150122783f7330795ac28ca0dfeeb08bab8e3f3", 847),
    "coco.json": ("8feed8cb0c0a79d26879f3156ba22ad9557604cf", 171),
    "pc459.json": ("a7554da8933c55cb57e2352466beccefb6ac2a89", 459),
    "pc59.json": ("5b1822edab9b73bac6a868349f0e18dda8923110", 59),
    "voc20.json": ("b38e07ba1bd78eab8d3589a5f396c632fcfc13ac", 20),
}


def git_blob_hash(data: bytes) -> str:
    """git's object id of a file: sha1 of ``blob <size>\\0`` + content."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@pytest.mark.parametrize("file", sorted(CATSEG_BLOBS))
def test_classnames_are_catseg_files(file):
    data = (CLASSNAMES_DIR / file).read_bytes()
    blob, length = CATSEG_BLOBS[file]
    assert git_blob_hash(data) == blob
    assert len(json.loads(data)) == length


def test_benchmark_lists_and_configs_are_the_files():
    read = lambda f: json.loads((CLASSNAMES_DIR / f).read_text())  # noqa: E731
    for name, file in [("ade150", "ade150.json"), ("ade847", "ade847.json"), ("pc59", "pc59.json")]:
        assert benchmark_classes(name) == read(file)
    assert benchmark_classes("pc459") == read("pc459.json")
    assert benchmark_classes("voc20") == read("voc20.json")
    assert benchmark_classes("voc21") == [*read("voc20.json"), "background"]
    # the COCO-Stuff training config lists the names inline (seg_folder reads a list)
    coco = yaml.safe_load((REPO / "configs/data/openvocab_cocostuff171.yaml").read_text())["classes"]
    assert coco == read("coco.json")
    with pytest.raises(ValueError, match="ade20k"):
        benchmark_classes("ade20k")


EVAL_CONFIGS = {
    "openvocab_ade150": 150,
    "openvocab_ade847": 847,
    "openvocab_pc59": 59,
    "openvocab_pc459": 459,
    "openvocab_voc20": 20,
    "openvocab_voc21": 21,
}


@pytest.mark.parametrize("data", sorted(EVAL_CONFIGS))
def test_eval_configs_compose(data, tmp_path, hydra_cleanup):
    from hydra.utils import instantiate

    from tests.conftest import compose_cfg

    ev = compose_cfg("eval", ["zero_shot=true", "ckpt_path=/c", f"data={data}", "data.root=/x"], tmp_path)
    dm = instantiate(OmegaConf.to_container(ev.data, resolve=True))
    assert dm.num_classes == len(set(dm.class_names)) == EVAL_CONFIGS[data]
    assert dm.metric_protocol == "detectron2"  # CAT-Seg / the SigLIP 2 paper: detectron2's evaluator


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return _save_checkpoint("siglip", tmp_path_factory.mktemp("bench_siglip"))[1]


# (name, image dir, map dir, ignore value) as CAT-Seg's register_ade20k_847.py / register_pascal_context.py
LAYOUTS = {
    "ade847": ("images_detectron2/validation", "annotations_detectron2/validation", 65535),
    "pc459": ("JPEGImages", "annotations_detectron2/pc459_val", 459),
}


def write_tree(root: Path, bench: str, rng: np.random.Generator) -> None:
    """Three images with uint16 TIFF maps (values above 255 and the ignore value), one extra image
    without a map (Pascal's JPEGImages/ holds the train images too)."""
    img_dir, gt_dir, ignore = LAYOUTS[bench]
    (root / img_dir).mkdir(parents=True)
    (root / gt_dir).mkdir(parents=True)
    k = len(benchmark_classes(bench))
    for i, (h, w) in enumerate([(40, 48), (36, 36), (32, 56)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / img_dir / f"im{i}.jpg")
        labels = rng.choice([0, 7, 300, k - 1], size=(h, w)).astype(np.uint16)
        labels[: h // 4] = ignore
        Image.fromarray(labels).save(root / gt_dir / f"im{i}.tif")
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / img_dir / "train.jpg")


@pytest.mark.parametrize("bench", sorted(LAYOUTS))
def test_zero_shot_on_16bit_tree(bench, checkpoint, tmp_path):
    from siglip_dense.evaluation.sliding_window import eval_resize_scale, resize_image
    from siglip_dense.openvocab.run import run_zero_shot_eval

    root = tmp_path / "data"
    write_tree(root, bench, np.random.default_rng(0))
    img_dir, gt_dir, ignore = LAYOUTS[bench]
    cfg = OmegaConf.create(
        {
            "ckpt_path": str(checkpoint),
            "device": "cpu",
            "output_dir": str(tmp_path / "out"),
            "open_vocab": {"templates": "photo"},
            "data": yaml.safe_load((REPO / f"configs/data/openvocab_{bench}.yaml").read_text())
            | {"root": str(root)},
        }
    )
    with pytest.warns(UserWarning, match="1 of 4 images"):
        metrics = run_zero_shot_eval(cfg)

    # independent: files read with PIL, the model's own logits, detectron2's evaluator re-typed
    names = benchmark_classes(bench)
    k = len(names)
    model = load_model(checkpoint, templates="photo")
    preds, gts = [], []
    for gt in sorted((root / gt_dir).glob("*.tif")):
        image = np.asarray(Image.open(root / img_dir / f"{gt.stem}.jpg").convert("RGB"))
        ann = np.asarray(Image.open(gt)).astype(np.int64)
        assert ann.max() == ignore  # the 16-bit values survive the round trip
        x = (torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 255 - 0.5) / 0.5
        h, w = image.shape[:2]
        x = resize_image(x, eval_resize_scale(h, w, 32, 128))
        with torch.no_grad():
            logits = F.interpolate(model.segment(x, names), size=(h, w), mode="bilinear", align_corners=False)
        preds.append(logits.argmax(1)[0].numpy())
        gts.append(ann)
    ref = detectron2_sem_seg(preds, gts, k, ignore)
    assert not np.isnan(ref["IoU"][300])  # a label above 255 is scored, not folded into uint8
    predicted = set(np.unique(np.concatenate([p.ravel() for p in preds]))) - {0, 7, 300, k - 1}
    assert predicted  # classes absent from the ground truth are predicted: where the two rules differ
    assert metrics["mIoU"] == pytest.approx(ref["mIoU"], abs=1e-6)
    for ours, theirs in (("fwIoU", "fwIoU"), ("mAcc", "mACC"), ("aAcc", "pACC")):
        assert metrics[ours] == pytest.approx(ref[theirs], abs=1e-6), ours
    assert metrics["metric_protocol"] == "detectron2"
    assert list(metrics["per_class_IoU"]) == names
    per_class = np.array([np.nan if v is None else v for v in metrics["per_class_IoU"].values()])
    np.testing.assert_allclose(per_class, ref["IoU"], atol=1e-6)


def test_bad_label_value_names_the_file(tmp_path):
    root = tmp_path / "d"
    write_tree(root, "pc459", np.random.default_rng(1))
    bad = root / "annotations_detectron2/pc459_val/im1.tif"
    Image.fromarray(np.full((36, 36), 600, dtype=np.uint16)).save(bad)
    dm = SemSegBenchmarkData(
        root, "pc459", "JPEGImages", "annotations_detectron2/pc459_val", 459, gt_ext="tif"
    )
    with pytest.warns(UserWarning):
        dm.setup("validate")
    with pytest.raises(DataError, match=r"im1\.tif.*\[600\]"):
        dm.val_dataset[1]
    with pytest.raises(DataError, match="no ground-truth maps"):
        SemSegBenchmarkData(root, "pc459", "JPEGImages", "nowhere", 459).setup()


def test_the_data_config_picks_the_metric_protocol(toy_data_root, tmp_path, hydra_cleanup):
    """Training on the open-vocabulary training set (COCO-Stuff config) scores validation as detectron2;
    the toy / ADE20K-style data as MMSeg; evaluating on other data adopts that data's rule."""
    from hydra.utils import instantiate

    from siglip_dense.cli import data_error_message
    from siglip_dense.train import build_task
    from tests.conftest import compose_train_cfg

    def task_and_data(*overrides: str):
        cfg = compose_train_cfg(
            ["experiment=toy_seg", f"data.root={toy_data_root}", "data.num_workers=0", *overrides],
            tmp_path / str(len(overrides)),
        )
        dm = instantiate(cfg.data, _convert_="all")
        return build_task(cfg, dm), dm

    closed, closed_dm = task_and_data()
    assert closed_dm.metric_protocol == "mmseg"
    assert closed.components["segmentation"].metric_protocol == "mmseg"
    assert "fwIoU" not in closed.valid_monitors()
    coco, _ = task_and_data("data=openvocab_cocostuff171")
    seg = coco.components["segmentation"]
    assert seg.metric_protocol == "detectron2" and seg.val_metric.protocol == "detectron2"
    assert "val/fwIoU" in coco.valid_monitors()
    # tools/eval.py on other data: that data's rule (the COCO-Stuff config on the toy tree's names)
    _, toy_as_openvocab = task_and_data("data=openvocab_cocostuff171", "data.classes=null")
    closed.bind_data(toy_as_openvocab)
    assert closed.components["segmentation"].metric_protocol == "detectron2"
    with pytest.raises(Exception) as err:  # noqa: PT011 - Hydra wraps it; the CLI prints the DataError
        task_and_data("+data.metric_protocol=miou")
    assert "data.metric_protocol" in data_error_message(err.value) and "'miou'" in str(err.value)
