"""toy_seg_naflex end to end on CPU: trains on crops, evaluates at native aspect ratio, predicts.

The evaluation's saved PNGs are re-scored by an independent numpy confusion matrix, so the NaFlex
predictions written at each image's original size carry the reported mIoU.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from siglip_dense.evaluate import run_eval
from siglip_dense.train import run_train
from tests.conftest import compose_cfg, compose_train_cfg
from tests.test_eval_seg import numpy_miou

REPO = Path(__file__).resolve().parents[1]
SHORT = [
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=3",
    "+trainer.limit_val_batches=2",
    "data.num_workers=0",
    "data.batch_size=4",
    "num_vis=2",
]


@pytest.fixture(scope="module")
def naflex_run(tmp_path_factory: pytest.TempPathFactory, toy_data_root: Path) -> Path:
    run_dir = tmp_path_factory.mktemp("naflex") / "run"
    cfg = compose_train_cfg(["experiment=toy_seg_naflex", *SHORT], run_dir, data_dir=toy_data_root.parent)
    run_train(cfg)
    return run_dir


def _ckpt(run_dir: Path) -> Path:
    return next((run_dir / "checkpoints").glob("epoch_*.ckpt"))


@pytest.mark.slow
def test_toy_seg_naflex_trains_and_evaluates(naflex_run: Path) -> None:
    metrics = json.loads((naflex_run / "metrics.json").read_text())
    assert 0.0 <= metrics["mIoU"] <= 1.0 and 0.0 <= metrics["aAcc"] <= 1.0
    assert (naflex_run / "predictions.png").stat().st_size > 0
    hp = torch.load(_ckpt(naflex_run), map_location="cpu", weights_only=True)["hyper_parameters"]
    assert hp["eval"]["mode"] == "naflex" and hp["eval"]["max_num_patches"] == 64  # the recorded protocol


@pytest.mark.slow
def test_naflex_eval_predictions_rescore_to_its_metrics(
    naflex_run: Path, toy_data_root: Path, tmp_path: Path, hydra_cleanup: None
) -> None:
    out = tmp_path / "eval"
    overrides = [f"ckpt_path={_ckpt(naflex_run)}", "data.num_workers=0", "save_predictions=true"]
    metrics = run_eval(compose_cfg("eval", [*overrides, f"output_dir={out}"], tmp_path / "hydra"))
    num_classes = len(metrics["per_class_IoU"])
    miou, aacc = numpy_miou(out / "predictions", toy_data_root / "annotations" / "validation", num_classes)
    assert miou == pytest.approx(metrics["mIoU"], abs=1e-6)
    assert aacc == pytest.approx(metrics["aAcc"], abs=1e-6)


@pytest.mark.slow
def test_predict_tool_uses_naflex_checkpoint(naflex_run: Path, tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (70, 300, 3), dtype=np.uint8)).save(src / "wide.png")
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "tools/predict.py",
        f"ckpt_path={_ckpt(naflex_run)}",
        f"input={src}",
        f"output={out}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert np.asarray(Image.open(out / "wide.png.png")).shape == (70, 300)
    assert (out / "wide.png_vis.png").stat().st_size > 0
