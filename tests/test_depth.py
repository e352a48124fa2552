"""Depth pieces on their own: metrics vs textbook numpy, SILog, Eigen crop, heads, transforms, bad data."""

from __future__ import annotations

import functools
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from siglip_dense.data.depth_folder import DepthFolderDataset
from siglip_dense.data.io import DataError, read_depth
from siglip_dense.data.nyu import NYUDepthDataset
from siglip_dense.data.toy import ensure_toy_data
from siglip_dense.data.transforms import build_depth_train_transform
from siglip_dense.evaluation.depth_metrics import DEPTH_METRIC_KEYS, DepthMetric, crop_box, valid_mask
from siglip_dense.models.backbone import build_backbone
from siglip_dense.models.heads.depth import DepthModel, DPTHead, LinearBinsHead
from siglip_dense.tasks.depth import DepthTask, gradient_loss, silog_loss


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------
def numpy_depth_metrics(pred: np.ndarray, gt: np.ndarray, lo: float, hi: float) -> dict[str, float]:
    """Eigen et al. / BTS ``compute_errors`` per image on valid pixels, then the mean over images."""
    per_image = []
    for p, g in zip(pred, gt):
        with np.errstate(invalid="ignore"):
            valid = np.isfinite(g) & (g > lo) & (g < hi)
        p = np.clip(p[valid].astype(np.float64), lo, hi)
        g = g[valid].astype(np.float64)
        if g.size == 0:
            continue
        thresh = np.maximum(g / p, p / g)
        err = np.log(p) - np.log(g)
        per_image.append(
            {
                "abs_rel": np.mean(np.abs(g - p) / g),
                "sq_rel": np.mean((g - p) ** 2 / g),
                "rmse": np.sqrt(np.mean((g - p) ** 2)),
                "rmse_log": np.sqrt(np.mean((np.log(g) - np.log(p)) ** 2)),
                "log10": np.mean(np.abs(np.log10(g) - np.log10(p))),
                "silog": np.sqrt(np.mean(err**2) - np.mean(err) ** 2) * 100,
                "delta1": np.mean(thresh < 1.25),
                "delta2": np.mean(thresh < 1.25**2),
                "delta3": np.mean(thresh < 1.25**3),
            }
        )
    return {k: float(np.mean([m[k] for m in per_image])) for k in per_image[0]}


def random_depth_batch(seed: int, n: int = 4, h: int = 30, w: int = 40) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    gt = rng.uniform(0.2, 12.0, size=(n, h, w)).astype(np.float32)  # some beyond max_depth=10
    gt[rng.random(gt.shape) < 0.1] = 0.0  # holes
    gt[rng.random(gt.shape) < 0.02] = np.nan
    gt[rng.random(gt.shape) < 0.02] = np.inf
    gt[-1] = 0.0  # an image without a valid pixel: skipped, not averaged as zeros
    pred = (gt * rng.uniform(0.6, 1.5, size=gt.shape)).astype(np.float32)
    pred = np.nan_to_num(pred, nan=3.0, posinf=3.0)
    pred[rng.random(pred.shape) < 0.05] = 20.0  # clipped to max_depth
    pred[rng.random(pred.shape) < 0.05] = 1e-5  # clipped to min_depth
    return pred, gt


def test_metrics_match_textbook_numpy() -> None:
    pred, gt = random_depth_batch(0)
    metric = DepthMetric(min_depth=1e-3, max_depth=10.0, crop="none")
    metric.update(torch.from_numpy(pred[:2]), torch.from_numpy(gt[:2]))  # in two batches, B×H×W
    metric.update(torch.from_numpy(pred[2:])[:, None], torch.from_numpy(gt[2:]))  # and B×1×H×W
    ours = {k: float(v) for k, v in metric.compute().items()}
    ref = numpy_depth_metrics(pred, gt, 1e-3, 10.0)
    assert set(ours) == {*DEPTH_METRIC_KEYS, "num_images", "num_empty"} and set(ref) == set(DEPTH_METRIC_KEYS)
    assert ours["num_images"] == 3 and ours["num_empty"] == 1
    for key in DEPTH_METRIC_KEYS:
        assert ours[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), key
    assert int(metric.count) == 3 and int(metric.num_empty) == 1


