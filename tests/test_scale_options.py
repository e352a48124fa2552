"""Scale options of train.py: DDP's unused-parameter search, channels-last, Hydra sweeps under DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from siglip_dense.checkpoints import load_model
from siglip_dense.train import build_task, run_train, trainer_config
from tests.conftest import compose_train_cfg

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "OMP_NUM_THREADS": "1"}


def _task(overrides: list[str], tmp_path: Path, data_root: Path):
    from hydra.utils import instantiate

    cfg = compose_train_cfg(overrides, tmp_path / "run", data_dir=data_root.parent)
    datamodule = instantiate(cfg.data, _convert_="all")
    return cfg, build_task(cfg, datamodule)


# ---- find_unused_parameters only where a branch gets no gradient --------------------------------
@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([], None),
        (["backbone.out_indices=[1,2,3,4]"], "blocks 5..5"),
        (["task.aux_weight=0"], "aux_weight=0"),
        (["backbone.out_indices=[1,2,3,4]", "backbone.freeze=true"], None),  # frozen: no gradient expected
        (["experiment=toy_depth"], None),
        (["experiment=toy_det"], None),
    ],
)
def test_unused_parameter_reasons(
    overrides: list[str], expected: str | None, tmp_path: Path, toy_data_root: Path, hydra_cleanup: None
) -> None:
    cfg, task = _task(["trainer=ddp_sim", *overrides], tmp_path, toy_data_root)
    reasons = task.unused_parameter_reasons()
    strategy = trainer_config(cfg.trainer, task).strategy
    if expected is None:
        assert reasons == [] and strategy == "ddp"
    else:
        assert any(expected in r for r in reasons), reasons
        assert strategy == "ddp_find_unused_parameters_true"
    # a strategy the user wrote explicitly is left alone
    explicit = OmegaConf.merge(cfg.trainer, {"strategy": "ddp_find_unused_parameters_false"})
    assert trainer_config(explicit, task).strategy == "ddp_find_unused_parameters_false"


def test_reasons_match_parameters_without_gradient(
    tmp_path: Path, toy_data_root: Path, hydra_cleanup: None
) -> None:
    """The static reasons agree with a real backward: exactly those parameters get no gradient."""
    _, task = _task(["backbone.out_indices=[1,2,3,4]", "task.aux_weight=0"], tmp_path, toy_data_root)
    task.train()
    images = torch.randn(2, 3, 64, 64)
    target = torch.randint(0, task.num_classes, (2, 64, 64))
    task.compute_loss(task.model(images), target)["loss"].backward()
    no_grad = {n for n, p in task.named_parameters() if p.requires_grad and p.grad is None}
    unused = ("model.backbone.vit.blocks.5.", "model.aux_head.")
    assert no_grad == {n for n, _ in task.named_parameters() if n.startswith(unused)}
    assert len(task.unused_parameter_reasons()) == 2


@pytest.fixture(scope="module")
def all_toy_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Small toy seg, depth and detection sets side by side, as paths.data_dir."""
    from siglip_dense.data.toy import ensure_toy_data

    root = tmp_path_factory.mktemp("alltoy")
    for name, layout in (("toy_seg", "ade20k"), ("toy_depth", "nyu"), ("toy_det", "coco")):
        ensure_toy_data(root / name, num_train=4, num_val=2, layout=layout)
    return root


def _first_training_batch(datamodule: Any) -> Any:
    datamodule.setup("fit")
    members = getattr(datamodule, "datamodules", None)
    if members is not None:  # multi-task: one batch per task, keyed by task name
        return {name: next(iter(dm.train_dataloader())) for name, dm in members.items()}
    return next(iter(datamodule.train_dataloader()))


DPT_ONLY = ("features", "out_channels", "head_channels")  # experiment=toy_depth's DPT sizes


@pytest.mark.parametrize(
    "overrides",
    [
        ["experiment=toy_depth"],
        ["experiment=toy_depth", "task=depth_linear", *[f"~task.head.{k}" for k in DPT_ONLY]],
        ["experiment=toy_det"],
        ["experiment=toy_det", "task=det_retinanet", "neck.top_block=false"],
        ["experiment=toy_multitask"],
    ],
    ids=["dpt", "depth_linear", "mask_rcnn", "retinanet", "multitask"],
)
def test_every_trainable_parameter_gets_a_gradient(
    overrides: list[str], tmp_path: Path, all_toy_data: Path, hydra_cleanup: None
) -> None:
    """Tasks that name no unused branch run under plain DDP: one real step must reach every weight.

    (DPT's top fusion block once carried a skip unit that never ran: DDP stopped at the 2nd step.)
    """
    from hydra.utils import instantiate

    small = ["data.num_workers=0", "data.batch_size=2"]
    cfg = compose_train_cfg([*overrides, *small], tmp_path / "run", data_dir=all_toy_data)
    datamodule = instantiate(cfg.data, _convert_="all")
    task = build_task(cfg, datamodule)
    datamodule.mean, datamodule.std = tuple(task.mean), tuple(task.std)
    task.train()
    task.training_step(_first_training_batch(datamodule), 0).backward()
    no_grad = [n for n, p in task.named_parameters() if p.requires_grad and p.grad is None]
    assert task.unused_parameter_reasons() == [] and no_grad == []


