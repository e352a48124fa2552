"""Surface normals: metrics against numpy, the exact distributed median, flips that mirror n_x under
the per-sample seeded augmentation, the NYUv2 normals layout, and the toy run against the constant
"facing the camera" baseline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from siglip_dense.data.io import DataError
from siglip_dense.data.normals import (
    NormalsDataset,
    build_normals_train_transform,
    decode_normals,
    encode_normals,
)
from siglip_dense.data.samplers import PerSampleSeeded, SeededIndex
from siglip_dense.data.toy import ensure_toy_data
from siglip_dense.evaluation.normal_metrics import NORMAL_METRIC_KEYS, NormalMetric, kth_smallest
from siglip_dense.tasks.normals import flip_normals, normal_loss, valid_mask
from siglip_dense.train import run_train
from tests.conftest import compose_train_cfg

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "OMP_NUM_THREADS": "1"}
FACING_CAMERA = np.array([0.0, 0.0, -1.0])  # x right, y down, z away: a surface facing the camera


def numpy_normal_metrics(preds: list[np.ndarray], gts: list[np.ndarray], min_norm: float = 0.5) -> dict:
    """The NYUv2 normal metrics from H×W×3 arrays: arccos of the cosine, pixels pooled over images."""
    errors = []
    for p, g in zip(preds, gts, strict=True):
        p, g = p.astype(np.float64), g.astype(np.float64)
        valid = np.linalg.norm(g, axis=-1) >= min_norm
        cos = (p[valid] * g[valid]).sum(-1) / (
            np.linalg.norm(p[valid], axis=-1) * np.linalg.norm(g[valid], axis=-1)
        )
        errors.append(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))
    e = np.concatenate(errors)
    return {
        "mean": e.mean(),
        "median": np.median(e),
        "rmse": np.sqrt(np.mean(e**2)),
        "a11.25": np.mean(e < 11.25),
        "a22.5": np.mean(e < 22.5),
        "a30": np.mean(e < 30),
    }


def random_fields(rng: np.random.Generator, sizes: list[tuple[int, int]]) -> tuple[list, list]:
    """Random predictions and ground truths, the latter with zero and too-short (invalid) vectors."""
    preds, gts = [], []
    for h, w in sizes:
        g = rng.normal(size=(h, w, 3))
        g /= np.linalg.norm(g, axis=-1, keepdims=True)
        p = g + rng.normal(scale=0.4, size=g.shape)  # mostly small errors, some large
        p[rng.random((h, w)) < 0.05] *= -1  # a few opposite normals (angles near 180°)
        g[rng.random((h, w)) < 0.15] = 0.0  # no measurement
        short = rng.random((h, w)) < 0.1
        g[short] *= 0.3  # norm 0.3 < 0.5: invalid
        preds.append(p.astype(np.float32))
        gts.append(g.astype(np.float32))
    return preds, gts


def test_metrics_equal_numpy_on_random_fields_with_invalid_pixels() -> None:
    rng = np.random.default_rng(0)
    preds, gts = random_fields(rng, [(17, 23), (32, 9), (8, 8)])
    metric = NormalMetric(min_norm=0.5)
    for p, g in zip(preds, gts):
        metric.update(torch.from_numpy(p).permute(2, 0, 1), torch.from_numpy(g).permute(2, 0, 1))
    ours = metric.compute()
    ref = numpy_normal_metrics(preds, gts)
    assert ours["num_images"] == 3 and ours["num_empty"] == 0
    for key in NORMAL_METRIC_KEYS:
        assert ours[key] == pytest.approx(ref[key], abs=1e-4), key
    # an image without any valid pixel is counted, not averaged in
    metric.update(torch.ones(3, 4, 4), torch.zeros(3, 4, 4))
    again = metric.compute()
    assert again["num_empty"] == 1 and again["mean"] == pytest.approx(ref["mean"], abs=1e-4)


@pytest.mark.parametrize("n", [1, 2, 7, 1000])
def test_kth_smallest_is_exact(n: int) -> None:
    rng = np.random.default_rng(n)
    values = (rng.random(n) * 180).astype(np.float32)
    values[: n // 3] = values[0]  # ties
    ordered = np.sort(values)
    for k in {0, n // 2, (n - 1) // 2, n - 1}:
        assert kth_smallest(torch.from_numpy(values), k) == float(ordered[k])
    with pytest.raises(ValueError, match="outside"):
        kth_smallest(torch.from_numpy(values), n)


def equivariant_prediction(image: torch.Tensor) -> torch.Tensor:
    """A flip-equivariant normal predictor: x from the horizontal intensity gradient (odd under a flip),
    y and z from even functions of the intensity, so pred(flip(img)) = flip_normals(pred(img))."""
    gray = image.float().mean(dim=0, keepdim=True)[None]  # 1×1×H×W
    padded = torch.nn.functional.pad(gray, (1, 1, 0, 0), mode="replicate")
    gx = (padded[..., 2:] - padded[..., :-2]) / 2
    pred = torch.cat([gx, gray.sin(), -1.0 - gray.cos().abs()], dim=1)
    return torch.nn.functional.normalize(pred, dim=1)


def test_flip_mirrors_normals_and_keeps_the_loss_of_an_equivariant_prediction(tmp_path: Path) -> None:
    """Through the training pipeline (per-sample seeded Compose, via PerSampleSeeded): every seed gives
    either the sample as is or its mirror, image and normals together, with the same loss."""
    rng = np.random.default_rng(1)
    h, w = 24, 40
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    gt = rng.normal(size=(h, w, 3))
    gt /= np.linalg.norm(gt, axis=-1, keepdims=True)
    gt[:3] = 0.0  # invalid rows
    for d in ("rgb", "normals"):
        (tmp_path / "train" / d).mkdir(parents=True)
    Image.fromarray(image).save(tmp_path / "train" / "rgb" / "a.png")
    Image.fromarray(encode_normals(gt)).save(tmp_path / "train" / "normals" / "a.png")
    stored = decode_normals(encode_normals(gt))  # what the file holds (8-bit quantised)
    transform = build_normals_train_transform((h, w), photometric=False, seed=0)
    dataset = PerSampleSeeded(NormalsDataset(tmp_path, "train", transform))
    plain = torch.from_numpy(stored).permute(2, 0, 1)
    rgb = torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1.0  # mean = std = 0.5
    losses, flipped_seen = [], set()
    for seed in range(12):
        item = dataset[SeededIndex(0, seed)]
        img, normals = item["image"], item["normals"]
        flipped = bool(torch.allclose(normals, flip_normals(plain)))
        assert flipped or torch.allclose(normals, plain)
        assert torch.allclose(img, rgb.flip(-1) if flipped else rgb, atol=1e-6)  # image and normals together
        flipped_seen.add(flipped)
        target_valid = valid_mask(normals[None])
        loss = normal_loss(equivariant_prediction(img), normals[None], target_valid)
        losses.append(float(loss))
    assert flipped_seen == {True, False}  # both outcomes occurred
    assert max(losses) - min(losses) < 1e-6, losses
    # and the flip is not a no-op for the loss of a prediction that ignores it
    img0 = dataset[SeededIndex(0, 0)]["image"]
    pred = equivariant_prediction(img0)
    assert float(normal_loss(pred, plain[None], valid_mask(plain[None]))) != pytest.approx(
        float(normal_loss(pred, flip_normals(plain)[None], valid_mask(plain[None])))
    )


def test_layout_loads_and_names_missing_files(tmp_path: Path) -> None:
    root = ensure_toy_data(tmp_path / "toy_normals", num_train=2, num_val=3, layout="nyu_normals")
    ds = NormalsDataset(root, "test")
    assert len(ds) == 3
    for i in range(3):
        image, normals = ds.load(i)
        raw = np.asarray(Image.open(ds.samples[i][1]))
        n = raw.astype(np.float64) / 127.5 - 1.0
        valid = np.linalg.norm(n, axis=-1) >= 0.5
        assert image.shape[:2] == normals.shape[:2] and normals.dtype == np.float32
        np.testing.assert_allclose(
            normals[valid], n[valid] / np.linalg.norm(n[valid], axis=-1, keepdims=True), atol=1e-6
        )
        assert not normals[~valid].any()
        item = ds[i]
        assert item["normals"].shape == (3, *image.shape[:2])
    (root / "test" / "normals" / ds.samples[0][1].name).unlink()
    with pytest.raises(DataError, match="has no normals .*000000.png"):
        NormalsDataset(root, "test")


def constant_baseline(root: Path, split: str = "test") -> dict:
    """Metrics of predicting the camera-facing normal (0, 0, −1) everywhere."""
    gts = [
        decode_normals(np.asarray(Image.open(p))) for p in sorted((root / split / "normals").glob("*.png"))
    ]
    preds = [np.broadcast_to(FACING_CAMERA, g.shape).astype(np.float32) for g in gts]
    return numpy_normal_metrics(preds, gts)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("normals")
    root = ensure_toy_data(base / "data" / "toy_normals", num_train=64, num_val=7, layout="nyu_normals")
    run_dir = base / "run"
    overrides = ["experiment=toy_normals", "trainer.max_epochs=5", "data.num_workers=0", "num_vis=2"]
    cfg = compose_train_cfg(overrides, run_dir, data_dir=root.parent)
    run_train(cfg)
    return run_dir, root


@pytest.mark.slow
def test_toy_normals_beats_the_facing_camera_baseline(toy_run: tuple[Path, Path]) -> None:
    run_dir, root = toy_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    baseline = constant_baseline(root)
    print(f"toy_normals: {metrics}\nfacing-camera baseline: {baseline}")
    assert set(metrics) >= set(NORMAL_METRIC_KEYS)
    assert metrics["mean"] < baseline["mean"] - 6.0
    assert metrics["median"] < baseline["median"] - 15.0
    assert metrics["rmse"] < baseline["rmse"] - 8.0
    assert (run_dir / "predictions.png").stat().st_size > 0


def run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_eval_ddp_sim_equals_single_process_and_numpy_on_saved_predictions(
    toy_run: tuple[Path, Path], tmp_path: Path
) -> None:
    """7 test images (odd) over 2 ranks: the exact distributed median and sums give the one-process
    numbers, which equal numpy's on the saved predictions; predict.py writes unit normals."""
    run_dir, root = toy_run
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    results = {}
    for trainer in ("cpu", "ddp_sim"):
        out = tmp_path / trainer
        cmd = [sys.executable, "tools/eval.py", f"ckpt_path={ckpt}", f"trainer={trainer}"]
        run(
            [
                *cmd,
                "data.num_workers=0",
                "save_predictions=true",
                f"output_dir={out}",
                f"hydra.run.dir={out}/h",
            ]
        )
        results[trainer] = json.loads((out / "metrics.json").read_text())
    for key in NORMAL_METRIC_KEYS:
        assert results["ddp_sim"][key] == pytest.approx(results["cpu"][key], abs=1e-9), key
    assert results["ddp_sim"]["num_images"] == results["cpu"]["num_images"] == 7
    stems = sorted(p.stem for p in (root / "test" / "rgb").glob("*.png"))
    saved = sorted(p.stem for p in (tmp_path / "cpu" / "predictions").glob("*.npy"))
    assert saved == stems
    preds, gts = [], []
    for stem in stems:
        pred = np.load(tmp_path / "cpu" / "predictions" / f"{stem}.npy")
        gt = decode_normals(np.asarray(Image.open(root / "test" / "normals" / f"{stem}.png")))
        assert pred.dtype == np.float32 and pred.shape == gt.shape
        np.testing.assert_allclose(np.linalg.norm(pred, axis=-1), 1.0, atol=1e-4)
        preds.append(pred)
        gts.append(gt)
    ref = numpy_normal_metrics(preds, gts)
    for key in NORMAL_METRIC_KEYS:
        assert results["cpu"][key] == pytest.approx(ref[key], abs=1e-3), key
    image = root / "test" / "rgb" / f"{stems[0]}.png"
    out = tmp_path / "pred"
    run([sys.executable, "tools/predict.py", f"ckpt_path={ckpt}", f"input={image}", f"output={out}"])
    # one .npy and one _vis.png for the image (named by its stem, or its name once predict.py keeps
    # the extension)
    (npy,) = out.glob(f"{image.stem}*.npy")
    (vis,) = out.glob(f"{image.stem}*_vis.png")
    pred = np.load(npy)
    assert pred.dtype == np.float32 and pred.shape == (*np.asarray(Image.open(image)).shape[:2], 3)
    np.testing.assert_allclose(np.linalg.norm(pred, axis=-1), 1.0, atol=1e-4)
    assert vis.stat().st_size > 0