def test_metric_states_sum_like_ddp() -> None:
    """Two processes' states summed (what dist_reduce_fx='sum' does) equal one process over all images."""
    pred, gt = (torch.from_numpy(a) for a in random_depth_batch(1, n=5))
    whole = DepthMetric(crop="none")
    whole.update(pred, gt)
    a, b = DepthMetric(crop="none"), DepthMetric(crop="none")
    a.update(pred[:2], gt[:2])
    b.update(pred[2:], gt[2:])
    a.merge_state(b)
    for key, value in whole.compute().items():
        assert float(a.compute()[key]) == pytest.approx(float(value), rel=1e-9), key


def test_prediction_is_resized_to_gt_resolution() -> None:
    gt = torch.full((1, 48, 64), 2.0)
    metric = DepthMetric(crop="none")
    metric.update(torch.full((1, 1, 12, 16), 2.0), gt)
    assert float(metric.compute()["abs_rel"]) == 0.0


def test_eigen_crop_at_gt_resolution() -> None:
    assert crop_box(480, 640, "eigen") == (45, 471, 41, 601)
    assert crop_box(960, 1280, "eigen") == (90, 942, 82, 1202)  # scaled with the GT size
    assert crop_box(480, 640, "none") == (0, 480, 0, 640)
    with pytest.raises(ValueError, match="unknown eval crop"):
        crop_box(480, 640, "eigne")

    def abs_rel(gt: torch.Tensor, crop: str) -> float:
        metric = DepthMetric(crop=crop)
        metric.update(torch.full((1, 1, 60, 80), 2.0), gt[None])  # low-res prediction, upsampled
        return float(metric.compute()["abs_rel"])

    gt = torch.full((480, 640), 5.0)
    gt[45:471, 41:601] = 2.0  # the prediction is right exactly inside the crop
    assert abs_rel(gt, "eigen") == 0.0
    assert abs_rel(gt, "none") > 0.1
    # the crop's borders, pixel-exact at ground-truth resolution
    mask = valid_mask(torch.full((480, 640), 2.0), crop="eigen")
    assert mask.sum() == (471 - 45) * (601 - 41)
    for y, x, inside in ((44, 300, False), (45, 300, True), (470, 300, True), (471, 300, False)):
        assert bool(mask[y, x]) == inside, (y, x)
    for y, x, inside in ((200, 40, False), (200, 41, True), (200, 600, True), (200, 601, False)):
        assert bool(mask[y, x]) == inside, (y, x)


# ---------------------------------------------------------------------------------------------
# loss
# ---------------------------------------------------------------------------------------------
def test_silog_zero_for_perfect_and_scale_aware() -> None:
    gen = torch.Generator().manual_seed(0)
    gt = torch.rand(2, 20, 30, generator=gen) * 9 + 0.5
    valid = torch.rand(2, 20, 30, generator=gen) > 0.2
    pred = gt.clone().requires_grad_(True)
    assert float(silog_loss(pred.detach(), gt, valid, eps=0.0)) == 0.0
    loss = silog_loss(pred, gt, valid)  # default eps inside the root
    assert float(loss.detach()) <= 10 * math.sqrt(1e-6) + 1e-7
    loss.backward()
    assert torch.isfinite(pred.grad).all()
    # a prediction off by a factor 2 everywhere: d = log 2 on every pixel
    expected = 10 * math.sqrt((1 - 0.85) * math.log(2) ** 2)
    assert float(silog_loss(gt * 2, gt, valid, eps=0.0)) == pytest.approx(expected, rel=1e-5)
    # fully scale-invariant when the variance focus is 1
    assert float(silog_loss(gt * 2, gt, valid, variance_focus=1.0, eps=0.0)) == pytest.approx(0.0, abs=1e-3)
    # invalid pixels do not count, whatever is predicted there
    garbage = torch.where(valid, gt, torch.full_like(gt, 1e-3))
    assert float(silog_loss(garbage, gt, valid, eps=0.0)) == 0.0


