"""Data layer: toy layout, ADE20K-style dataset, mmseg train pipeline, worker seeding, bad inputs."""

from __future__ import annotations

import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch
from PIL import Image

from siglip_dense.data.ade20k import ADE20K_CLASSES
from siglip_dense.data.io import DataError, read_image, read_label, write_label
from siglip_dense.data.samplers import PerSampleSeeded, SeededIndex, worker_seed
from siglip_dense.data.seg_folder import SegFolderDataset, load_class_names, reduce_zero_label
from siglip_dense.data.segmentation import SegDataModule, collate_seg_eval
from siglip_dense.data.toy import (
    MARKER,
    SIZE_RANGE,
    SKY,
    SKY_DEPTH,
    TOY_CLASSES,
    ensure_toy_data,
    make_scene,
)
from siglip_dense.data.transforms import (
    PhotoMetricDistortion,
    RandomCropCatMax,
    build_seg_eval_transform,
    build_seg_train_transform,
    seed_transform,
)

K = len(TOY_CLASSES)


def _pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    imgs = sorted((root / "images" / split).glob("*.jpg"))
    return [(p, root / "annotations" / split / f"{p.stem}.png") for p in imgs]


def make_folder(toy_root: Path, dest: Path, n: int = 3, copies_of_first: bool = False) -> Path:
    """A small ADE20K-layout folder copied from the toy data (split 'training')."""
    src = _pairs(toy_root, "validation")
    for d in ("images/training", "annotations/training"):
        (dest / d).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img, ann = src[0 if copies_of_first else i]
        shutil.copy(img, dest / "images" / "training" / f"s{i}.jpg")
        shutil.copy(ann, dest / "annotations" / "training" / f"s{i}.png")
    (dest / "classes.txt").write_text("\n".join(TOY_CLASSES) + "\n")
    return dest


# -- toy data ------------------------------------------------------------------------------------------
def test_toy_layout(toy_data_root: Path) -> None:
    assert (toy_data_root / "classes.txt").read_text().split("\n")[:K] == list(TOY_CLASSES)
    train, val = _pairs(toy_data_root, "training"), _pairs(toy_data_root, "validation")
    assert len(train) >= 100 and len(val) >= 20
    counts = np.zeros(256, np.int64)
    shapes = set()
    for img_path, ann_path in train[:40] + val:
        assert ann_path.is_file(), ann_path
        img, ann = Image.open(img_path), Image.open(ann_path)
        assert img.mode == "RGB" and ann.mode == "L"
        assert img.size == ann.size
        assert SIZE_RANGE[0] <= min(img.size) and max(img.size) <= SIZE_RANGE[1]
        shapes.add(img.size)
        counts += np.bincount(np.asarray(ann).ravel(), minlength=256)
    assert counts[K + 1 :].sum() == 0, "label values beyond the class count"
    assert (counts[1 : K + 1] > 0).all(), "every class appears"
    zero_frac = counts[0] / counts.sum()
    assert 0 < zero_frac < 0.02, zero_frac  # reduce_zero_label matters, but few pixels are ignored
    assert len(shapes) > 10 and any(w != h for w, h in shapes)


def test_ensure_toy_data_idempotent_and_race_safe(toy_data_root: Path, tmp_path: Path) -> None:
    ann = _pairs(toy_data_root, "training")[0][1]
    before = ann.stat().st_mtime_ns
    assert ensure_toy_data(toy_data_root) == toy_data_root
    assert ann.stat().st_mtime_ns == before

    root = tmp_path / "race" / "toy"
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: ensure_toy_data(root, num_train=3, num_val=2, seed=1), range(3)))
    assert all(r == root for r in results)
    assert (root / MARKER).is_file()
    assert len(list((root / "images" / "training").iterdir())) == 3
    assert sorted(p.name for p in root.parent.iterdir()) == ["toy"], "temp dirs left behind"

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "precious.txt").write_text("x")
    with pytest.raises(DataError, match="not a complete toy dataset"):
        ensure_toy_data(tmp_path / "other", num_train=1, num_val=1)


