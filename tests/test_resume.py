"""``ckpt_path=`` resumes a killed run exactly (same final weights as a run that was never stopped), and
``train`` / ``validate`` / ``ckpt_path`` / ``init_from`` together validate the weights they name or stop
with one line naming the keys."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

from siglip_dense.data.toy import ensure_toy_data
from siglip_dense.evaluate import run_eval
from siglip_dense.train import check_run_mode, run_train
from tests.conftest import compose_cfg, compose_train_cfg

BASE = [
    "experiment=toy_seg",
    "trainer.max_epochs=3",
    "+trainer.limit_train_batches=3",
    "+trainer.limit_val_batches=2",
    "data.num_workers=0",
    "data.batch_size=4",
    "num_vis=0",
    "validate=false",
]


class KillAt(L.Callback):
    """Dies in the middle of an epoch, like a preempted job."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int
    ) -> None:  # noqa: ANN001
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            raise RuntimeError("killed")


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 2
    return ckpt["state_dict"]


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted_run(
    tmp_path: Path, toy_data_root: Path, hydra_cleanup: None
) -> None:
    data = toy_data_root.parent
    straight = tmp_path / "straight"
    run_train(compose_train_cfg(BASE, straight, data_dir=data))

    killed = tmp_path / "killed"
    overrides = [*BASE, "+callbacks.kill._target_=tests.test_resume.KillAt"]
    overrides += ["+callbacks.kill.epoch=1", "+callbacks.kill.batch=1"]
    with pytest.raises(RuntimeError, match="killed"):
        run_train(compose_train_cfg(overrides, killed, data_dir=data))
    last = killed / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 0  # mid-epoch 1 death

    resumed = tmp_path / "resumed"
    run_train(compose_train_cfg([*BASE, f"ckpt_path={last}"], resumed, data_dir=data))
    a, b = final_weights(straight), final_weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


# -- which weights a run validates -------------------------------------------------------------------
SHORT = ["experiment=toy_seg", "trainer.max_epochs=1", "+trainer.limit_train_batches=2"]
SHORT += ["data.num_workers=0", "data.batch_size=4", "num_vis=0", "data.toy=false"]


def train(overrides: list[str], run_dir: Path) -> dict:
    try:
        return run_train(compose_train_cfg(overrides, run_dir))
    finally:
        GlobalHydra.instance().clear()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A short toy_seg run (2 steps) whose final validation of its best checkpoint is its metrics.json."""
    base = tmp_path_factory.mktemp("modes")
    root = ensure_toy_data(base / "data" / "toy_seg", num_train=8, num_val=4, seed=2)
    train([*SHORT, f"data.root={root}"], base / "run")
    return base / "run", root


def assert_same_metrics(got: dict, expected: dict) -> None:
    assert got["mIoU"] == pytest.approx(expected["mIoU"], rel=1e-6, abs=1e-9)
    assert got["aAcc"] == pytest.approx(expected["aAcc"], rel=1e-6, abs=1e-9)
    assert got["per_class_IoU"] == pytest.approx(expected["per_class_IoU"], rel=1e-6, abs=1e-9)


@pytest.mark.slow
def test_validate_without_training_evaluates_the_named_weights(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    """``train=false ckpt_path=X`` (and ``init_from=X``) give the training run's own validation of X and
    tools/eval.py's numbers for X (it used to validate the model as initialised)."""
    run_dir, root = trained
    best = next((run_dir / "checkpoints").glob("epoch_*.ckpt"))
    expected = json.loads((run_dir / "metrics.json").read_text())
    base = [*SHORT, f"data.root={root}", "train=false"]
    assert_same_metrics(train([*base, f"ckpt_path={best}"], tmp_path / "ckpt"), expected)
    assert_same_metrics(train([*base, f"init_from={best}"], tmp_path / "init"), expected)
    try:
        overrides = [f"ckpt_path={best}", "data.num_workers=0", f"output_dir={tmp_path / 'eval'}"]
        assert_same_metrics(run_eval(compose_cfg("eval", overrides, tmp_path / "hydra")), expected)
    finally:
        GlobalHydra.instance().clear()


@pytest.mark.slow
def test_resume_does_not_read_init_from(trained: tuple[Path, Path], tmp_path: Path) -> None:
    """Resuming with the first run's arguments (``init_from`` included) takes the weights from ckpt_path:
    the init_from file is not read, so a moved or deleted one does not stop the resume."""
    run_dir, root = trained
    last = run_dir / "checkpoints" / "last.ckpt"
    args = [*SHORT, f"data.root={root}", "validate=false", f"init_from={tmp_path / 'gone.ckpt'}"]
    train([*args, "trainer.max_epochs=2", f"ckpt_path={last}"], tmp_path / "resumed")
    assert torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1


def test_every_train_validate_ckpt_init_combination_runs_or_stops_with_one_line(tmp_path: Path) -> None:
    """train x validate x ckpt_path x init_from: training (with or without a final validation) always
    runs, ckpt_path resuming; without training exactly one of ckpt_path / init_from (whole model) names
    the weights to validate, and every other combination stops with one line naming the keys."""
    cfg = compose_train_cfg(["experiment=toy_seg"], tmp_path / "run")
    GlobalHydra.instance().clear()
    refused = {
        (False, False, False, False): ["train=false", "validate=false"],
        (False, False, True, False): ["train=false", "validate=false"],
        (False, False, False, True): ["train=false", "validate=false"],
        (False, False, True, True): ["train=false", "validate=false"],
        (False, True, False, False): ["train=false", "ckpt_path="],
        (False, True, True, True): ["ckpt_path=", "init_from="],
    }
    for combo in itertools.product([True, False], repeat=4):
        train_, validate, ckpt, init = combo
        with open_dict(cfg):
            cfg.train, cfg.validate = train_, validate
            cfg.ckpt_path = str(tmp_path / "x.ckpt") if ckpt else None
            cfg.task.init_from = str(tmp_path / "y.ckpt") if init else None
        if combo not in refused:
            check_run_mode(cfg)
            continue
        with pytest.raises(ValueError) as err:
            check_run_mode(cfg)
        message = str(err.value)
        assert "\n" not in message and all(key in message for key in refused[combo]), (combo, message)
    with open_dict(cfg):  # validating init_from's weights needs all of them
        cfg.train, cfg.validate, cfg.ckpt_path = False, True, None
        cfg.task.init_from, cfg.task.init_from_filter = str(tmp_path / "y.ckpt"), "backbone"
    with pytest.raises(ValueError, match="init_from_filter=backbone.*init_from_filter=all"):
        check_run_mode(cfg)
    for exported in (tmp_path, tmp_path / "model.safetensors"):  # tools/export.py's folder or its file
        with open_dict(cfg):
            cfg.train, cfg.ckpt_path, cfg.task.init_from = True, str(exported), None
        with pytest.raises(ValueError, match=f"ckpt_path={exported} is exported.*init_from={exported}"):
            check_run_mode(cfg)