def test_gradient_loss_is_scale_invariant_and_masked() -> None:
    gen = torch.Generator().manual_seed(1)
    gt = torch.rand(2, 24, 32, generator=gen) * 5 + 1
    valid = torch.rand(2, 24, 32, generator=gen) > 0.3
    assert float(gradient_loss(gt, gt, valid)) == 0.0
    assert float(gradient_loss(gt * 3, gt, valid)) == pytest.approx(
        0.0, abs=1e-6
    )  # log-space: a scale is flat
    ramp = gt * torch.exp(torch.linspace(0, 1, 32))  # an error that grows left to right
    assert float(gradient_loss(ramp, gt, torch.ones_like(valid))) > 0
    # where no pair of neighbours is valid, nothing is counted
    lonely = torch.zeros_like(valid)
    lonely[:, ::2, ::2] = True
    assert float(gradient_loss(ramp, gt, lonely, scales=1)) == 0.0


# ---------------------------------------------------------------------------------------------
# heads
# ---------------------------------------------------------------------------------------------
@functools.cache
def _tiny_backbone(patch: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone("tiny", out_indices=[1, 2, 3, 5], patch_size=patch, verbose=False).eval()


@pytest.mark.parametrize("patch", [14, 16])
@pytest.mark.parametrize("size", [(64, 112), (75, 101), (98, 70)])
def test_dpt_output_size(patch: int, size: tuple[int, int]) -> None:
    backbone = _tiny_backbone(patch)
    assert backbone.patch_size == patch
    head = DPTHead(
        backbone.embed_dim, backbone.out_keys, patch_size=patch, features=32, out_channels=(16, 32, 64, 64)
    )
    model = DepthModel(backbone, head).eval()
    levels: list[tuple[int, int]] = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: levels.append(tuple(o.shape[-2:]))) for m in head.layer_rn
    ]
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        padded = torch.nn.functional.pad(x, (0, (-size[1]) % patch, 0, (-size[0]) % patch))
        raw = head(backbone(padded))
        levels.clear()
        depth = model(x)["depth"]
    for h in hooks:
        h.remove()
    gh, gw = -(-size[0] // patch), -(-size[1] // patch)  # token grid of the padded input
    assert raw.shape == (1, 1, gh * patch, gw * patch)
    assert depth.shape == (1, 1, *size)
    assert (depth > 0).all() and (depth <= 10.0).all()
    # levels at strides 4/8/16/32 of the stride-16 grid, whatever the patch
    g16 = (-(-gh * patch // 16), -(-gw * patch // 16))
    assert levels == [
        (4 * g16[0], 4 * g16[1]),
        (2 * g16[0], 2 * g16[1]),
        g16,
        (-(-g16[0] // 2), -(-g16[1] // 2)),
    ]


def test_linear_bins_head_range_and_size() -> None:
    torch.manual_seed(0)
    backbone = build_backbone("tiny", out_indices=[2, 5], verbose=False)
    head = LinearBinsHead(backbone.embed_dim, backbone.out_keys, num_bins=64, min_depth=0.5, max_depth=8.0)
    model = DepthModel(backbone, head).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 80, 120))["depth"]
        raw = head(backbone(torch.randn(1, 3, 80, 112)))
    assert out.shape == (2, 1, 80, 120)
    assert raw.shape == (1, 1, 4 * 5, 4 * 7)  # x4 of the token grid
    assert (out >= 0.5).all() and (out <= 8.0).all()
    with pytest.raises(ValueError, match="softmax"):
        LinearBinsHead(192, norm="sigmoid")


def test_linear_probe_trains_only_the_head() -> None:
    torch.manual_seed(0)
    task = DepthTask(
        backbone={"_target_": "siglip_dense.models.build_backbone", "arch": "tiny", "out_indices": [4, 5]},
        head={"_target_": "siglip_dense.models.heads.depth.LinearBinsHead", "num_bins": 32},
        freeze_backbone=True,
        max_depth=10.0,
    )
    assert task.model.head.feat_channels == 192 * 2 * 2
    gt = torch.rand(2, 64, 64) * 8 + 1
    gt[:, :5] = 0.0
    loss = task.compute_loss(task(torch.randn(2, 3, 64, 64)), gt)["loss"]
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None for p in task.backbone.parameters())
    assert task.model.head.conv_depth.weight.grad is not None


# ---------------------------------------------------------------------------------------------
# data: toy layout, transforms, bad input
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_nyu(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_toy_data(tmp_path_factory.mktemp("nyu") / "toy", num_train=4, num_val=2, layout="nyu")


def test_toy_nyu_layout(small_nyu: Path) -> None:
    lines = (small_nyu / "splits" / "train.txt").read_text().split("\n")
    rgb, depth, focal = lines[0].split()
    assert (small_nyu / rgb).suffix == ".jpg" and float(focal) > 0
    with Image.open(small_nyu / depth) as img:
        assert img.mode == "I;16"
    ds = NYUDepthDataset(small_nyu, "train")
    assert len(ds) == 4
    image, d = ds.load(0)
    assert d.shape == image.shape[:2] and d.dtype == np.float32
    assert d.max() <= 10.0 and (d > 0.5).any()
    item = ds[1]
    assert item["depth"].shape == item["image"].shape[1:] and item["meta"]["focal"] > 0


def test_depth_transform_keeps_invalid_invalid() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(90, 120, 3), dtype=np.uint8)
    depth = np.where(rng.random((90, 120)) < 0.3, 0.0, rng.choice([1.5, 2.5, 4.0], size=(90, 120)))
    depth = depth.astype(np.float32)
    for seed in range(5):
        t = build_depth_train_transform(
            (160, 200), short_side=100, scale_range=(0.8, 1.2), rotate=10, photometric=True, seed=seed
        )
        out = t(image=image, mask=depth)
        d = out["mask"].numpy()
        assert out["image"].shape == (3, 160, 200) and d.shape == (160, 200)
        # nearest only: no new depth values, no blend of an invalid 0 with a valid depth
        assert set(np.unique(d).tolist()) <= {0.0, 1.5, 2.5, 4.0}
        assert (d[120:, :] == 0).all() and (d[:, 160:] == 0).all()  # the pads are invalid
    # photometric changes the image only
    plain = build_depth_train_transform((64, 64), rotate=0, flip=False, photometric=False, seed=3)
    colour = build_depth_train_transform((64, 64), rotate=0, flip=False, photometric=True, seed=3)
    a, b = plain(image=image, mask=depth), colour(image=image, mask=depth)
    np.testing.assert_array_equal(a["mask"].numpy(), b["mask"].numpy())


def _write_folder(
    root: Path, depth: np.ndarray | None, suffix: str = ".npy", size: tuple[int, int] = (40, 50)
) -> Path:
    (root / "images" / "val").mkdir(parents=True)
    (root / "depth" / "val").mkdir(parents=True)
    Image.fromarray(np.zeros((*size, 3), np.uint8)).save(root / "images" / "val" / "a.jpg")
    if depth is not None:
        path = root / "depth" / "val" / f"a{suffix}"
        if suffix == ".npy":
            np.save(path, depth)
        else:
            Image.fromarray(depth).save(path)
    return root


def test_nan_inf_zero_negative_depth_masked_and_counted(tmp_path: Path) -> None:
    depth = np.full((40, 50), 3.0, np.float32)
    depth[0, :5] = np.nan
    depth[1, :3] = np.inf
    depth[2, :2] = -1.0
    depth[3, :7] = 0.0
    ds = DepthFolderDataset(_write_folder(tmp_path, depth), "val")
    with pytest.warns(UserWarning) as record:
        item = ds[0]
    messages = " ".join(str(w.message) for w in record)
    assert "8 NaN/inf and 2 negative" in messages and "a.npy" in messages
    assert "zero pixels" in messages
    d = item["depth"].numpy()
    assert (d[0, :5] == 0).all() and (d[1, :3] == 0).all() and (d[2, :2] == 0).all()
    assert np.isfinite(d).all() and (d >= 0).all()
    assert ds.invalid_counts["nonfinite"] == 8 and ds.invalid_counts["negative"] == 2
    assert ds.invalid_counts["zero"] == 7


def test_depth_of_wrong_size_names_the_file(tmp_path: Path) -> None:
    ds = DepthFolderDataset(_write_folder(tmp_path, np.ones((30, 50), np.float32)), "val")
    with pytest.raises(DataError, match=r"a\.npy is 50x30 \(WxH\) but its image .*a\.jpg is 50x40"):
        ds[0]


def test_depth_of_wrong_dtype_names_the_file(tmp_path: Path) -> None:
    ds = DepthFolderDataset(
        _write_folder(tmp_path / "png8", np.ones((40, 50), np.uint8), suffix=".png"), "val"
    )
    with pytest.raises(DataError, match=r"a\.png is a PIL mode 'L' .*16-bit PNG"):
        ds[0]
    ds = DepthFolderDataset(_write_folder(tmp_path / "npyint", np.ones((40, 50), np.int32)), "val")
    with pytest.raises(DataError, match=r"a\.npy has dtype int32.*float array in metres"):
        ds[0]
    np.save(tmp_path / "rgbdepth.npy", np.ones((4, 5, 3), np.float32))
    with pytest.raises(DataError, match="rgbdepth.npy"):
        read_depth(tmp_path / "rgbdepth.npy")


def test_split_line_to_missing_file(small_nyu: Path, tmp_path: Path) -> None:
    lines = (small_nyu / "splits" / "val.txt").read_text().splitlines()
    rgb, depth, focal = lines[1].split()
    broken = tmp_path / "val_broken.txt"
    broken.write_text(f"{lines[0]}\n\n{rgb} {depth}.missing {focal}\n")
    with pytest.raises(
        DataError, match=rf"val_broken\.txt line 3: depth .*{Path(depth).name}\.missing not found"
    ):
        NYUDepthDataset(small_nyu, str(broken))
    broken.write_text(f"/{lines[0]}\nnope/rgb_x.jpg {depth}\n")  # a leading '/' is relative to ROOT (BTS)
    with pytest.raises(DataError, match=r"line 2: image .*nope/rgb_x\.jpg not found"):
        NYUDepthDataset(small_nyu, str(broken))
    with pytest.warns(UserWarning, match="dropped 1 lines"):
        assert len(NYUDepthDataset(small_nyu, str(broken), skip_bad=True)) == 1
    broken.write_text(f"{lines[0]}\n{rgb}\n")
    with pytest.raises(DataError, match="line 2: expected 'rgb_relpath depth_relpath"):
        NYUDepthDataset(small_nyu, str(broken))
    with pytest.raises(DataError, match="split file not found"):
        NYUDepthDataset(small_nyu, "test")


def test_no_silent_training_on_empty_depth() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        task = DepthTask(
            backbone={
                "_target_": "siglip_dense.models.build_backbone",
                "arch": "tiny",
                "out_indices": [1, 2, 3, 5],
            },
            head={
                "_target_": "siglip_dense.models.heads.depth.DPTHead",
                "features": 16,
                "out_channels": [8, 8, 8, 8],
            },
        )
    batch = {
        "image": torch.randn(1, 3, 64, 64),
        "depth": torch.zeros(1, 64, 64),
        "meta": [{"depth_path": "/x/empty.png"}],
    }
    # checked on the host before the batch moves to the device (Lightning's on_before_batch_transfer)
    with pytest.warns(UserWarning, match=r"no valid depth pixel.*empty\.png"):
        task.check_batch(batch)
    loss = task.training_step(batch, 0)
    assert float(loss) == 0.0


def test_depth_folder_config_reads_png_and_npy(tmp_path: Path, hydra_cleanup: None) -> None:
    from hydra.utils import instantiate

    from tests.conftest import compose_train_cfg

    root = tmp_path / "mine"
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "depth" / split).mkdir(parents=True)
        for stem, kind in (("a", "png"), ("b", "npy")):
            Image.fromarray(np.full((40, 60, 3), 100, np.uint8)).save(root / "images" / split / f"{stem}.jpg")
            if kind == "png":
                Image.fromarray(np.full((40, 60), 2500, np.uint16)).save(
                    root / "depth" / split / f"{stem}.png"
                )
            else:
                np.save(root / "depth" / split / f"{stem}.npy", np.full((40, 60), 2.5, np.float32))
    overrides = ["experiment=toy_depth", "data=depth_folder", f"data.root={root}", "data.num_workers=0"]
    overrides.append("data.crop_size=[64,64]")
    cfg = compose_train_cfg(overrides, tmp_path / "run")
    dm = instantiate(cfg.data, _convert_="all")
    assert dm.task_kwargs() == {"min_depth": 1e-3, "max_depth": 10.0, "eval_crop": "none"}
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert [tuple(d.shape) for d in batch["depth"]] == [(40, 60)]
    for i in range(2):  # millimetre PNG and metre .npy agree
        torch.testing.assert_close(dm.val_dataset[i]["depth"], torch.full((40, 60), 2.5))
    train = next(iter(dm.train_dataloader()))
    assert train["image"].shape == (2, 3, 64, 64) and train["depth"].shape == (2, 64, 64)