def test_make_scene_consistent() -> None:
    a = make_scene(np.random.default_rng(5), 180, 230)
    b = make_scene(np.random.default_rng(5), 180, 230)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.semantic, b.semantic)
    assert a.image.shape == (180, 230, 3) and a.image.dtype == np.uint8
    assert a.semantic.dtype == np.uint8 and a.depth.dtype == np.float32
    assert 2 <= len(a.instances) <= 6
    union = np.zeros(a.semantic.shape, int)
    for cls, mask in a.instances:
        assert 4 <= cls <= K and mask.dtype == bool and mask.any()
        labelled = a.semantic[mask]
        assert np.isin(labelled, [0, cls]).all()  # own class, or the unlabelled outline/clutter
        union += mask
    assert union.max() == 1, "instance masks overlap"
    sky = a.semantic == SKY
    assert (a.depth[sky] == SKY_DEPTH).all()
    solid = (a.semantic > 0) & ~sky
    assert (a.depth[solid] > 0.3).all() and (a.depth <= 10.0).all()


# -- io and dataset ----------------------------------------------------------------------------------------
def test_reduce_zero_label() -> None:
    label = np.array([[0, 1, 2], [150, 255, 7]], np.uint8)
    assert reduce_zero_label(label).tolist() == [[255, 0, 1], [149, 255, 6]]
    assert reduce_zero_label(label).dtype == np.uint8


def test_read_image_modes(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("L").save(tmp_path / "g.png")
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "a.png")
    Image.fromarray(rgb).convert("P").save(tmp_path / "p.png")
    for name in ("g.png", "a.png", "p.png"):
        out = read_image(tmp_path / name)
        assert out.shape == (7, 9, 3) and out.dtype == np.uint8
    assert np.array_equal(read_image(tmp_path / "a.png"), rgb)
    write_label(tmp_path / "l.png", rgb[..., 0])
    assert np.array_equal(read_label(tmp_path / "l.png"), rgb[..., 0])
    with pytest.raises(DataError, match="not found"):
        read_image(tmp_path / "missing.jpg")


