"""Synthetic textured scenes written in the real dataset layouts, so the CPU default run needs no download.

One generator serves every task: a :class:`Scene` carries the image, an ADE20K-style semantic map,
per-object instance masks (COCO later) and metric depth (NYUv2 later). Each class has its own colour
distribution and texture, so a tiny ViT can learn it from 128-px crops within a few CPU minutes.
"""

from __future__ import annotations

import colorsys
import contextlib
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from siglip_dense.data.io import DataError, write_label

# Label value = index in this tuple + 1 (ADE20K convention: 0 = other/ignored).
TOY_CLASSES: tuple[str, ...] = ("wall", "floor", "sky", "ball", "box", "cone", "ring", "flag")
WALL, FLOOR, SKY, BALL, BOX, CONE, RING, FLAG = range(1, 9)
STUFF_CLASSES = (WALL, FLOOR, SKY)
THING_CLASSES = (BALL, BOX, CONE, RING, FLAG)

SIZE_RANGE = (160, 256)  # image heights and widths are drawn independently from this range
MAX_DEPTH = 10.0  # metres; NYUv2's valid range ends here
SKY_DEPTH = 0.0  # no measurement, the NYUv2 PNG convention for invalid pixels
MARKER = ".toy_complete"
DEFAULT_NUM_TRAIN = 160
DEFAULT_NUM_VAL = 40


@dataclass
class Scene:
    """One synthetic sample. ``instances`` holds (label value 1..K, visible bool mask) for things only."""

    image: np.ndarray  # H×W×3 uint8 RGB
    semantic: np.ndarray  # H×W uint8, 0 = other/ignored, 1..K = TOY_CLASSES[k - 1]
    instances: list[tuple[int, np.ndarray]]
    depth: np.ndarray  # H×W float32 metres, SKY_DEPTH where there is no surface


@dataclass(frozen=True)
class _Look:
    """A class's colour distribution: base hue/sat/val ranges and the second colour of its texture."""

    hue: float  # degrees
    sat: tuple[float, float]
    val: tuple[float, float]
    sat2: float  # second colour's saturation factor
    val2: float  # second colour's value factor


LOOKS: dict[int, _Look] = {
    WALL: _Look(35, (0.12, 0.28), (0.68, 0.85), 0.4, 1.25),
    FLOOR: _Look(25, (0.40, 0.60), (0.33, 0.50), 1.0, 0.65),
    SKY: _Look(212, (0.45, 0.70), (0.75, 0.95), 0.1, 1.15),
    BALL: _Look(0, (0.70, 0.90), (0.65, 0.90), 1.0, 0.45),
    BOX: _Look(120, (0.55, 0.80), (0.45, 0.70), 0.6, 1.5),
    CONE: _Look(52, (0.75, 0.95), (0.80, 0.95), 1.0, 0.45),
    RING: _Look(300, (0.55, 0.80), (0.55, 0.80), 0.2, 1.4),
    FLAG: _Look(186, (0.70, 0.95), (0.55, 0.75), 0.0, 1.6),
}


def _colour_pair(rng: np.random.Generator, look: _Look) -> tuple[np.ndarray, np.ndarray]:
    hue = ((look.hue + rng.uniform(-10, 10)) % 360) / 360.0
    s, v = rng.uniform(*look.sat), rng.uniform(*look.val)
    c1 = np.array(colorsys.hsv_to_rgb(hue, s, v), dtype=np.float32)
    c2 = np.array(colorsys.hsv_to_rgb(hue, min(1.0, s * look.sat2), min(1.0, v * look.val2)), np.float32)
    return c1 * 255.0, c2 * 255.0


def _rotated(yy: np.ndarray, xx: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = np.cos(angle), np.sin(angle)
    return c * xx + s * yy, -s * xx + c * yy


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    small = rng.random((cells, cells + 1)).astype(np.float32)
    return np.clip(cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC), 0.0, 1.0)