def test_dpt_loads_state_dicts_with_the_old_top_skip_unit() -> None:
    from siglip_dense.models.heads.depth import DPTHead

    head = DPTHead(32, ["b1", "b2", "b3", "b4"], features=16, out_channels=(8, 8, 16, 16), head_channels=8)
    state = dict(head.state_dict())
    old = {f"refinenets.3.res1.conv{i}.{k}": torch.zeros(1) for i in (1, 2) for k in ("weight", "bias")}
    head.load_state_dict({**state, **old}, strict=True)  # the never-run unit is dropped, not an error
    with pytest.raises(RuntimeError, match=r"refinenets\.2\.res1"):
        head.load_state_dict({**state, "refinenets.2.res1.extra": torch.zeros(1)}, strict=True)


def _ddp_train(tmp_path: Path, data_root: Path, extra: list[str]) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "train.py",
        "experiment=toy_seg",
        "trainer=ddp_sim",
        f"data.root={data_root}",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=3",
        "data.batch_size=2",
        "data.num_workers=0",
        "validate=false",
        "num_vis=0",
        f"hydra.run.dir={tmp_path / 'run'}",
        f"paths.log_dir={tmp_path}",
        *extra,
    ]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=ENV)


@pytest.mark.slow
def test_ddp_trains_with_an_unused_branch(tmp_path: Path, toy_data_root: Path) -> None:
    """Blocks after the last out_index get no gradient: DDP must search (and does, by itself)."""
    proc = _ddp_train(tmp_path / "auto", toy_data_root, ["backbone.out_indices=[1,2,3,4]"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "find_unused_parameters=True" in proc.stdout + proc.stderr
    # the same run with the search forced off is what DDP's default would do: it fails
    forced = ["backbone.out_indices=[1,2,3,4]", "trainer.strategy=ddp_find_unused_parameters_false"]
    proc = _ddp_train(tmp_path / "forced", toy_data_root, forced)
    assert proc.returncode != 0
    assert "parameters that were not used in producing the loss" in proc.stderr, proc.stderr[-2000:]


# ---- channels-last ------------------------------------------------------------------------------
@pytest.mark.parametrize("experiment", ["toy_seg", "toy_depth"])
def test_channels_last_gives_the_same_outputs(
    experiment: str, tmp_path: Path, toy_data_root: Path, hydra_cleanup: None
) -> None:
    torch.manual_seed(0)
    _, task = _task([f"experiment={experiment}"], tmp_path, toy_data_root)
    task.eval()
    images = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        before = task(images)
        task.use_channels_last()
        after = task(images)
    assert task.backbone.vit.patch_embed.proj.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


def test_channels_last_run_exports_and_reloads(
    tmp_path: Path, toy_data_root: Path, hydra_cleanup: None
) -> None:
    overrides = [
        "experiment=toy_seg",
        "channels_last=true",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=2",
        "+trainer.limit_val_batches=2",
        "data.num_workers=0",
        "num_vis=0",
    ]
    cfg = compose_train_cfg(overrides, tmp_path / "run", data_dir=toy_data_root.parent)
    metrics = run_train(cfg)
    assert 0.0 <= metrics["mIoU"] <= 1.0
    model = load_model(tmp_path / "run" / "checkpoints" / "last.ckpt")
    image = (torch.rand(70, 90, 3) * 255).to(torch.uint8).numpy()
    assert model.predict([image])[0].shape == (70, 90)


# ---- Hydra sweeps under DDP: one run directory per trial, shared by its ranks -------------------
@pytest.mark.slow
def test_multirun_under_ddp_one_directory_per_trial(tmp_path: Path, toy_data_root: Path) -> None:
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "train.py",
        "-m",
        "experiment=toy_seg",
        "trainer=ddp_sim",
        "seed=1,2",
        f"data.root={toy_data_root}",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=2",
        "+trainer.limit_val_batches=2",
        "data.batch_size=2",
        "data.num_workers=0",
        "num_vis=0",
        f"paths.log_dir={tmp_path}",
        f"hydra.sweep.dir={sweep}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]
    trials = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in trials] == ["0", "1"]
    for seed, trial in zip((1, 2), trials):
        assert OmegaConf.load(trial / "config.yaml").seed == seed
        assert "mIoU" in json.loads((trial / "metrics.json").read_text())
        assert (trial / "checkpoints" / "last.ckpt").exists()
        # rank 1 of this trial ran in this trial's directory (its log is there)
        assert (trial / "train_ddp_process_1.log").exists()
