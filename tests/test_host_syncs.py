"""No host sync in any task's training step (issue 14 item 7).

CUDA's sync debug mode needs a GPU; on CPU the same events are visible at the dispatcher: every
host read of a tensor value (``.item()``, ``float(t)``, ``bool(t)``, ``if t.any():``) reaches
``aten._local_scalar_dense`` / ``aten.is_nonzero``, and data-dependent shapes reach ``aten.nonzero``.
A TorchDispatchMode records them with the Python frame that asked; frames in siglip_dense are ours
(library internals, e.g. torchvision's detector, are not what this checks).
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.test_task_base import _multitask, _task

SYNC_OPS = {"aten._local_scalar_dense", "aten.is_nonzero", "aten.nonzero", "aten.equal"}
OURS = str(Path(__file__).resolve().parents[1] / "siglip_dense")


class SyncRecorder(TorchDispatchMode):
    """Records (op, our innermost frame) for every host-syncing op asked for by our code."""

    def __init__(self) -> None:
        super().__init__()
        self.ours: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = str(func.overloadpacket)  # e.g. "aten._local_scalar_dense"
        if name in SYNC_OPS:
            frames = [f for f in traceback.extract_stack() if "/torch/" not in f.filename]
            caller = next((f for f in reversed(frames) if f.filename != __file__), None)
            if caller is not None and caller.filename.startswith(OURS):
                self.ours.append(f"{name} at {caller.filename}:{caller.lineno} {caller.line}")
        return func(*args, **(kwargs or {}))


def _seg_batch(n: int = 2) -> dict[str, Any]:
    return {
        "image": torch.randn(n, 3, 64, 64),
        "mask": torch.randint(0, 3, (n, 64, 64)),
        "meta": [{"path": f"s{i}.jpg"} for i in range(n)],
    }


def _depth_batch(n: int = 2) -> dict[str, Any]:
    return {
        "image": torch.randn(n, 3, 64, 64),
        "depth": torch.rand(n, 64, 64) * 5 + 0.5,
        "meta": [{"depth_path": f"d{i}.png"} for i in range(n)],
    }


def _det_batch() -> dict[str, Any]:
    masks = torch.zeros(1, 128, 128, dtype=torch.uint8)
    masks[0, 20:60, 30:90] = 1
    target = {"boxes": torch.tensor([[30.0, 20.0, 90.0, 60.0]]), "labels": torch.tensor([1]), "masks": masks}
    return {"image": [torch.randn(3, 128, 128)], "target": [target], "meta": [{"path": "a.jpg"}]}


CASES = {
    "toy_seg": (_seg_batch, {}),
    "toy_depth": (_depth_batch, {}),
    "toy_det": (_det_batch, {"category_ids": [1, 2, 3]}),
}


@pytest.mark.parametrize("experiment", sorted(CASES))
def test_training_step_has_no_host_sync(experiment: str, tmp_path: Path) -> None:
    make_batch, extra = CASES[experiment]
    if experiment == "toy_depth":
        task = _task_depth(tmp_path)
    else:
        task = _task(tmp_path, experiment, **extra)
    task.train()
    batch = make_batch()
    task.check_batch(batch)  # host-side checks run before the transfer (not in the step)
    recorder = SyncRecorder()
    with recorder:
        loss = task.training_step(batch, 0)
    assert loss.requires_grad
    assert recorder.ours == []


def test_multitask_training_step_has_no_host_sync(tmp_path: Path) -> None:
    task = _multitask(tmp_path).train()
    batch = {"seg": _seg_batch(), "depth": _depth_batch()}
    task.check_batch(batch)
    recorder = SyncRecorder()
    with recorder:
        task.training_step(batch, 0)
    assert recorder.ours == []


def test_the_recorder_sees_our_syncs(tmp_path: Path) -> None:
    """The check can fail: a non-finite-loss test written with ``if not torch.isfinite(...)``."""
    task = _task(tmp_path, "toy_seg")
    recorder = SyncRecorder()
    with recorder:
        task.check_labels(_seg_batch()["mask"], {})  # host-side check: a sync if run on the device
    assert any("segmentation.py" in s for s in recorder.ours), recorder.ours


def test_non_finite_loss_is_raised_at_the_check(tmp_path: Path) -> None:
    task = _task(tmp_path, "toy_seg")
    task.track_finite("segmentation", torch.tensor(1.0))
    task.raise_if_not_finite()
    task.track_finite("segmentation", torch.tensor(float("nan")))
    task.track_finite("segmentation", torch.tensor(float("inf")))
    with pytest.raises(FloatingPointError, match="non-finite segmentation loss at step 0"):
        task.raise_if_not_finite()


def _task_depth(tmp_path: Path) -> Any:
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from tests.conftest import compose_train_cfg

    cfg = compose_train_cfg(["experiment=toy_depth"], tmp_path / "run")
    GlobalHydra.instance().clear()
    return instantiate(OmegaConf.to_container(cfg.task, resolve=True), _recursive_=False, _convert_="all")


def test_a_diverged_run_stops_before_validation_writes_a_checkpoint(tmp_path: Path) -> None:
    """In a real fit: NaN gradients at step 0 make the loss of step 1 NaN; the run stops at the first
    check (validation after 2 steps, logging every 50 steps), before any checkpoint is saved."""
    import lightning as L

    task = _task(tmp_path, "toy_seg")
    task.scheduler_cfg["total_steps"] = 10
    step = task.training_step
    task.training_step = lambda batch, batch_idx: step(batch, batch_idx) * float("nan")  # NaN grads
    loader = torch.utils.data.DataLoader([_seg_batch(1) for _ in range(4)], batch_size=None)
    trainer = L.Trainer(
        max_steps=4,
        val_check_interval=2,
        log_every_n_steps=50,
        logger=False,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        accelerator="cpu",
    )
    with pytest.raises(FloatingPointError, match="non-finite segmentation loss at step 1"):
        trainer.fit(task, loader, loader)
    assert not list(tmp_path.rglob("*.ckpt"))
