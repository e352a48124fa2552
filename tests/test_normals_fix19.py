"""Issue-19 follow-ups: black "missing" normals, flip TTA, task overrides refused by eval, NormalsPrediction,
metric names, the message of a non-RGB normals PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from siglip_dense.data.io import DataError
from siglip_dense.data.normals import encode_normals, read_normals
from siglip_dense.data.toy import ensure_toy_data
from siglip_dense.evaluate import run_eval
from siglip_dense.evaluation.normal_metrics import NORMAL_METRIC_KEYS, NormalMetric
from siglip_dense.models.heads.normals import normalize_normals
from siglip_dense.predict import NormalsPrediction
from siglip_dense.tasks.normals import flip_normals, normal_loss, valid_mask
from tests.conftest import compose_train_cfg
from tests.test_normals import numpy_normal_metrics


def unit_field(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    g = rng.normal(size=(h, w, 3))
    return (g / np.linalg.norm(g, axis=-1, keepdims=True)).astype(np.float32)


def test_black_pixels_are_missing_normals_excluded_from_loss_and_metrics(tmp_path: Path) -> None:
    """NYUv2 PNGs mark missing normals as (0, 0, 0) (GeoNet / Bae et al. loaders): not (−1,−1,−1)/√3."""
    rng = np.random.default_rng(0)
    rgb = encode_normals(unit_field(rng, 12, 16))
    rgb[rgb.sum(-1) == 0] = 1  # no accidental black pixel outside the hole
    rgb[3:8, 4:11] = 0  # the hole
    Image.fromarray(rgb).save(tmp_path / "n.png")
    gt = read_normals(tmp_path / "n.png")
    hole = np.zeros((12, 16), bool)
    hole[3:8, 4:11] = True
    np.testing.assert_array_equal(gt[hole], 0.0)

    pred = unit_field(rng, 12, 16)
    metric = NormalMetric()
    metric.update(torch.from_numpy(pred).permute(2, 0, 1), torch.from_numpy(gt).permute(2, 0, 1))
    got = metric.compute()
    keep = ~hole
    want = numpy_normal_metrics([pred[keep][None]], [gt[keep][None]])
    for key in NORMAL_METRIC_KEYS:
        assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-6), key

    p, g = torch.from_numpy(pred).permute(2, 0, 1)[None], torch.from_numpy(gt).permute(2, 0, 1)[None]
    valid = valid_mask(g)
    assert valid[0].numpy().tolist() == keep.tolist()
    cos = np.clip((pred[keep] * gt[keep]).sum(-1).astype(np.float64), -1 + 1e-6, 1 - 1e-6)
    loss = normal_loss(p, g, valid)
    assert float(loss) == pytest.approx(np.arccos(cos).mean(), rel=1e-5)


@pytest.mark.parametrize("mode", ["RGBA", "L", "I;16"])
def test_non_rgb_normals_png_is_named_once(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "x.png"
    Image.new(mode, (4, 3)).save(path)
    with pytest.raises(DataError) as err:
        read_normals(path)
    message = str(err.value)
    assert message.count(str(path)) == 1 and "cannot decode" not in message
    assert f"is a {mode} image" in message


@pytest.fixture(scope="module")
def normals_task(tmp_path_factory: pytest.TempPathFactory):
    """The linear-probe recipe on the tiny random backbone (a real NormalsTask)."""
    from hydra.utils import instantiate

    from siglip_dense.train import build_task

    tmp = tmp_path_factory.mktemp("normals_task")
    root = ensure_toy_data(tmp / "toy_normals", num_train=2, num_val=1, layout="nyu_normals")
    overrides = ["experiment=nyu_normals_linear_b16", "backbone=tiny", "data=toy_normals", "trainer=cpu"]
    overrides += ["backbone.out_indices=[-2,-1]", "data.num_workers=0"]
    cfg = compose_train_cfg(overrides, tmp / "run", data_dir=root.parent)
    torch.manual_seed(0)
    task = build_task(cfg, instantiate(cfg.data, _convert_="all")).eval()
    with torch.no_grad():  # a probe whose output is not left-right symmetric by accident
        for p in task.model.head.parameters():
            p.add_(torch.randn_like(p))
    return task


def test_tta_flip_preset_averages_the_mirrored_prediction(normals_task) -> None:
    task = normals_task
    image = torch.randn(1, 3, 20, 26)
    plain = task(image)
    want = normalize_normals(plain + flip_normals(task(image.flip(-1))))
    assert not torch.allclose(want, plain, atol=1e-3)
    try:
        task.set_tta("flip")
        torch.testing.assert_close(task.components["normals"].infer(image), want)
        task.set_tta("none")
        torch.testing.assert_close(task.components["normals"].infer(image), plain)
        task.set_tta({"flip": True})
        torch.testing.assert_close(task.components["normals"].infer(image), want)
    finally:
        task.set_tta("none")
    with pytest.raises(ValueError, match="ms_flip.*known: \\['flip', 'none'\\]"):
        task.set_tta("ms_flip")
    with pytest.raises(ValueError, match="scales"):
        task.set_tta({"scales": [1.0]})


def test_eval_refuses_task_overrides_it_would_ignore(tmp_path: Path) -> None:
    cfg = OmegaConf.create({"ckpt_path": str(tmp_path / "none.ckpt"), "task": {"eval": {"flip": True}}})
    with pytest.raises(ValueError, match=r"task\.eval\.flip: .*tta="):
        run_eval(cfg)


def test_predict_returns_normals_prediction(normals_task) -> None:
    image = np.random.default_rng(1).integers(0, 256, (18, 22, 3), dtype=np.uint8)
    (pred,) = normals_task.components["normals"].predict([image])
    assert isinstance(pred, NormalsPrediction)
    assert pred.normals.dtype == np.float32 and pred.shape == (18, 22, 3)
    assert np.asarray(pred) is pred.normals
    x = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    x = (x - torch.tensor(normals_task.mean).view(3, 1, 1)) / torch.tensor(normals_task.std).view(3, 1, 1)
    want = normals_task(x[None])[0].permute(1, 2, 0).detach().numpy()
    np.testing.assert_allclose(pred.normals, want, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(pred.normals, axis=-1), 1.0, atol=1e-5)


def test_metric_names_and_monitor_check(normals_task) -> None:
    assert normals_task.components["normals"].metric_names() == list(NORMAL_METRIC_KEYS)
    normals_task.check_monitor("val/median")
    with pytest.raises(ValueError, match="monitor=val/mIoU: .*logs no 'mIoU'.*val/a11.25"):
        normals_task.check_monitor("val/mIoU")
