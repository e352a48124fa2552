"""Segmentation under DDP (2 CPU processes, gloo): one run directory, the same metrics as 1 process.

The toy validation split has an odd number of images, so a padding DistributedSampler would count
one image twice; the evaluation sampler must not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from siglip_dense.data.segmentation import SegDataModule
from siglip_dense.data.toy import ensure_toy_data
from siglip_dense.tasks.segmentation import SegmentationTask

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def odd_toy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_toy_data(tmp_path_factory.mktemp("ddp") / "toy_seg", num_train=8, num_val=5, seed=3)


@pytest.mark.slow
def test_ddp_sim_validation_equals_single_process(odd_toy_root: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "outputs" / "run"
    cmd = [
        sys.executable,
        "train.py",
        "experiment=toy_seg",
        "trainer=ddp_sim",
        f"data.root={odd_toy_root}",
        "trainer.max_epochs=1",
        "data.batch_size=2",
        "data.num_workers=0",
        "num_vis=0",
        f"hydra.run.dir={run_dir}",
        f"paths.log_dir={tmp_path / 'outputs'}",
    ]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # exactly one run directory: rank 1 reused rank 0's
    assert [p.name for p in (tmp_path / "outputs").iterdir()] == ["run"]
    ddp_metrics = json.loads((run_dir / "metrics.json").read_text())

    ckpt = next((run_dir / "checkpoints").glob("epoch_*.ckpt"))
    task = SegmentationTask.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    dm = SegDataModule(root=str(odd_toy_root), toy=False, num_workers=0, crop_size=(128, 128))
    dm.mean, dm.std = task.mean, task.std
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    trainer.validate(task, datamodule=dm, verbose=False)
    single = task.last_metrics
    assert len(dm.val_dataset) == 5
    for key in ("mIoU", "aAcc", "mAcc"):
        assert single[key] == pytest.approx(ddp_metrics[key], abs=1e-6), key
    assert single["per_class_IoU"] == pytest.approx(ddp_metrics["per_class_IoU"], abs=1e-6, nan_ok=True)

    # tools/eval.py under DDP writes the single-process numbers too
    eval_dir = tmp_path / "eval"
    cmd = [sys.executable, "tools/eval.py", f"ckpt_path={ckpt}", "trainer=ddp_sim", "data.num_workers=0"]
    cmd += [f"output_dir={eval_dir}", f"hydra.run.dir={tmp_path / 'eval_hydra'}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    evaluated = json.loads((eval_dir / "metrics.json").read_text())
    for key in ("mIoU", "aAcc", "mAcc"):
        assert evaluated[key] == pytest.approx(single[key], abs=1e-6), key
    assert torch.distributed.is_available()