# -- textures: pattern in [0, 1] over the full image; 0 = first colour, 1 = second colour ---------------
Texture = Callable[[np.random.Generator, np.ndarray, np.ndarray, float, float, float], np.ndarray]


def _bricks(rng, yy, xx, cx, cy, size):  # noqa: ANN001, ANN202 - internal texture callbacks
    bh = rng.uniform(8, 13)
    bw = bh * rng.uniform(1.8, 2.6)
    row = np.floor(yy / bh)
    xs = xx + (row % 2) * bw / 2
    return (((yy % bh) < 1.6) | ((xs % bw) < 1.6)).astype(np.float32)


def _tiles(rng, yy, xx, cx, cy, size):  # noqa: ANN001, ANN202
    period = rng.uniform(14, 24)
    u, v = _rotated(yy, xx, rng.uniform(-0.3, 0.3))
    return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)


def _clouds(rng, yy, xx, cx, cy, size):  # noqa: ANN001, ANN202
    h, w = yy.shape
    return np.clip((_smooth_noise(rng, h, w, 4) - 0.35) * 1.6, 0.0, 1.0)


def _shaded(rng, yy, xx, cx, cy, size):  # noqa: ANN001, ANN202
    lx, ly = cx - 0.35 * size, cy - 0.35 * size  # highlight up-left, dark rim
    dist = np.sqrt((xx - lx) ** 2 + (yy - ly) ** 2) / (1.6 * size)
    return np.clip(dist, 0.0, 1.0) ** 1.5


def _grid(rng, yy, xx, cx, cy, size):  # noqa: ANN001, ANN202
    period = rng.uniform(6, 10)
    u, v = _rotated(yy - cy, xx - cx, rng.uniform(0, np.pi / 2))
    return (((u % period) < 1.6) | ((v % period) < 1.6)).astype(np.float32)


def _hstripes(rng, yy, xx, cx, cy, size):  # noqa: ANN001, ANN202
    period = rng.uniform(6, 10)
    return (((yy - cy) % period) < period / 2).astype(np.float32)


def _dots(rng, yy, xx, cx, cy, size):  # noqa: ANN001, ANN202
    period = rng.uniform(6, 9)
    rad = period * 0.28
    u, v = (xx - cx) % period - period / 2, (yy - cy) % period - period / 2
    return (u * u + v * v < rad * rad).astype(np.float32)


def _diagonal(rng, yy, xx, cx, cy, size):  # noqa: ANN001, ANN202
    period = rng.uniform(6, 10)
    sign = 1 if rng.random() < 0.5 else -1
    return (((xx + sign * yy) % period) < period / 2).astype(np.float32)


TEXTURES: dict[int, Texture] = {
    WALL: _bricks,
    FLOOR: _tiles,
    SKY: _clouds,
    BALL: _shaded,
    BOX: _grid,
    CONE: _hstripes,
    RING: _dots,
    FLAG: _diagonal,
}


def _paint(
    rng: np.random.Generator,
    canvas: np.ndarray,
    mask: np.ndarray,
    cls: int,
    grids: tuple[np.ndarray, np.ndarray],
    centre: tuple[float, float],
    size: float,
) -> None:
    yy, xx = grids
    c1, c2 = _colour_pair(rng, LOOKS[cls])
    pattern = TEXTURES[cls](rng, yy, xx, centre[0], centre[1], size)
    colour = c1[None, None] + (c2 - c1)[None, None] * pattern[..., None]
    canvas[mask] = colour[mask]


