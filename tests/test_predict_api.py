"""``load_model(...).predict`` and ``tools/predict.py``: every input type gives the same result, the
documented structures, detection category ids and score threshold, unique output names, legends,
and the export's file mode.

Models are tiny random-weight ones built from the toy experiments' configs (no training) and saved
as Lightning-style checkpoints, so ``load_model`` reads them as it reads train.py's.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from siglip_dense.checkpoints import CheckpointFormatError, export, load_model
from siglip_dense.predict import (
    DepthPrediction,
    DetectionPrediction,
    SegmentationPrediction,
    run_predict,
)
from siglip_dense.tasks.detection import detector_score_threshold
from siglip_dense.visualize import legend_layout, legend_strip, palette
from tests.conftest import compose_train_cfg

CLASSES = ["wall", "sky", "tree", "road"]
CATEGORIES = [(1, "person"), (3, "car"), (7, "train")]  # non-contiguous COCO ids


def build_task(experiment: str, tmp: Path, overrides: list[str], **kwargs: Any) -> L.LightningModule:
    """The experiment's task with random weights (seed 0), sized by ``kwargs`` instead of data."""
    cfg = compose_train_cfg([f"experiment={experiment}", *overrides], tmp / "hydra")
    task_cfg = OmegaConf.to_container(cfg.task, resolve=True)
    torch.manual_seed(0)
    return instantiate(task_cfg, _recursive_=False, _convert_="all", **kwargs).eval()


def save_ckpt(task: L.LightningModule, path: Path) -> Path:
    """What a Lightning checkpoint holds for load_model: weights, hyper-parameters, our meta."""
    ckpt = {
        "state_dict": task.state_dict(),
        "hyper_parameters": dict(task.hparams),
        "pytorch-lightning_version": L.__version__,
    }
    task.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def seg_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("seg")
    task = build_task("toy_seg", tmp, ["task.eval.mode=whole"], num_classes=len(CLASSES), class_names=CLASSES)
    return save_ckpt(task, tmp / "seg.ckpt")


@pytest.fixture(scope="module")
def depth_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("depth")
    return save_ckpt(build_task("toy_depth", tmp, []), tmp / "depth.ckpt")