def test_dataset_item(toy_data_root: Path) -> None:
    ds = SegFolderDataset(toy_data_root, "validation", num_classes=K)
    img_path, ann_path = ds.samples[0]
    item = ds[0]
    raw = read_image(img_path)
    h, w = raw.shape[:2]
    assert item["image"].shape == (3, h, w) and item["image"].dtype == torch.float32
    expected = (torch.from_numpy(raw).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    assert torch.allclose(item["image"], expected, atol=1e-5)
    assert item["mask"].dtype == torch.int64 and item["mask"].shape == (h, w)
    assert torch.equal(item["mask"], torch.from_numpy(reduce_zero_label(read_label(ann_path))).long())
    assert set(item["mask"].unique().tolist()) <= set(range(K)) | {255}
    assert item["meta"] == {
        "path": str(img_path),
        "ann_path": str(ann_path),
        "stem": img_path.stem,
        "orig_size": (h, w),
    }


def test_class_names(tmp_path: Path, toy_data_root: Path) -> None:
    assert len(ADE20K_CLASSES) == 150 and ADE20K_CLASSES[0] == "wall" and ADE20K_CLASSES[-1] == "flag"
    assert load_class_names(tmp_path, "ade20k") == list(ADE20K_CLASSES)
    assert load_class_names(toy_data_root, "ade20k") == list(TOY_CLASSES)
    assert load_class_names(toy_data_root, "folder", ["a", "b"]) == ["a", "b"]
    with pytest.raises(DataError, match="classes.txt"):
        load_class_names(tmp_path, "folder")


# -- train transform ---------------------------------------------------------------------------------------
def test_train_transform_crop_shape(toy_data_root: Path) -> None:
    t = build_seg_train_transform((96, 128), base_size=(512, 192), seed=0)
    ds = SegFolderDataset(toy_data_root, "training", transform=t, num_classes=K)
    for i in range(6):
        item = ds[i]
        assert item["image"].shape == (3, 96, 128) and item["mask"].shape == (96, 128)
        values = set(item["mask"].unique().tolist())
        assert values <= set(range(K)) | {255}


def test_train_transform_pads_with_ignore() -> None:
    # scale = min(50/50, 40/40) = 1 with ratio 1: the 40x50 image stays smaller than the 64 crop
    t = build_seg_train_transform((64, 64), scale_range=(1.0, 1.0), base_size=(50, 40), seed=3)
    image = np.full((40, 50, 3), 200, np.uint8)
    mask = np.ones((40, 50), np.uint8)
    for _ in range(4):
        out = t(image=image, mask=mask)
        img, m = out["image"], torch.as_tensor(out["mask"])
        assert img.shape == (3, 64, 64) and m.shape == (64, 64)
        pad = torch.ones(64, 64, dtype=torch.bool)
        pad[:40, :50] = False
        assert (m[pad] == 255).all() and (m[~pad] == 1).all()
        assert torch.allclose(img[:, pad], torch.tensor(0.0))  # the mean colour: 0 after normalising


def test_train_transform_keeps_image_and_mask_aligned() -> None:
    rng = np.random.default_rng(0)
    colours = np.array([[250, 0, 0], [0, 250, 0], [0, 0, 250], [250, 250, 0], [0, 250, 250]], np.uint8)
    blocks = rng.integers(0, len(colours), (12, 15))
    blocks[:, 0] = 0  # left/right asymmetric so a flip of only one target would show
    blocks[:, -1] = 3
    label = np.kron(blocks, np.ones((16, 16), int)).astype(np.uint8)
    image = colours[label]
    full = build_seg_train_transform((128, 128), base_size=(400, 200), seed=1)
    geometric = A.Compose([tr for tr in full.transforms if not isinstance(tr, PhotoMetricDistortion)])
    seed_transform(geometric, 1)
    flipped_seen = False
    for _ in range(8):
        out = geometric(image=image, mask=label)
        rgb = ((out["image"].permute(1, 2, 0).numpy() * 0.5 + 0.5) * 255).astype(np.float32)
        m = torch.as_tensor(out["mask"]).numpy()
        interior = m != 255  # away from block edges, where bilinear resizing blends colours
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                interior &= m == np.roll(m, (dy, dx), axis=(0, 1))
        nearest = np.argmin(((rgb[..., None, :] - colours[None, None].astype(np.float32)) ** 2).sum(-1), -1)
        assert interior.mean() > 0.3
        agree = (nearest[interior] == m[interior]).mean()
        assert agree > 0.99, agree
        flipped_seen |= geometric.transforms[2].params != {}
    assert flipped_seen


def test_cat_max_ratio_respected_when_possible() -> None:
    mask = np.zeros((200, 200), np.uint8)
    mask[:, 100:] = 1  # a 64 crop is acceptable only when it straddles x=100 with >= 25% minority
    image = np.zeros((200, 200, 3), np.uint8)

    def acceptable_fraction(ratio: float) -> float:
        t = A.Compose([RandomCropCatMax(64, 64, cat_max_ratio=ratio)], seed=0)
        ok = 0
        for _ in range(60):
            crop = t(image=image, mask=mask)["mask"]
            assert crop.shape == (64, 64)
            ok += np.bincount(crop.ravel(), minlength=2).max() / crop.size < 0.75
        return ok / 60

    assert acceptable_fraction(0.75) > 0.85
    assert acceptable_fraction(1.0) < 0.5  # cat_max_ratio=1 disables the check: plain random crops


# -- datamodule and seeding --------------------------------------------------------------------------------
def _first_batches(dm: SegDataModule, n: int) -> list[torch.Tensor]:
    dm.setup("fit")
    torch.manual_seed(123)  # DataLoader base seed (seed_everything does this in a run)
    out = []
    for i, batch in enumerate(dm.train_dataloader()):
        out.append(batch["image"])
        if i + 1 == n:
            break
    return out


def test_workers_augment_differently_and_reproducibly(toy_data_root: Path, tmp_path: Path) -> None:
    root = make_folder(toy_data_root, tmp_path / "same", n=4, copies_of_first=True)
    kwargs = dict(
        dataset="folder", val_split="training", crop_size=(64, 64), base_size=(256, 160), batch_size=1
    )
    dm = SegDataModule(root, num_workers=2, **kwargs)
    assert dm.class_names == list(TOY_CLASSES) and dm.num_classes == K
    first = _first_batches(dm, 4)  # workers alternate: batches 0, 2 from worker 0; 1, 3 from worker 1
    assert not torch.equal(first[0], first[1]), "both workers drew the same augmentation"
    again = _first_batches(SegDataModule(root, num_workers=2, **kwargs), 4)
    assert all(torch.equal(a, b) for a, b in zip(first, again))

    seeded = [_first_batches(SegDataModule(root, num_workers=0, seed=s, **kwargs), 2) for s in (7, 7, 8)]
    assert all(torch.equal(a, b) for a, b in zip(seeded[0], seeded[1]))
    assert not torch.equal(seeded[0][0], seeded[2][0])
    assert worker_seed(1000, 0, 0) != worker_seed(1000, 0, 1) != worker_seed(1001, 1, 1)


def test_datamodule_val_and_train_batches(toy_data_root: Path) -> None:
    dm = SegDataModule(
        toy_data_root, toy=True, crop_size=(64, 64), base_size=(256, 160), batch_size=4, num_workers=0
    )
    dm.mean, dm.std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # set before setup, like train.py
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 64, 64) and batch["mask"].shape == (4, 64, 64)
    assert batch["image"].min() >= 0.0  # mean 0 / std 1: the new statistics were used
    assert [m["path"] for m in batch["meta"]] and all("path" in m for m in batch["meta"])
    val = next(iter(dm.val_dataloader()))
    assert isinstance(val["image"], list) and len(val["image"]) == 1
    assert val["image"][0].shape[1:] == val["mask"][0].shape == val["meta"][0]["orig_size"]
    pair = collate_seg_eval([dm.val_dataset[0], dm.val_dataset[1]])
    assert len(pair["image"]) == 2