# -- shapes ------------------------------------------------------------------------------------------
def _shape_mask(
    rng: np.random.Generator, cls: int, yy: np.ndarray, xx: np.ndarray, cx: float, cy: float, size: float
) -> np.ndarray:
    dx, dy = xx - cx, yy - cy
    if cls == BALL:
        return dx * dx + dy * dy <= size * size
    if cls == BOX:
        u, v = _rotated(dy, dx, rng.uniform(-0.5, 0.5))
        return (np.abs(u) <= size * 0.85) & (np.abs(v) <= size * 0.85)
    if cls == CONE:  # apex up
        top, height = cy - size, 2 * size
        frac = (yy - top) / height
        return (frac >= 0) & (frac <= 1) & (np.abs(dx) <= frac * size * rng.uniform(0.7, 1.0))
    if cls == RING:
        r2 = dx * dx + dy * dy
        return (r2 <= size * size) & (r2 >= (size * rng.uniform(0.45, 0.65)) ** 2)
    if cls == FLAG:
        shear = rng.uniform(-0.3, 0.3)
        return (np.abs(dx + shear * dy) <= size) & (np.abs(dy) <= size * rng.uniform(0.5, 0.75))
    raise ValueError(f"not a thing class: {cls}")


def _boundary(rng: np.random.Generator, w: int, y0: float, wiggle: float) -> np.ndarray:
    """Row of a region boundary per column: sloped, with a gentle wave (skylines, room corners)."""
    x = np.arange(w, dtype=np.float32)
    slope = rng.uniform(-0.15, 0.15)
    wave = wiggle * np.sin(x / rng.uniform(12, 30) + rng.uniform(0, 2 * np.pi))
    return y0 + slope * (x - w / 2) + wave


def make_scene(rng: np.random.Generator, height: int, width: int) -> Scene:
    """A textured background in 2-3 stuff regions with 2-6 occluding things in front, plus depth."""
    h, w = int(height), int(width)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    image = np.zeros((h, w, 3), np.float32)
    semantic = np.zeros((h, w), np.uint8)
    depth = np.zeros((h, w), np.float32)
    focal = 0.8 * w

    # stuff: sky and/or wall above, floor below
    layout = rng.choice(["indoor", "outdoor", "mixed"])
    floor_top = _boundary(rng, w, h * rng.uniform(0.45, 0.7), 2.0)[None, :]
    floor = yy >= floor_top
    upper = ~floor
    wall_depth = rng.uniform(3.5, 8.0) * (1 + rng.uniform(-0.25, 0.25) * (xx - w / 2) / w)
    wall_depth = wall_depth.astype(np.float32)
    if layout == "indoor":
        regions = {WALL: upper}
    elif layout == "outdoor":
        regions = {SKY: upper}
    else:
        sky_bottom = _boundary(rng, w, h * rng.uniform(0.15, 0.35), rng.uniform(2, 8))[None, :]
        sky_bottom = np.minimum(sky_bottom, floor_top - 8)
        regions = {SKY: upper & (yy < sky_bottom), WALL: upper & (yy >= sky_bottom)}
    regions[FLOOR] = floor
    far = np.full((h, w), MAX_DEPTH, np.float32) if layout == "outdoor" else wall_depth
    cam_height = rng.uniform(1.2, 1.7)
    floor_depth = np.minimum(cam_height * focal / np.maximum(yy - floor_top + 4.0, 1.0), far)
    for cls, region in regions.items():
        _paint(rng, image, region, cls, (yy, xx), (w / 2, h / 2), float(min(h, w)))
        semantic[region] = cls
    if WALL in regions:
        depth[regions[WALL]] = wall_depth[regions[WALL]]
    if SKY in regions:
        depth[regions[SKY]] = SKY_DEPTH
    depth[floor] = floor_depth[floor]

    # things: place, take the depth of the surface they stand on or hang from, draw far to near
    objects = []
    for _ in range(int(rng.integers(2, 7))):
        cls = int(rng.choice(THING_CLASSES))
        cx = rng.uniform(0.05, 0.95) * w
        cy = rng.uniform(0.15, 0.95) * h
        col = int(np.clip(cx, 0, w - 1))
        on_floor = cy >= floor_top[0, col]
        d = float(floor_depth[int(np.clip(cy, 0, h - 1)), col]) if on_floor else float(far[0, col]) - 0.3
        d = float(np.clip(d - rng.uniform(0.05, 0.3), 0.8, MAX_DEPTH - 0.5))
        size = float(np.clip(rng.uniform(0.5, 0.9) * focal / d, 10, 0.3 * min(h, w)))
        if on_floor:
            cy = min(cy, h + 0.3 * size) - size  # rests on the floor point it was placed at
        objects.append((d, cls, cx, cy, size))
    objects.sort(key=lambda o: -o[0])
    visible: list[tuple[int, np.ndarray]] = []
    zero_band = np.zeros((h, w), bool)
    for d, cls, cx, cy, size in objects:
        mask = _shape_mask(rng, cls, yy, xx, cx, cy, size)
        if not mask.any():
            continue
        _paint(rng, image, mask, cls, (yy, xx), (cx, cy), size)
        semantic[mask] = cls
        zero_band &= ~mask
        if cls == BALL:  # a sphere bulges towards the camera
            r = np.sqrt(np.clip(1 - ((xx - cx) ** 2 + (yy - cy) ** 2) / size**2, 0, 1))
            depth[mask] = (d - 0.5 * size * d / focal * r)[mask]
        else:  # planar, slightly tilted
            tilt = rng.uniform(-0.1, 0.1) * (yy - cy) / size
            depth[mask] = (d + tilt)[mask]
        visible = [(c, m & ~mask) for c, m in visible]
        visible.append((cls, mask))
        if rng.random() < 0.3:  # unlabelled outline, like ADE20K's annotators leave at fuzzy edges
            ring = cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool) & ~mask
            zero_band |= ring
    if rng.random() < 0.15:  # a little unlabelled clutter ("other")
        cx, cy, r = rng.uniform(0, w), rng.uniform(0.5 * h, h), rng.uniform(5, 12)
        blob = ((xx - cx) / r) ** 2 + ((yy - cy) / (0.6 * r)) ** 2 <= 1
        image[blob] = rng.uniform(60, 200)
        semantic[blob] = 0
        for _, m in visible:
            m &= ~blob
    semantic[zero_band] = 0

    # global illumination gradient, sensor noise, slight optical blur
    light = 1 + rng.uniform(-0.12, 0.12) * (xx - w / 2) / w + rng.uniform(-0.12, 0.12) * (yy - h / 2) / h
    image = image * light[..., None] + rng.normal(0, 5, image.shape).astype(np.float32)
    image = cv2.GaussianBlur(image, (3, 3), 0.6)
    image = np.clip(image, 0, 255).round().astype(np.uint8)
    instances = [(c, m) for c, m in visible if m.any()]
    return Scene(image=image, semantic=semantic, instances=instances, depth=depth.astype(np.float32))


