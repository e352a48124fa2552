"""Every data layout README documents is built here file by file, exactly as its tree shows, and
trains for a few steps with the documented data config (``data=<config> data.root=ROOT``).

The trees are read from README.md (the ``<!-- layout: name -->`` blocks), so the documentation and
what the loaders read cannot drift apart: each builder must write exactly the files of its tree.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from siglip_dense.train import run_train
from tests.conftest import REPO, compose_train_cfg

H, W = 64, 80  # every generated image; labels / depth maps at the same size
RNG = np.random.default_rng(0)

# -- the README trees ------------------------------------------------------------------------------
TREE_PREFIX = re.compile(r"^((?:│   |    )*)(?:├── |└── )?")


def readme_tree(layout: str) -> list[str]:
    """The file paths (relative to the tree's root folder) of README's ``<!-- layout: ... -->`` tree.

    Tree lines are ``<prefix><name>[  # comment]`` with 4-character levels; ``...`` lines stand for
    more files of the same kind and are left out, as are the folders themselves.
    """
    text = (REPO / "README.md").read_text()
    marker = f"<!-- layout: {layout} -->"
    assert marker in text, f"README.md has no {marker}"
    block = text.split(marker, 1)[1].split("```text\n", 1)[1].split("```", 1)[0]
    stack: list[str] = []
    files = []
    for line in block.splitlines()[1:]:  # the first line is the root folder
        prefix = TREE_PREFIX.match(line)
        assert prefix is not None
        depth = len(prefix.group(0)) // 4 - 1
        name = line[prefix.end() :].split("  #")[0].strip()
        if name == "...":
            continue
        stack = stack[:depth] + [name.rstrip("/")]
        if not name.endswith("/"):
            files.append("/".join(stack))
    return sorted(files)


def written_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# -- file writers ------------------------------------------------------------------------------------
def write_image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RNG.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(path)


def write_labels(path: Path, num_classes: int, offset: int) -> None:
    """Left half / right half of two label ids (``offset`` = the first valid id, 1 under ADE20K)."""
    label = np.full((H, W), offset, np.uint8)
    label[:, W // 2 :] = offset + num_classes - 1
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(label).save(path)


def write_depth_png(path: Path, metres: float) -> None:
    depth = np.full((H, W), int(metres * 1000), np.uint16)  # millimetres
    depth[: H // 2] += 500
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(depth).save(path)


def write_depth_npy(path: Path, metres: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.full((H, W), metres, np.float32))


def coco_json(images: list[tuple[int, str]], path: Path) -> None:
    """A COCO instances json: one box per image, gapped category ids (2, 7)."""
    anns = []
    for i, (image_id, _) in enumerate(images):
        anns.append(
            {"id": i + 1, "image_id": image_id, "category_id": (2, 7)[i % 2], "bbox": [8, 10, 30, 28]}
            | {"area": 30.0 * 28.0, "iscrowd": 0, "segmentation": [[8, 10, 38, 10, 38, 38, 8, 38]]}
        )
    data = {
        "images": [{"id": i, "file_name": f, "height": H, "width": W} for i, f in images],
        "annotations": anns,
        "categories": [{"id": 2, "name": "cup"}, {"id": 7, "name": "plate"}],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


# -- one builder per documented tree -------------------------------------------------------------------
def build_ade20k(root: Path) -> None:
    for split, stems in (("training", [1, 2]), ("validation", [1])):
        kind = "train" if split == "training" else "val"
        for n in stems:
            write_image(root / "images" / split / f"ADE_{kind}_{n:08d}.jpg")
            write_labels(root / "annotations" / split / f"ADE_{kind}_{n:08d}.png", 150, offset=1)


def build_seg_folder(root: Path) -> None:
    root.mkdir(parents=True)
    (root / "classes.txt").write_text("road\ncar\nperson\n")
    for split, names in (
        ("training", ["street_001.jpg", "street_002.png"]),
        ("validation", ["street_101.jpg"]),
    ):
        for name in names:
            write_image(root / "images" / split / name)
            write_labels(root / "annotations" / split / f"{Path(name).stem}.png", 3, offset=0)


def build_coco(root: Path) -> None:
    for split, ids in (("train2017", [1, 2]), ("val2017", [101])):
        images = [(i, f"{i:012d}.jpg") for i in ids]
        for _, name in images:
            write_image(root / split / name)
        coco_json(images, root / "annotations" / f"instances_{split}.json")


def build_nyu(root: Path) -> None:
    lines = {"train": [], "val": []}
    for split, folder, n in (("train", "train/kitchen_0001", 1), ("train", "train/kitchen_0001", 2)) + (
        ("val", "test/bathroom", 45),
    ):
        rgb, depth = f"{folder}/rgb_{n:05d}.jpg", f"{folder}/sync_depth_{n:05d}.png"
        write_image(root / rgb)
        write_depth_png(root / depth, 1.5 + n / 100)
        lines[split].append(f"{'/' if split == 'train' else ''}{rgb} {depth} 518.8579")  # BTS: leading "/"
    for split, entries in lines.items():
        (root / "splits").mkdir(parents=True, exist_ok=True)
        (root / "splits" / f"{split}.txt").write_text("\n".join(entries) + "\n")


def build_depth_folder(root: Path) -> None:
    write_image(root / "images" / "train" / "frame_0001.jpg")
    write_depth_png(root / "depth" / "train" / "frame_0001.png", 2.0)
    write_image(root / "images" / "train" / "frame_0002.png")
    write_depth_npy(root / "depth" / "train" / "frame_0002.npy", 3.0)
    write_image(root / "images" / "val" / "frame_0101.jpg")
    write_depth_png(root / "depth" / "val" / "frame_0101.png", 2.5)


SHORT = ["data.num_workers=0", "data.batch_size=2", "trainer.max_steps=2", "num_vis=0", "validate=false"]
SEG = ["experiment=toy_seg", "data.crop_size=[64,64]", "data.base_size=[160,64]", *SHORT]
DEPTH = ["experiment=toy_depth", "data.crop_size=[48,64]", "data.short_side=null", *SHORT]
LAYOUTS: dict[str, tuple[Callable[[Path], None], list[str]]] = {
    "ade20k": (build_ade20k, ["data=ade20k", *SEG]),
    "seg_folder": (build_seg_folder, ["data=seg_folder", *SEG]),
    "coco": (build_coco, ["experiment=toy_det", "data=coco", "data.image_size=64", *SHORT]),
    "nyu": (build_nyu, ["data=nyu", *DEPTH]),
    "depth_folder": (build_depth_folder, ["data=depth_folder", *DEPTH]),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_documented_layout_trains(layout: str, tmp_path: Path, hydra_cleanup: None) -> None:
    """Exactly README's tree, written by hand, trains two steps (one validation) with its config."""
    build, overrides = LAYOUTS[layout]
    root = tmp_path / "data"
    build(root)
    assert written_files(root) == readme_tree(layout)
    run_dir = tmp_path / "run"
    cfg = compose_train_cfg([*overrides, f"data.root={root}"], run_dir)
    run_train(cfg)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    import torch

    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] == 2
    weights = [v for k, v in state["state_dict"].items() if k.endswith("weight")]
    assert all(bool(torch.isfinite(v).all()) for v in weights)
    if layout == "seg_folder":
        assert state["hyper_parameters"]["class_names"] == ["road", "car", "person"]
    if layout == "coco":
        assert state["hyper_parameters"]["category_ids"] == [2, 7]


def test_depth_folder_warns_when_the_crop_is_larger_than_the_images(tmp_path: Path) -> None:
    from siglip_dense.data.depth import DepthDataModule

    build_depth_folder(tmp_path / "d")
    dm = DepthDataModule(root=tmp_path / "d", dataset="folder", crop_size=(256, 256), num_workers=0)
    with pytest.warns(UserWarning, match=rf"crop_size \[256, 256\].*smallest {H}x{W}.*crop_size=\[{H},{W}\]"):
        dm.setup("fit")
    fits = DepthDataModule(root=tmp_path / "d", dataset="folder", crop_size=(H, W), num_workers=0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=".*(set_vital|zero pixels).*")
        fits.setup("fit")
    assert not math.isnan(float(fits.train_dataset[0]["depth"].mean()))


def test_depth_folder_under_a_recipe_with_short_side_still_warns(tmp_path: Path, hydra_cleanup: None) -> None:
    """``experiment=toy_depth data=depth_folder``: the recipe resizes to a short side of 128, the folder's
    default crop is 256: crops are mostly padding, and the warning names the size that fits."""
    from hydra.utils import instantiate

    build_depth_folder(tmp_path / "d")  # 64×80 images → 128×160 after the resize
    cfg = compose_train_cfg(
        ["experiment=toy_depth", "data=depth_folder", f"data.root={tmp_path / 'd'}"], tmp_path
    )
    assert (cfg.data.short_side, list(cfg.data.crop_size)) == (128, [256, 256])
    dm = instantiate(cfg.data, num_workers=0, scan=False)
    match = (
        r"crop_size \[256, 256\].*resized to data.short_side=128 \(smallest 128x160.*crop_size=\[128,160\]"
    )
    with pytest.warns(UserWarning, match=match):
        dm.setup("fit")
    fits = instantiate(cfg.data, num_workers=0, scan=False, crop_size=[128, 160])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=".*(set_vital|zero pixels).*")
        fits.setup("fit")
