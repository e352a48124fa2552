"""``ckpt_path=`` resumes a killed run exactly: same final weights as a run that was never stopped."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from siglip_dense.train import run_train
from tests.conftest import compose_train_cfg

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