def test_linear_probe_recipe_builds_a_frozen_unit_normal_model(tmp_path: Path, hydra_cleanup: None) -> None:
    """The recipes' head (task=normals_linear) on the tiny backbone: frozen backbone, trainable probe,
    unit normals at the input size for any (non-multiple) size, and the DPT head's decoder is depth's."""
    from hydra.utils import instantiate

    from siglip_dense.models.heads.depth import DPTHead
    from siglip_dense.models.heads.normals import DPTNormalsHead
    from siglip_dense.train import build_task

    root = ensure_toy_data(tmp_path / "toy_normals", num_train=2, num_val=1, layout="nyu_normals")
    overrides = ["experiment=nyu_normals_linear_b16", "backbone=tiny", "data=toy_normals", "trainer=cpu"]
    overrides.append("backbone.out_indices=[-2,-1]")
    cfg = compose_train_cfg([*overrides, "data.num_workers=0"], tmp_path / "run", data_dir=root.parent)
    task = build_task(cfg, instantiate(cfg.data, _convert_="all")).eval()
    trainable = {n.split(".")[0] for n, p in task.model.named_parameters() if p.requires_grad}
    assert trainable == {"head"}
    out = task(torch.randn(2, 3, 50, 70))
    assert out.shape == (2, 3, 50, 70)
    torch.testing.assert_close(torch.linalg.vector_norm(out, dim=1), torch.ones(2, 50, 70))
    keys = ["blocks.1", "blocks.2", "blocks.3", "blocks.5"]
    depth = DPTHead(16, keys, features=8, out_channels=(8, 8, 16, 16), head_channels=4)
    normals = DPTNormalsHead(16, keys, features=8, out_channels=(8, 8, 16, 16), head_channels=4)
    missing = normals.load_state_dict(
        {k: v for k, v in depth.state_dict().items() if not k.startswith("output_conv2.2")}, strict=False
    )
    assert sorted(missing.missing_keys) == ["output_conv2.2.bias", "output_conv2.2.weight"]
    feats = {k: torch.randn(1, 16, 3, 4) for k in keys}
    trunk = torch.nn.Sequential(*list(depth.output_conv2)[:-1])
    with torch.no_grad():
        depth.output_conv2 = trunk
        normals.output_conv2 = torch.nn.Sequential(*list(normals.output_conv2)[:-1])
        torch.testing.assert_close(normals(feats), depth.decode_raw(feats))