@pytest.fixture(scope="module")
def det_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Faster R-CNN whose categories come from a COCO json with ids 1, 3, 7 (via the data module)."""
    from siglip_dense.data.detection import DetDataModule

    tmp = tmp_path_factory.mktemp("det")
    root = tmp / "coco"
    for split in ("train2017", "val2017"):
        (root / split).mkdir(parents=True)
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / split / "a.jpg")
        ann = {
            "images": [{"id": 1, "file_name": "a.jpg", "height": 32, "width": 32}],
            "annotations": [
                {"id": 1, "image_id": 1, "category_id": 3, "bbox": [2, 2, 10, 10], "area": 100, "iscrowd": 0}
            ],
            "categories": [{"id": i, "name": n} for i, n in CATEGORIES],
        }
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(ann))
    from_data = DetDataModule(root=root, num_workers=0).task_kwargs()
    assert from_data["category_ids"] == [1, 3, 7]
    overrides = ["task=det_faster_rcnn", "data.image_size=64", "task.detector.box_detections_per_img=30"]
    task = build_task("toy_det", tmp, overrides, **from_data)
    return save_ckpt(task, tmp / "det.ckpt")


def rgb_image(h: int = 40, w: int = 56, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def same(a: Any, b: Any, where: str = "") -> None:
    """Two predictions are equal, field by field (arrays exactly)."""
    assert type(a) is type(b), where
    for key, va in vars(a).items():
        vb = getattr(b, key)
        if isinstance(va, np.ndarray):
            np.testing.assert_array_equal(va, vb, err_msg=f"{where}: {key}")
        else:
            assert va == vb, f"{where}: {key}"


# -- every input type, one result ------------------------------------------------------------------------
@pytest.mark.parametrize("ckpt_name", ["seg_ckpt", "depth_ckpt", "det_ckpt"])
def test_every_input_type_gives_the_same_prediction(
    ckpt_name: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    model = load_model(request.getfixturevalue(ckpt_name))
    # detection: threshold 0, so the comparison covers the full top-30 list, not an empty one
    options = {"score_threshold": 0.0} if ckpt_name == "det_ckpt" else {}

    def predict(x: Any) -> Any:
        return model.predict(x, **options)

    rgb = rgb_image()
    path = tmp_path / "x.png"
    Image.fromarray(rgb).save(path)
    ref = predict(rgb)
    chw = torch.from_numpy(rgb).permute(2, 0, 1)
    inputs = {
        "path": path,
        "str path": str(path),
        "PIL": Image.open(path),
        "uint8 tensor H×W×3": torch.from_numpy(rgb),
        "uint8 tensor C×H×W": chw,
        "float32 tensor C×H×W in [0, 1]": chw.float() / 255.0,
        "float32 array in [0, 1]": rgb.astype(np.float32) / np.float32(255.0),
    }
    for name, x in inputs.items():
        same(predict(x), ref, name)
    # batches: a list of mixed types, a 4-D array, a 4-D N×C×H×W tensor
    other = rgb_image(seed=1)
    batch = predict([path, Image.fromarray(other)])
    assert isinstance(batch, list) and len(batch) == 2
    same(batch[0], ref)
    same(batch[1], predict(other))
    for stacked in (np.stack([rgb, other]), torch.from_numpy(np.stack([rgb, other])).permute(0, 3, 1, 2)):
        got = predict(stacked)
        same(got[0], ref)
        same(got[1], batch[1])


def test_grey_and_rgba_predict_as_their_rgb_conversion(seg_ckpt: Path) -> None:
    model = load_model(seg_ckpt)
    rng = np.random.default_rng(2)
    grey = rng.integers(0, 256, (37, 50), dtype=np.uint8)
    rgba = rng.integers(0, 256, (37, 50, 4), dtype=np.uint8)
    as_rgb = {
        "grey": np.asarray(Image.fromarray(grey, "L").convert("RGB")),
        "rgba": np.asarray(Image.fromarray(rgba, "RGBA").convert("RGB")),
    }
    for name, x in {"grey": grey, "rgba": rgba}.items():
        ref = model.predict(as_rgb[name])
        same(model.predict(x), ref)  # numpy array
        same(model.predict(torch.from_numpy(x)), ref)  # tensor
        same(model.predict(Image.fromarray(x)), ref)  # PIL image in mode L / RGBA
    grey_chw = torch.from_numpy(grey)[None]  # 1×H×W tensor
    same(model.predict(grey_chw), model.predict(as_rgb["grey"]))


def test_16_bit_grey_file_and_pil_image_agree(seg_ckpt: Path, tmp_path: Path) -> None:
    model = load_model(seg_ckpt)
    grey16 = np.random.default_rng(3).integers(0, 4000, (33, 41)).astype(np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(grey16).save(path)
    with Image.open(path) as im:
        assert im.mode in ("I;16", "I")
        from_pil = model.predict(im)
    same(model.predict(path), from_pil)
    scaled = (grey16 / grey16.max() * 255.0).round().astype(np.uint8)  # read_image's rule
    same(from_pil, model.predict(scaled))


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (np.zeros((3, 40, 56), np.uint8), r"image 1 \(numpy.ndarray shape \(3, 40, 56\).*transpose"),
        (np.zeros((40, 56, 3), np.int64), r"image 1 .*dtype torch.int64 not supported.*uint8"),
        (np.full((40, 56, 3), 255.0, np.float32), r"image 1 .*float images must be in \[0, 1\].*255"),
        (torch.zeros(3, 8, 3, dtype=torch.uint8), r"image 1 \(torch.Tensor shape \(3, 8, 3\).*both"),
        ({"image": 1}, r"image 1 \(dict\): not an image"),
    ],
)
def test_bad_input_names_the_item(seg_ckpt: Path, bad: Any, match: str) -> None:
    model = load_model(seg_ckpt)
    with pytest.raises((ValueError, TypeError), match=match):
        model.predict([rgb_image(), bad])


# -- what predict returns ------------------------------------------------------------------------------
def test_segmentation_and_depth_structures(seg_ckpt: Path, depth_ckpt: Path) -> None:
    seg = load_model(seg_ckpt).predict(rgb_image(45, 61))
    assert isinstance(seg, SegmentationPrediction)
    assert seg.labels.shape == (45, 61) and seg.labels.dtype == np.int64
    assert seg.class_names == CLASSES and seg.labels.max() < len(CLASSES)
    np.testing.assert_array_equal(np.asarray(seg), seg.labels)  # old use: the label map itself
    model = load_model(depth_ckpt)
    depth = model.predict(rgb_image(45, 61))
    assert isinstance(depth, DepthPrediction)
    assert depth.depth.shape == (45, 61) and depth.depth.dtype == np.float32
    assert (depth.min_depth, depth.max_depth) == (model.min_depth, model.max_depth)
    assert depth.depth.min() >= depth.min_depth and depth.depth.max() <= depth.max_depth


def test_detection_category_ids_are_the_datasets(det_ckpt: Path) -> None:
    model = load_model(det_ckpt)
    pred = model.predict(rgb_image(64, 80), score_threshold=0.0)
    assert isinstance(pred, DetectionPrediction) and len(pred) > 0
    ids, names = dict(CATEGORIES), [n for _, n in CATEGORIES]
    assert set(pred.labels.tolist()) <= {0, 1, 2}
    assert pred.category_ids.tolist() == [CATEGORIES[k][0] for k in pred.labels]
    assert set(pred.category_ids.tolist()) <= {1, 3, 7}
    assert pred.category_names == [names[k] for k in pred.labels]
    assert all(ids[c] == n for c, n in zip(pred.category_ids.tolist(), pred.category_names))
    assert pred.boxes.shape == (len(pred), 4) and pred.boxes.dtype == np.float32
    assert (pred.boxes[:, 2:] >= pred.boxes[:, :2]).all() and pred.boxes[:, 2].max() <= 80
    assert pred.masks is None and "masks" not in pred
    np.testing.assert_array_equal(pred["boxes"], pred.boxes)  # the old dict keys


def test_score_threshold_zero_is_the_raw_detector(det_ckpt: Path) -> None:
    """threshold 0 = calling the torchvision detector built with box_score_thresh=0 on the same input."""
    model = load_model(det_ckpt)
    rgb = rgb_image(64, 80)
    raw_cfg = torch.load(det_ckpt, map_location="cpu", weights_only=True)
    hp = dict(raw_cfg["hyper_parameters"])
    hp["detector"] = {**hp["detector"], "box_score_thresh": 0.0}
    reference = type(model)(**hp).eval()
    reference.load_state_dict(raw_cfg["state_dict"])
    x = (torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0 - 0.5) / 0.5
    with torch.no_grad():
        out = reference.model([x])[0]
    pred = model.predict(rgb, score_threshold=0)
    assert len(pred) == len(out["scores"]) == 30  # box_detections_per_img of the build
    np.testing.assert_array_equal(pred.boxes, out["boxes"].numpy())
    np.testing.assert_array_equal(pred.scores, out["scores"].numpy())
    np.testing.assert_array_equal(pred.labels, out["labels"].numpy() - 1)  # R-CNN: 0 is background
    # the default is the model's vis_score_threshold (0.5): the raw detections scoring above it
    default = model.predict(rgb)
    assert default.score_threshold == model.vis_score_threshold == 0.5
    keep = out["scores"].numpy() > 0.5
    np.testing.assert_array_equal(default.scores, out["scores"].numpy()[keep])
    mid = float(np.median(pred.scores))
    np.testing.assert_array_equal(
        model.predict(rgb, score_threshold=mid).scores, pred.scores[pred.scores > mid]
    )


def test_mask_rcnn_masks_are_binary_at_the_input_size(tmp_path: Path) -> None:
    kwargs = {"num_classes": 3, "class_names": [n for _, n in CATEGORIES], "category_ids": [1, 3, 7]}
    overrides = ["data.image_size=64", "task.detector.box_detections_per_img=5"]
    model = build_task("toy_det", tmp_path, overrides, **kwargs)  # Mask R-CNN
    rgb = rgb_image(50, 70)
    pred = model.predict(rgb, score_threshold=0)
    x = (torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0 - 0.5) / 0.5
    with detector_score_threshold(model.model, 0.0):
        raw = model.detect([x])[0]
    assert pred.masks is not None and pred.masks.dtype == bool
    assert pred.masks.shape == (len(pred), 50, 70) == (5, 50, 70)
    np.testing.assert_array_equal(pred.masks, (raw["masks"][:, 0] > model.mask_threshold).numpy())
    np.testing.assert_array_equal(pred["masks"], pred.masks)


def test_score_threshold_without_detection_is_refused(seg_ckpt: Path) -> None:
    with pytest.raises(ValueError, match=r"score_threshold applies to detection.*\['segmentation'\]"):
        load_model(seg_ckpt).predict(rgb_image(), score_threshold=0.3)


# -- files ------------------------------------------------------------------------------------------------
def test_same_stem_inputs_and_nested_folders_get_their_own_outputs(seg_ckpt: Path, tmp_path: Path) -> None:
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    images = {"x.jpg": rgb_image(seed=3), "x.png": rgb_image(seed=4), "sub/x.png": rgb_image(30, 20, seed=5)}
    for rel, arr in images.items():
        Image.fromarray(arr).save(src / rel)
    out = src / "out"  # inside the input folder: never read back as input
    files = run_predict(seg_ckpt, src, out)
    rels = {p.relative_to(out).as_posix() for p in files}
    assert rels == {f"{r}{s}" for r in images for s in (".png", "_vis.png")}
    model = load_model(seg_ckpt)
    for rel in images:
        labels = np.asarray(Image.open(out / f"{rel}.png"))
        # the label PNG is the prediction of the decoded file (JPEG decoded as the file holds it)
        np.testing.assert_array_equal(labels, model.predict(src / rel).labels)
    again = run_predict(seg_ckpt, src, out)  # second run: the outputs are not inputs
    assert len(again) == len(files)


def test_predict_cli_score_threshold(det_ckpt: Path, tmp_path: Path) -> None:
    from siglip_dense.cli import predict

    image = tmp_path / "a.png"
    Image.fromarray(rgb_image(64, 80)).save(image)
    out = tmp_path / "out"
    predict([f"ckpt_path={det_ckpt}", f"input={image}", f"output={out}", "score_threshold=0"])
    written = json.loads((out / "a.png.json").read_text())
    assert written["score_threshold"] == 0
    ref = load_model(det_ckpt).predict(image, score_threshold=0)
    assert [d["score"] for d in written["detections"]] == pytest.approx(ref.scores.tolist(), abs=0)
    assert [d["category_id"] for d in written["detections"]] == ref.category_ids.tolist()


# -- legends ----------------------------------------------------------------------------------------------
def check_legend(picture: np.ndarray, class_ids: list[int], names: list[str]) -> None:
    """The picture ends with the legend strip of exactly ``class_ids``, each swatch in its colour."""
    strip = np.asarray(legend_strip(class_ids, names, picture.shape[1]))
    np.testing.assert_array_equal(picture[-strip.shape[0] :], strip)
    entries, _ = legend_layout(class_ids, names, picture.shape[1])
    assert [c for c, _, _ in entries] == class_ids
    colours = palette(len(names))
    top = picture.shape[0] - strip.shape[0]
    for c, x, y in entries:
        np.testing.assert_array_equal(picture[top + y + 5, x + 5], colours[c])


def test_detection_overlay_has_a_legend_of_the_classes_drawn(det_ckpt: Path, tmp_path: Path) -> None:
    model = load_model(det_ckpt)
    rgb = rgb_image(64, 80)
    pred = model.predict(rgb, score_threshold=0)
    files = model.write_outputs(rgb, pred, tmp_path, "a.png")
    picture = np.asarray(Image.open(files[1]))
    assert picture.shape[0] > 64
    check_legend(picture, sorted(set(pred.labels.tolist())), [n for _, n in CATEGORIES])


def test_predictions_png_has_a_legend(seg_ckpt: Path, tmp_path: Path) -> None:
    from siglip_dense.visualize import present_classes

    class Data:  # the validation split the picture reads: normalised images and label maps
        val_dataset = [
            {"image": torch.rand(3, 32, 48) * 2 - 1, "mask": torch.randint(0, 2, (32, 48))} for _ in range(2)
        ]

    model = load_model(seg_ckpt)
    path = model.save_visualization(Data(), tmp_path / "predictions.png", 2)
    picture = np.asarray(Image.open(path))
    preds = [model.predict_labels(s["image"][None])[0].numpy() for s in Data.val_dataset]
    present = present_classes([s["mask"].numpy() for s in Data.val_dataset] + preds, len(CLASSES))
    assert {0, 1} <= set(present)
    check_legend(picture, present, CLASSES)


def test_detection_predictions_png_has_a_legend(det_ckpt: Path, tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)

    class Data:  # normalised images and COCO-style targets (contiguous labels 0..K-1)
        val_dataset = [
            {
                "image": torch.rand(3, 48, 64, generator=gen) * 2 - 1,
                "target": {"boxes": torch.tensor([[4.0, 4.0, 30.0, 30.0]]), "labels": torch.tensor([2])},
            }
        ]

    model = load_model(det_ckpt)
    path = model.save_visualization(Data(), tmp_path / "predictions.png", 1)
    picture = np.asarray(Image.open(path))
    out = model.detect([Data.val_dataset[0]["image"]])[0]
    kept = out["labels"][out["scores"] >= model.vis_score_threshold].tolist()
    check_legend(picture, sorted({2, *kept}), [n for _, n in CATEGORIES])


# -- export -------------------------------------------------------------------------------------------------
def test_export_files_respect_the_umask(seg_ckpt: Path, tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        out = export(seg_ckpt, tmp_path / "a")
    finally:
        os.umask(old)
    for name in ("model.safetensors", "config.json"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name
    old = os.umask(0o027)
    try:
        out = export(seg_ckpt, tmp_path / "b")
    finally:
        os.umask(old)
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o640
    same(load_model(out).predict(rgb_image()), load_model(seg_ckpt).predict(rgb_image()))


def test_an_exports_weight_file_loads_as_its_export(seg_ckpt: Path, tmp_path: Path) -> None:
    """``load_model(<export>/model.safetensors)`` is the export (its config.json is beside it); a weight
    file without it, or one that is no export, is an error saying what to pass instead."""
    import shutil

    from safetensors.torch import save_file

    import siglip_dense

    out = export(seg_ckpt, tmp_path / "export")
    same(
        siglip_dense.load_model(str(out / "model.safetensors")).predict(rgb_image()),
        load_model(seg_ckpt).predict(rgb_image()),
    )
    alone = tmp_path / "alone" / "model.safetensors"
    alone.parent.mkdir()
    shutil.copy(out / "model.safetensors", alone)
    with pytest.raises(
        CheckpointFormatError,
        match=rf"{re.escape(str(alone.parent / 'config.json'))}.*missing: pass the export directory",
    ):
        siglip_dense.load_model(str(alone))
    backbone = tmp_path / "backbone.safetensors"
    save_file({"patch_embed.proj.weight": torch.zeros(2, 3, 4, 4)}, str(backbone))
    with pytest.raises(
        CheckpointFormatError,
        match=r"not a siglip-dense task checkpoint: pass .*export directory.*backbone\.checkpoint=",
    ):
        siglip_dense.load_model(str(backbone))
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(
        CheckpointFormatError,
        match=r"foreign\.ckpt has no 'siglip_dense' entry .*expected a checkpoint written by siglip-dense's train\.py .*or an export directory",
    ):
        siglip_dense.load_model(str(foreign))


@pytest.mark.parametrize("shape", [(100, 3, 3), (3, 3, 3), (9, 1, 3), (4, 40, 4)])
def test_narrow_images_predict_from_arrays_and_paths(seg_ckpt: Path, tmp_path: Path, shape: tuple) -> None:
    """Images 1, 3 or 4 pixels wide (or high) are valid: numpy is channels-last, and the input is
    converted once (the old second conversion read a 3×H×3 tensor as ambiguous and refused it)."""
    model = load_model(seg_ckpt)
    arr = np.random.default_rng(5).integers(0, 256, shape, dtype=np.uint8)
    pred = model.predict(arr)
    assert pred.shape == shape[:2]
    path = tmp_path / "narrow.png"
    Image.fromarray(arr).save(path)
    same(model.predict(str(path)), model.predict(arr[..., :3]))
    same(model.predict([arr, str(path)])[0], pred)
    written = run_predict(seg_ckpt, path, tmp_path / "out")
    labels = np.asarray(Image.open(next(p for p in written if not p.stem.endswith("_vis"))))
    assert labels.shape == shape[:2]


def test_big_endian_16_bit_grey_reads_like_little_endian(seg_ckpt: Path, tmp_path: Path) -> None:
    """A 16-bit TIFF saved big-endian (PIL mode I;16B) reads as the little-endian PNG of the same
    values, in the training reader and in predict (it was clipped to 255 by convert("RGB"))."""
    from siglip_dense.data.io import read_image

    values = np.random.default_rng(4).integers(0, 60000, (24, 20)).astype(np.uint16)
    big, little = tmp_path / "big.tif", tmp_path / "little.png"
    Image.fromarray(values.astype(">u2")).save(big)
    Image.fromarray(values).save(little)
    assert Image.open(big).mode == "I;16B"
    scaled = (values / values.max() * 255.0).round().astype(np.uint8)  # numpy reference
    assert np.array_equal(read_image(big), np.repeat(scaled[..., None], 3, axis=2))
    assert np.array_equal(read_image(big), read_image(little))
    model = load_model(seg_ckpt)
    reference = model.predict(scaled)
    same(model.predict(big), reference)
    for mode, dtype in (("I;16B", ">u2"), ("I;16L", "<u2"), ("I;16N", "=u2")):
        image = Image.frombytes(mode, (20, 24), values.astype(dtype).tobytes())
        same(model.predict(image), reference, mode)


def test_predict_folder_with_a_corrupt_file_into_itself(
    seg_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """tools/predict.py with output= the input folder and one corrupt file: the good images are
    predicted, the bad one is warned about by name, listed at the end as one ``error:`` line, and
    the exit status is 1; a second run reads the same inputs (not the first run's outputs)."""
    from siglip_dense.cli import predict

    src = tmp_path / "in"
    src.mkdir()
    for name in ("a.png", "b.jpg"):
        Image.fromarray(rgb_image(24, 32)).save(src / name)
    (src / "photo_vis.png").write_bytes(b"not an image")  # named like no output of ours: an input
    for _ in range(2):
        with pytest.warns(UserWarning, match="skipped .*photo_vis.png"), pytest.raises(SystemExit) as info:
            predict([f"ckpt_path={seg_ckpt}", f"input={src}", f"output={src}"])
        assert info.value.code == 1
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "1 of 3 images could not be read" in errors[0], errors
        assert str(src / "photo_vis.png") in errors[0]
        assert {"a.png.png", "a.png_vis.png", "b.jpg.png", "b.jpg_vis.png"} <= {p.name for p in src.iterdir()}


def test_missing_path_in_a_batch_names_its_index(seg_ckpt: Path, tmp_path: Path) -> None:
    from siglip_dense.data.io import DataError

    missing = tmp_path / "nope.png"
    with pytest.raises(DataError, match=rf"image 1: image file not found: {re.escape(str(missing))}"):
        load_model(seg_ckpt).predict([rgb_image(), missing])
