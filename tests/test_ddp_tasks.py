"""Depth and detection under DDP (2 CPU processes, gloo), and the fsdp / multinode trainer configs.

Each toy validation split has an odd number of images, so a padding DistributedSampler would count
one image twice: ``tools/eval.py trainer=ddp_sim`` must write the single-process ``metrics.json``.
A Hydra run under DDP leaves exactly one run directory, and its checkpoint loads and resumes in one
process.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from siglip_dense.checkpoints import load_task
from siglip_dense.data.toy import ensure_toy_data
from tests.conftest import compose_train_cfg

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "OMP_NUM_THREADS": "1"}
COMMON = ["trainer.max_epochs=1", "+trainer.limit_train_batches=2", "data.num_workers=0", "num_vis=0"]

# experiment -> (layout, num_train, num_val (odd), task-specific overrides)
TASKS = {
    "toy_depth": ("nyu", 4, 3, ["data.batch_size=2", "data.toy_num_train=4", "data.toy_num_val=3"]),
    "toy_det": (
        "coco",
        4,
        3,
        ["data.batch_size=2", "data.image_size=128", "task.detector.box_detections_per_img=20"],
    ),
}


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def assert_metrics_equal(a: dict, b: dict, path: str = "") -> None:
    """Equal to 1e-6, key by key (nested), with None / NaN only where the other side has them too."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), (path, sorted(a), sorted(b))
        for key in a:
            assert_metrics_equal(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_metrics_equal(x, y, f"{path}[{i}]")
    elif a is None or b is None:
        assert a is None and b is None, (path, a, b)
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), (path, a, b)
    elif isinstance(a, (int, float)) and not isinstance(a, bool):
        assert b == pytest.approx(a, abs=1e-6), (path, a, b)
    else:
        assert a == b, (path, a, b)


@pytest.mark.slow
@pytest.mark.parametrize("experiment", sorted(TASKS))
def test_ddp_sim_train_and_eval_equal_single_process(experiment: str, tmp_path: Path) -> None:
    layout, num_train, num_val, extra = TASKS[experiment]
    root = ensure_toy_data(
        tmp_path / "data" / experiment, num_train=num_train, num_val=num_val, seed=5, layout=layout
    )
    outputs, run_dir = tmp_path / "outputs", tmp_path / "outputs" / "run"
    cmd = [sys.executable, "train.py", f"experiment={experiment}", "trainer=ddp_sim", f"data.root={root}"]
    cmd += [*COMMON, *extra, f"hydra.run.dir={run_dir}", f"paths.log_dir={outputs}"]
    run(cmd)
    # exactly one run directory: rank 1 reused rank 0's
    assert [p.name for p in outputs.iterdir()] == ["run"]
    ckpts = sorted((run_dir / "checkpoints").glob("epoch_*.ckpt"))
    assert len(ckpts) == 1, ckpts
    ckpt = ckpts[0]

    # a checkpoint written under DDP loads in a single process
    task = load_task(ckpt)
    assert not task.training
    assert all(torch.isfinite(p).all() for p in task.parameters())
    # ... and resumes training there: one more epoch, optimizer and loop state carried on
    resumed = tmp_path / "resumed"
    cmd = [sys.executable, "train.py", f"experiment={experiment}", "trainer=cpu", f"data.root={root}"]
    cmd += [a for a in COMMON if not a.startswith("trainer.max_epochs=")] + ["trainer.max_epochs=2"]
    cmd += [*extra, f"ckpt_path={ckpt}", "validate=false", f"hydra.run.dir={resumed}"]
    run([*cmd, f"paths.log_dir={tmp_path / 'outputs_resumed'}"])
    before = torch.load(ckpt, map_location="cpu", weights_only=True)
    after = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert (before["epoch"], after["epoch"]) == (0, 1)
    assert after["global_step"] > before["global_step"] > 0
    assert after["optimizer_states"][0]["state"], "the optimizer state was carried on"

    results, saved = {}, {}
    for trainer in ("ddp_sim", "cpu"):
        out = tmp_path / f"eval_{trainer}"
        cmd = [sys.executable, "tools/eval.py", f"ckpt_path={ckpt}", f"trainer={trainer}"]
        cmd += ["data.num_workers=0", "save_predictions=true", f"output_dir={out}"]
        run([*cmd, f"hydra.run.dir={tmp_path / f'hydra_{trainer}'}"])
        results[trainer] = json.loads((out / "metrics.json").read_text())
        saved[trainer] = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert_metrics_equal(results["cpu"], results["ddp_sim"])
    # the validation run inside DDP training computed the same numbers
    assert_metrics_equal(results["cpu"], json.loads((run_dir / "metrics.json").read_text()))
    # one prediction per validation image, none from the sampler's padding
    assert saved["cpu"] == saved["ddp_sim"]
    if experiment == "toy_depth":
        assert results["cpu"]["num_images"] == num_val
    else:
        coco = {k: json.loads((tmp_path / f"eval_{k}" / "coco_results.json").read_text()) for k in saved}
        assert len(coco["cpu"]) > 0
        ids = {k: Counter((d["image_id"], d["category_id"]) for d in v) for k, v in coco.items()}
        assert ids["cpu"] == ids["ddp_sim"]
        scores = {k: sorted(d["score"] for d in v) for k, v in coco.items()}
        assert scores["ddp_sim"] == pytest.approx(scores["cpu"], abs=1e-5)


@pytest.mark.parametrize("trainer", ["fsdp", "multinode"])
def test_scale_trainer_configs_compose_and_build_strategy(
    trainer: str, tmp_path: Path, hydra_cleanup: None
) -> None:
    cfg = compose_train_cfg(["experiment=toy_seg", f"trainer={trainer}"], tmp_path / "run")
    assert cfg.trainer.accelerator == "gpu"
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"
    if trainer == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy
        from timm.models.vision_transformer import Block

        from siglip_dense.train import build_task

        strategy = instantiate(cfg.trainer.strategy)
        assert isinstance(strategy, FSDPStrategy)
        assert strategy.kwargs["auto_wrap_policy"]._module_classes == {Block}
        assert strategy._state_dict_type == "full"  # one checkpoint file, loadable in one process
        # the wrap policy matches the backbone's blocks (one FSDP unit per block)
        task = build_task(cfg, instantiate(cfg.data, _convert_="all"))
        assert sum(isinstance(m, Block) for m in task.modules()) == 6  # backbone=tiny: 6 blocks
    else:
        assert cfg.trainer.strategy == "ddp"
        assert cfg.trainer.num_nodes == int(os.environ.get("SLURM_NNODES", 1))
        assert cfg.trainer.devices == -1