def _scene_sizes(rng: np.random.Generator) -> tuple[int, int]:
    lo, hi = SIZE_RANGE
    return int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))


def write_ade20k_layout(root: str | Path, num_train: int, num_val: int, seed: int = 0) -> Path:
    """ROOT/images/{training,validation}/*.jpg (q95), ROOT/annotations/.../*.png, ROOT/classes.txt."""
    root = Path(root)
    train_ss, val_ss = np.random.SeedSequence(seed).spawn(2)  # independent splits
    for split, prefix, count, ss in (
        ("training", "ADE_train", num_train, train_ss),
        ("validation", "ADE_val", num_val, val_ss),
    ):
        rng = np.random.default_rng(ss)
        img_dir, ann_dir = root / "images" / split, root / "annotations" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        ann_dir.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            scene = make_scene(rng, *_scene_sizes(rng))
            stem = f"{prefix}_{i + 1:08d}"
            Image.fromarray(scene.image).save(img_dir / f"{stem}.jpg", quality=95)
            write_label(ann_dir / f"{stem}.png", scene.semantic)
    (root / "classes.txt").write_text("\n".join(TOY_CLASSES) + "\n")
    return root


# toy layouts by dataset convention -> the name of the writer function in this module
# (writer signature: (root, num_train, num_val, seed) -> root)
LAYOUT_WRITERS: dict[str, str] = {
    "ade20k": "write_ade20k_layout",
    "coco": "write_coco_layout",
    "nyu": "write_nyu_layout",
    "nyu_normals": "write_normals_layout",
    "voc": "write_voc_layout",
}