# -- bad inputs ------------------------------------------------------------------------------------------
def _corrupt(root: Path, kind: str) -> Path:
    """Break sample s0 of a folder dataset the given way; returns the file to be named."""
    img = root / "images" / "training" / "s0.jpg"
    ann = root / "annotations" / "training" / "s0.png"
    if kind == "truncated_jpeg":
        data = img.read_bytes()
        img.write_bytes(data[: len(data) // 2])
        return img
    label = read_label(ann)
    if kind == "size_mismatch":
        write_label(ann, label[:-3, :])
    elif kind == "label_out_of_range":
        label[:5, :5] = 20
        write_label(ann, label)
    elif kind == "rgb_label":
        Image.fromarray(np.stack([label] * 3, -1)).save(ann)
    return ann


BAD_KINDS = {
    "truncated_jpeg": "cannot decode image",
    "size_mismatch": "is \\d+x\\d+ \\(WxH\\) but its image",
    "label_out_of_range": "label values \\[20\\]",
    "rgb_label": "single-channel class ids",
}


@pytest.mark.parametrize("kind", list(BAD_KINDS))
def test_bad_sample_is_a_clear_error(kind: str, toy_data_root: Path, tmp_path: Path) -> None:
    root = make_folder(toy_data_root, tmp_path / kind, n=2)
    bad = _corrupt(root, kind)
    ds = SegFolderDataset(root, "training", num_classes=K)
    with pytest.raises(DataError, match=BAD_KINDS[kind]) as info:
        ds[0]
    assert str(bad) in str(info.value)
    assert ds[1]["meta"]["stem"] == "s1"


@pytest.mark.parametrize("kind", list(BAD_KINDS))
def test_skip_bad_counts_and_warns(kind: str, toy_data_root: Path, tmp_path: Path) -> None:
    root = make_folder(toy_data_root, tmp_path / kind, n=2)
    _corrupt(root, kind)
    ds = SegFolderDataset(root, "training", num_classes=K, skip_bad=True)
    with pytest.warns(UserWarning, match="skipped bad sample \\(1 so far"):
        item = PerSampleSeeded(ds)[SeededIndex(0, 0)]  # training: a substitute (the only good one)
    assert item["meta"]["stem"] == "s1" and ds.num_skipped == 1


def test_missing_annotation(toy_data_root: Path, tmp_path: Path) -> None:
    root = make_folder(toy_data_root, tmp_path / "ds", n=3)
    ann = root / "annotations" / "training" / "s1.png"
    ann.unlink()
    with pytest.raises(DataError, match="has no annotation") as info:
        SegFolderDataset(root, "training", num_classes=K)
    assert str(ann) in str(info.value) and str(root / "images" / "training" / "s1.jpg") in str(info.value)
    with pytest.warns(UserWarning, match="dropped 1 of 3 images"):
        ds = SegFolderDataset(root, "training", num_classes=K, skip_bad=True)
    assert [p.stem for p, _ in ds.samples] == ["s0", "s2"]


def test_no_images(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "images" / "training"))):
        SegFolderDataset(tmp_path, "training")


def test_eval_transform_keeps_size() -> None:
    out = build_seg_eval_transform((0.5,) * 3, (0.5,) * 3)(
        image=np.zeros((33, 47, 3), np.uint8), mask=np.zeros((33, 47), np.uint8)
    )
    assert out["image"].shape == (3, 33, 47) and torch.allclose(out["image"], torch.tensor(-1.0))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("layout", "entry"), [("ade20k", "images"), ("coco", "annotations"), ("nyu", "splits")]
)
def test_make_toy_data_tool_writes_each_layout(layout: str, entry: str, tmp_path: Path) -> None:
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / layout
    cmd = [sys.executable, "tools/make_toy_data.py", str(out), "--layout", layout, "--num-train", "2"]
    proc = subprocess.run([*cmd, "--num-val", "1"], cwd=repo, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / entry).is_dir() and layout in proc.stdout