def ensure_toy_data(
    root: str | Path,
    num_train: int = DEFAULT_NUM_TRAIN,
    num_val: int = DEFAULT_NUM_VAL,
    seed: int = 0,
    layout: str = "ade20k",
) -> Path:
    """Generate a toy dataset in a real layout once; safe when several processes (DDP ranks) race.

    Data is written into a private temp dir next to ``root`` and renamed into place atomically, so a
    reader never sees a half-written dataset; the loser of a race discards its copy.
    """
    root = Path(root)
    if layout not in LAYOUT_WRITERS or LAYOUT_WRITERS[layout] not in globals():
        raise ValueError(f"unknown toy layout {layout!r}; known: {sorted(LAYOUT_WRITERS)}")
    writer = globals()[LAYOUT_WRITERS[layout]]
    params = {"num_train": int(num_train), "num_val": int(num_val), "seed": int(seed)}
    if layout != "ade20k":  # markers written before layouts existed stay valid
        params["layout"] = layout
    if _check_complete(root, params):
        return root
    if root.exists() and any(root.iterdir()) and not _check_complete(root, params):  # re-check: a racer
        raise DataError(
            f"{root} exists and is not a complete toy dataset (no {MARKER}); delete it or point "
            "data.root elsewhere (toy=true generates data there)"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        writer(tmp, num_train, num_val, seed)
        (tmp / MARKER).write_text(json.dumps(params))
        if root.exists():
            with contextlib.suppress(OSError):  # someone else may have just filled it
                root.rmdir()  # an empty placeholder
        try:
            os.rename(tmp, root)
        except OSError:
            if not _check_complete(root, params):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def _check_complete(root: Path, params: dict[str, Any]) -> bool:
    marker = root / MARKER
    if not marker.is_file():
        return False
    try:
        found = json.loads(marker.read_text())
    except ValueError:
        found = None
    if found != params:
        warnings.warn(
            f"toy data in {root} was generated with {found}, not {params}; using it as is "
            "(delete the directory to regenerate)",
            stacklevel=3,
        )
    return True


# -- COCO instances layout (detection / instance segmentation) -----------------------------------------
def toy_coco_categories() -> list[dict[str, Any]]:
    """Thing classes with GAPPED ids (1, 3, 5, ...), as COCO's own ids are, to exercise the label mapping."""
    return [
        {"id": 2 * i + 1, "name": TOY_CLASSES[cls - 1], "supercategory": "thing"}
        for i, cls in enumerate(THING_CLASSES)
    ]


def _polygons(mask: np.ndarray) -> list[list[float]]:
    """Outer contours of a binary mask as COCO polygons (x, y pairs), each with ≥ 3 points."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [c.reshape(-1).astype(float).tolist() for c in contours if len(c) >= 3]


def _uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's crowd encoding: column-major run lengths starting with a run of zeros."""
    flat = mask.astype(np.uint8).reshape(-1, order="F")
    edges = np.flatnonzero(np.diff(flat)) + 1  # where a new run starts
    counts = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    if flat[0]:
        counts = [0, *counts]  # runs alternate 0s, 1s, ... starting with zeros
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


def write_coco_layout(root: str | Path, num_train: int, num_val: int, seed: int = 0) -> Path:
    """ROOT/{train2017,val2017}/*.jpg and ROOT/annotations/instances_{train2017,val2017}.json.

    Instances are the scenes' visible things: polygons for most, compressed RLE (utf-8 counts) for
    every third, a tight bbox and the pixel area from the mask, ``iscrowd=0``; the first image of each
    split marks its last instance as a crowd region (uncompressed RLE, ``iscrowd=1``) like COCO does.
    """
    from pycocotools import mask as mask_utils

    root = Path(root)
    cats = toy_coco_categories()
    cat_of = {cls: cats[i]["id"] for i, cls in enumerate(THING_CLASSES)}
    train_ss, val_ss = np.random.SeedSequence([seed, 2017]).spawn(2)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, count, ss in (("train2017", num_train, train_ss), ("val2017", num_val, val_ss)):
        rng = np.random.default_rng(ss)
        img_dir = root / split
        img_dir.mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for i in range(count):
            h, w = _scene_sizes(rng)
            scene = make_scene(rng, h, w)
            image_id = i + 1
            name = f"{image_id:012d}.jpg"
            Image.fromarray(scene.image).save(img_dir / name, quality=95)
            images.append({"id": image_id, "file_name": name, "height": h, "width": w})
            for j, (cls, mask) in enumerate(scene.instances):
                ys, xs = np.nonzero(mask)
                x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
                crowd = i == 0 and j == len(scene.instances) - 1
                polys = _polygons(mask)
                if crowd:
                    seg: Any = _uncompressed_rle(mask)
                elif len(anns) % 3 == 2 or not polys:
                    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                    seg = {"size": rle["size"], "counts": rle["counts"].decode("utf-8")}
                else:
                    seg = polys
                anns.append(
                    {
                        "id": len(anns) + 1,
                        "image_id": image_id,
                        "category_id": cat_of[cls],
                        "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                        "area": float(mask.sum()),
                        "segmentation": seg,
                        "iscrowd": int(crowd),
                    }
                )
        data = {
            "info": {"description": "siglip-dense toy scenes in the COCO instances layout"},
            "licenses": [],
            "images": images,
            "annotations": anns,
            "categories": cats,
        }
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return root


def write_nyu_layout(root: str | Path, num_train: int, num_val: int, seed: int = 0) -> Path:
    """The BTS / Depth Anything NYUv2 layout: RGB jpg + 16-bit PNG depth in millimetres, split files.

    ROOT/{train,val}/toy_<k>/rgb_<i>.jpg and sync_depth_<i>.png (0 = no measurement: the sky), and
    ROOT/splits/{train,val}.txt with ``rgb_relpath depth_relpath focal`` lines (focal in pixels).
    """
    root = Path(root)
    (root / "splits").mkdir(parents=True, exist_ok=True)
    train_ss, val_ss = np.random.SeedSequence([seed, 7]).spawn(2)  # independent of the ADE20K toy set
    for split, count, ss in (("train", num_train, train_ss), ("val", num_val, val_ss)):
        rng = np.random.default_rng(ss)
        lines = []
        for i in range(count):
            h, w = _scene_sizes(rng)
            scene = make_scene(rng, h, w)
            rel = Path(split) / f"toy_{i // 10:04d}"
            (root / rel).mkdir(parents=True, exist_ok=True)
            rgb_rel, depth_rel = rel / f"rgb_{i:05d}.jpg", rel / f"sync_depth_{i:05d}.png"
            Image.fromarray(scene.image).save(root / rgb_rel, quality=95)
            depth_mm = np.clip(np.round(scene.depth.astype(np.float64) * 1000.0), 0, 65535).astype(np.uint16)
            Image.fromarray(depth_mm).save(root / depth_rel)
            lines.append(f"{rgb_rel.as_posix()} {depth_rel.as_posix()} {0.8 * w:.4f}")
        (root / "splits" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


# a directory that holds this entry already has a dataset in the layout (ours or the user's)
LAYOUT_ENTRIES: dict[str, str] = {
    "ade20k": "images",
    "coco": "annotations",
    "nyu": "splits",
    "nyu_normals": "test",
    "voc": "JPEGImages",
}


def ensure_toy_data_unless_present(root: str | Path, layout: str = "ade20k", **kwargs: Any) -> Path:
    """Generate toy data on first use, but use a dataset already in the layout at ``root`` as it is.

    ``experiment=toy_* data.root=DIR`` must work on a real dataset without writing into it.
    """
    root = Path(root)
    if (root / LAYOUT_ENTRIES[layout]).is_dir():
        return root
    return ensure_toy_data(root, layout=layout, **kwargs)


# -- NYUv2 surface-normals layout: rooms of planes with known orientation -------------------------------
def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Camera-frame rotation (x right, y down, z forward): yaw about y, pitch about x, roll about z."""
    cy, sy = np.cos(yaw), np.sin(yaw)
    cp, sp = np.cos(pitch), np.sin(pitch)
    cr, sr = np.cos(roll), np.sin(roll)
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    rz = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    return ry @ rx @ rz


def _plane_axes(n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two unit vectors spanning the plane with normal ``n`` (texture coordinates)."""
    helper = np.array([0.0, 1.0, 0.0]) if abs(n[1]) < 0.9 else np.array([1.0, 0.0, 0.0])
    u = np.cross(n, helper)
    u /= np.linalg.norm(u)
    return u, np.cross(n, u)


def make_normals_scene(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A ray-cast room (floor, ceiling, side and back walls, 0-3 tilted panels) seen by a pinhole camera.

    Returns the H×W×3 uint8 image and H×W×3 float32 unit normals in the camera frame (x right, y down,
    z away; every visible surface faces the camera, so n · ray < 0), (0, 0, 0) on a dark "window"
    (no measurement) in some scenes. Each plane has its own colour and a checker texture in metres
    (perspective cue) and Lambertian shading from one light (orientation cue).
    """
    h, w = int(height), int(width)
    f = rng.uniform(0.7, 1.0) * w
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    rays = np.stack([(xx - w / 2) / f, (yy - h / 2) / f, np.ones_like(xx)], axis=-1)
    rot = _rotation(rng.uniform(-0.5, 0.5), rng.uniform(-0.25, 0.25), rng.uniform(-0.15, 0.15))
    cam_h, room_h = rng.uniform(1.2, 1.6), rng.uniform(2.4, 3.0)
    planes = [  # (point, inward normal) in the room frame
        ((0, cam_h, 0), (0, -1, 0)),  # floor (y down: below the camera)
        ((0, cam_h - room_h, 0), (0, 1, 0)),  # ceiling
        ((-rng.uniform(1.5, 3.0), 0, 0), (1, 0, 0)),  # left wall
        ((rng.uniform(1.5, 3.0), 0, 0), (-1, 0, 0)),  # right wall
        ((0, 0, rng.uniform(4.0, 7.0)), (0, 0, -1)),  # back wall
    ]
    surfaces = [(rot @ np.array(p, float), rot @ np.array(n, float), None) for p, n in planes]
    for _ in range(int(rng.integers(0, 4))):  # free-standing panels, tilted towards the camera
        centre = np.array([rng.uniform(-1, 1), rng.uniform(-0.5, 0.8), rng.uniform(2.0, 3.5)])
        n = -centre / np.linalg.norm(centre) + rng.uniform(-0.6, 0.6, 3)
        n /= np.linalg.norm(n)
        surfaces.append((centre, n, rng.uniform(0.3, 0.7)))
    depth = np.full((h, w), np.inf)
    normals = np.zeros((h, w, 3))
    image = np.zeros((h, w, 3))
    light = np.array([rng.uniform(-0.5, 0.5), 1.0, rng.uniform(0.2, 0.8)])  # travelling down and away
    light /= np.linalg.norm(light)
    for point, n, half in surfaces:
        denom = rays @ n
        with np.errstate(divide="ignore", invalid="ignore"):
            t = (point @ n) / denom
        hit = (denom < -1e-6) & (t > 0) & (t < depth)
        x3 = rays * t[..., None]
        u_ax, v_ax = _plane_axes(n)
        cu, cv = (x3 - point) @ u_ax, (x3 - point) @ v_ax
        if half is not None:
            hit &= (np.abs(cu) < half) & (np.abs(cv) < half)
        if not hit.any():
            continue
        depth[hit] = t[hit]
        normals[hit] = n
        hue = rng.uniform(0, 1)
        c1 = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.3, 0.8), rng.uniform(0.6, 0.95)))
        c2 = c1 * rng.uniform(0.45, 0.75)
        period = rng.uniform(0.25, 0.6)
        checker = ((np.floor(cu / period) + np.floor(cv / period)) % 2)[..., None]
        albedo = c1 * (1 - checker) + c2 * checker
        shade = 0.3 + 0.7 * max(0.0, float(-(n @ light)))
        image[hit] = (albedo * shade * 255.0)[hit]
    if rng.random() < 0.3:  # a dark window without measurement (stored as the zero vector)
        y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
        hole = (slice(y0, y0 + h // 6), slice(x0, x0 + w // 6))
        normals[hole] = 0.0
        image[hole] = 20.0
    image = image + rng.normal(0, 4, image.shape)
    image = cv2.GaussianBlur(image.astype(np.float32), (3, 3), 0.6)
    return np.clip(image, 0, 255).round().astype(np.uint8), normals.astype(np.float32)


def write_normals_layout(root: str | Path, num_train: int, num_val: int, seed: int = 0) -> Path:
    """ROOT/{train,test}/rgb/<stem>.png and ROOT/{train,test}/normals/<stem>.png (RGB, n = v/127.5 − 1)."""
    root = Path(root)
    train_ss, val_ss = np.random.SeedSequence([seed, 11]).spawn(2)
    for split, count, ss in (("train", num_train, train_ss), ("test", num_val, val_ss)):
        rng = np.random.default_rng(ss)
        (root / split / "rgb").mkdir(parents=True, exist_ok=True)
        (root / split / "normals").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            h, w = int(rng.integers(120, 161)), int(rng.integers(160, 213))  # NYUv2's 3:4, small
            image, normals = make_normals_scene(rng, h, w)
            # v = round((n + 1) · 127.5); invalid (0, 0, 0) -> mid-grey 128, which decodes to norm < 0.5
            encoded = np.clip(np.round((normals.astype(np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)
            Image.fromarray(image).save(root / split / "rgb" / f"{i:06d}.png")
            Image.fromarray(encoded).save(root / split / "normals" / f"{i:06d}.png")
    return root


# -- PASCAL VOC 2012 augmented layout ----------------------------------------------------------------
# toy things take the first VOC class ids; stuff (wall, floor, sky) is VOC's background (0)
VOC_TOY_IDS: dict[int, int] = {cls: i + 1 for i, cls in enumerate(THING_CLASSES)}


def write_voc_layout(root: str | Path, num_train: int, num_val: int, seed: int = 0) -> Path:
    """ROOT/JPEGImages/<id>.jpg, ROOT/SegmentationClassAug/<id>.png (0 background, 1..20, 255 ignore)
    and ROOT/ImageSets/Segmentation/{train_aug,val}.txt (one id a line), as the augmented set ships."""
    root = Path(root)
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "SegmentationClassAug").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    train_ss, val_ss = np.random.SeedSequence([seed, 2012]).spawn(2)
    for split, count, ss in (("train_aug", num_train, train_ss), ("val", num_val, val_ss)):
        rng = np.random.default_rng(ss)
        ids = []
        for i in range(count):
            scene = make_scene(rng, *_scene_sizes(rng))
            label = np.full(scene.semantic.shape, 255, np.uint8)  # unlabelled outlines: VOC's 255 border
            label[np.isin(scene.semantic, STUFF_CLASSES)] = 0
            for cls, voc_id in VOC_TOY_IDS.items():
                label[scene.semantic == cls] = voc_id
            image_id = f"{2007 + i % 6}_{(0 if split == 'val' else 500000) + i:06d}"
            Image.fromarray(scene.image).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
            write_label(root / "SegmentationClassAug" / f"{image_id}.png", label)
            ids.append(image_id)
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root
