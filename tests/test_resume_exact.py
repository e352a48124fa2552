"""Exact resume from any checkpoint the framework writes, and last.ckpt as the latest state.

The reference is always the uninterrupted run with the same settings: a resumed run must see the same
images with the same augmentation at every step and end with bit-identical weights (CPU). toy_seg at
6 steps per epoch, validating (and so checkpointing) every 4 steps: the step-4 checkpoint is mid-epoch.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from siglip_dense.data.toy import ensure_toy_data
from siglip_dense.train import run_train
from tests.conftest import compose_train_cfg
from tests.test_coco_data import toy_coco_root  # noqa: F401 - shared session fixture

REPO = Path(__file__).resolve().parents[1]
# train.py subprocesses use this process's intra-op thread count: CPU reductions are bit-identical only
# at equal thread counts, and the uninterrupted run they are compared with runs in this process
ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1"}
ENV["OMP_NUM_THREADS"] = str(torch.get_num_threads())
MAX_STEPS = 10  # not a multiple of the validation interval: the last 2 steps follow no validation


def base_overrides(root: Path, workers: int = 0) -> list[str]:
    return [
        "experiment=toy_seg",
        f"data.root={root}",
        "data.toy=false",
        f"data.num_workers={workers}",
        "data.batch_size=4",  # 24 images: 6 steps per epoch
        "data.crop_size=[64,64]",
        "data.base_size=[256,96]",
        f"trainer.max_steps={MAX_STEPS}",
        "+trainer.val_check_interval=4",
        "trainer.check_val_every_n_epoch=null",
        "+trainer.limit_val_batches=1",
        # the best-k callback monitors the global step, lowest best: the metric never improves after
        # the first validation, so best-k saves only at step 4 (what used to freeze last.ckpt there)
        "monitor=step",
        "monitor_mode=min",
        "num_vis=0",
        "validate=false",
    ]


class RecordBatches(L.Callback):
    """Appends each training step's image stems and a hash of each augmented crop to a per-rank file,
    with the step's epoch, batch index and logging step (what loggers write the step's values at)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        samples = [
            [meta["stem"], hashlib.sha1(img.numpy().tobytes()).hexdigest()[:16]]
            for meta, img in zip(batch["meta"], batch["image"])
        ]
        with open(f"{self.path}.rank{trainer.global_rank}", "a") as f:
            where = [trainer.current_epoch, batch_idx, trainer.fit_loop.epoch_loop._batches_that_stepped]
            f.write(json.dumps({"step": trainer.global_step, "samples": samples, "at": where}) + "\n")


class KillAt(L.Callback):
    """Dies before training step ``step`` (an error, like a crash: nothing is saved at that point)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("killed")


class PauseAt(L.Callback):
    """After step ``step``, touches ``marker`` and waits (≤ 60 s) for a SIGTERM: it lands mid-epoch there."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, Path(marker)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step != self.step:
            return
        self.marker.touch()
        deadline = time.monotonic() + 60
        while not trainer.received_sigterm and time.monotonic() < deadline:
            time.sleep(0.05)


class SignalAt(L.Callback):
    """Sends this process ``signum`` (through the handlers Lightning installed, as a scheduler would) at
    the first of its points a run reaches, at most once per run: when the validation after step ``s``
    starts (``val_steps``) or when the batch at ``global_step == s`` starts (``batch_steps``)."""

    def __init__(self, signum: int, val_steps: list[int] = (), batch_steps: list[int] = ()) -> None:  # type: ignore[assignment]
        self.signum, self.val_steps, self.batch_steps = int(signum), list(val_steps), list(batch_steps)
        self.sent = False

    def _send(self, steps: list[int], trainer: L.Trainer) -> None:
        if not self.sent and trainer.global_step in steps:
            self.sent = True
            signal.raise_signal(self.signum)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._send(self.val_steps, trainer)

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._send(self.batch_steps, trainer)


def record(path: Path) -> list[str]:
    return [f"+callbacks.record._target_={__name__}.RecordBatches", f"+callbacks.record.path={path}"]


def rows_seen(path: Path, rank: int = 0) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(f"{path}.rank{rank}").read_text().splitlines()]


def steps_seen(path: Path, rank: int = 0) -> dict[int, list[list[str]]]:
    return {r["step"]: r["samples"] for r in rows_seen(path, rank)}


def load(ckpt: Path) -> dict[str, Any]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load(a)["state_dict"], load(b)["state_dict"]
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def train(overrides: list[str], run_dir: Path) -> None:
    try:
        run_train(compose_train_cfg(overrides, run_dir))
    finally:
        GlobalHydra.instance().clear()


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_toy_data(tmp_path_factory.mktemp("exact") / "toy_seg", num_train=24, num_val=2, seed=1)


@pytest.fixture(scope="module")
def straight(toy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted single-process run (its batches recorded in ``<run>/batches.rank0``)."""
    run = tmp_path_factory.mktemp("straight") / "run"
    train([*base_overrides(toy_root), *record(run.parent / "batches")], run)
    return run


@pytest.mark.slow
def test_last_ckpt_is_the_final_state_when_the_metric_stops_improving(straight: Path) -> None:
    last = load(straight / "checkpoints" / "last.ckpt")
    assert (last["epoch"], last["global_step"]) == (1, MAX_STEPS)  # 6 steps/epoch: epoch 1, step 10
    assert last["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["completed"] == 4
    best = sorted(p.name for p in (straight / "checkpoints").glob("epoch_*.ckpt"))
    assert best == ["epoch_000.ckpt"]
    assert load(straight / "checkpoints" / best[0])["global_step"] == 4  # the only "improvement"


@pytest.mark.slow
def test_last_ckpt_with_epoch_validation_is_the_last_epoch(toy_root: Path, tmp_path: Path) -> None:
    """The issue's case: validation once per epoch, 3 epochs of 2 steps, best at epoch 0."""
    overrides = [
        o for o in base_overrides(toy_root) if "val_check_interval" not in o and "max_steps" not in o
    ]
    overrides += ["trainer.max_steps=-1", "trainer.max_epochs=3", "trainer.check_val_every_n_epoch=1"]
    train([*overrides, "+trainer.limit_train_batches=2"], tmp_path / "run")
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch_000.ckpt", "last.ckpt"]
    last = load(ckpts / "last.ckpt")
    assert (last["epoch"], last["global_step"]) == (2, 6)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_killed_mid_epoch_resumes_bit_identical(
    straight: Path, toy_root: Path, tmp_path: Path, workers: int
) -> None:
    """Killed before step 5 (epoch 0 has 6): last.ckpt is the mid-epoch step-4 state; resuming it
    (with 0 or 2 loader workers: augmentation must not depend on them) reproduces the straight run."""
    base = base_overrides(toy_root, workers)
    killed = tmp_path / "killed"
    kill = [f"+callbacks.kill._target_={__name__}.KillAt", "+callbacks.kill.step=5"]
    with pytest.raises(RuntimeError, match="killed"):
        train([*base, *kill, *record(tmp_path / "killed_batches")], killed)
    ckpt = load(killed / "checkpoints" / "last.ckpt")
    assert (ckpt["epoch"], ckpt["global_step"]) == (0, 4)
    assert not ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["is_last_batch"]

    resumed = tmp_path / "resumed"
    last = killed / "checkpoints" / "last.ckpt"
    train([*base, f"ckpt_path={last}", *record(tmp_path / "resumed_batches")], resumed)

    reference = steps_seen(straight.parent / "batches")
    before, after = steps_seen(tmp_path / "killed_batches"), steps_seen(tmp_path / "resumed_batches")
    assert sorted(after) == list(range(4, MAX_STEPS))
    assert {s: before[s] for s in range(4)} == {s: reference[s] for s in range(4)}
    assert after == {s: reference[s] for s in range(4, MAX_STEPS)}  # same images, same crops
    assert load(resumed / "checkpoints" / "last.ckpt")["global_step"] == MAX_STEPS
    assert_same_weights(straight / "checkpoints" / "last.ckpt", resumed / "checkpoints" / "last.ckpt")


@pytest.mark.slow
def test_resume_from_an_epoch_end_without_validation_with_workers(toy_root: Path, tmp_path: Path) -> None:
    """Validation every 2nd epoch: epoch 0's last.ckpt is written at on_train_epoch_end (Lightning then
    loads no loader state); killed in epoch 1 and resumed with 2 workers, epoch 1 gets epoch 1's order."""
    overrides = [
        o for o in base_overrides(toy_root, 2) if "val_check_interval" not in o and "max_steps" not in o
    ]
    overrides += ["trainer.max_steps=-1", "trainer.max_epochs=3", "trainer.check_val_every_n_epoch=2"]
    overrides += ["+trainer.limit_train_batches=2"]
    train([*overrides, *record(tmp_path / "straight_batches")], tmp_path / "straight")
    kill = [f"+callbacks.kill._target_={__name__}.KillAt", "+callbacks.kill.step=3"]
    with pytest.raises(RuntimeError, match="killed"):
        train([*overrides, *kill], tmp_path / "killed")
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    assert load(last)["global_step"] == 2
    train([*overrides, f"ckpt_path={last}", *record(tmp_path / "resumed_batches")], tmp_path / "resumed")
    reference, after = steps_seen(tmp_path / "straight_batches"), steps_seen(tmp_path / "resumed_batches")
    assert after == {s: reference[s] for s in range(2, 6)}
    assert_same_weights(
        tmp_path / "straight" / "checkpoints" / "last.ckpt",
        tmp_path / "resumed" / "checkpoints" / "last.ckpt",
    )


@pytest.mark.slow
def test_resume_from_the_best_checkpoint_of_a_max_steps_run_validated_per_epoch(
    toy_root: Path, tmp_path: Path
) -> None:
    """Training by max_steps with a validation at each epoch end, Lightning's best-k callback saves in
    on_train_epoch_end: its epoch_000.ckpt lies between two epochs, after a validation. Resumed, every
    later step has the uninterrupted run's images, epoch, batch index and logging step, and the final
    weights are bit-identical."""
    overrides = [o for o in base_overrides(toy_root) if "val_check_interval" not in o]
    overrides = [
        *[o for o in overrides if "check_val_every_n_epoch" not in o],
        "trainer.check_val_every_n_epoch=1",
    ]
    train([*overrides, *record(tmp_path / "straight_batches")], tmp_path / "straight")
    best = tmp_path / "straight" / "checkpoints" / "epoch_000.ckpt"
    assert load(best)["global_step"] == 6  # 6 steps per epoch; the only "improvement" of monitor=step
    train([*overrides, f"ckpt_path={best}", *record(tmp_path / "resumed_batches")], tmp_path / "resumed")
    reference = {r["step"]: r for r in rows_seen(tmp_path / "straight_batches")}
    rows = rows_seen(tmp_path / "resumed_batches")
    assert [r["step"] for r in rows] == list(range(6, MAX_STEPS))
    assert [r for r in rows if r != reference[r["step"]]] == []
    assert_same_weights(
        tmp_path / "straight" / "checkpoints" / "last.ckpt",
        tmp_path / "resumed" / "checkpoints" / "last.ckpt",
    )


def train_py(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "train.py", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=ENV)


@pytest.mark.slow
def test_ddp_sim_resume_from_mid_epoch_checkpoint_is_bit_identical(toy_root: Path, tmp_path: Path) -> None:
    """2 gloo processes: the step-4 (mid-epoch) checkpoint of a run resumes to that run's final weights."""
    base = [*base_overrides(toy_root), "trainer=ddp_sim", "data.batch_size=2"]  # 24 / 2 ranks / 2 = 6 steps
    every_val = ["+callbacks.every_val._target_=lightning.pytorch.callbacks.ModelCheckpoint"]
    every_val += [
        "+callbacks.every_val.save_top_k=-1",
        "+callbacks.every_val.filename='step{step}'",
        "+callbacks.every_val.auto_insert_metric_name=false",
    ]
    straight = tmp_path / "straight"
    proc = train_py([*base, *every_val, *record(tmp_path / "straight_batches"), f"hydra.run.dir={straight}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    step4 = straight / "checkpoints" / "step4.ckpt"
    assert load(step4)["epoch"] == 0

    resumed = tmp_path / "resumed"
    args = [*base, f"ckpt_path={step4}", *record(tmp_path / "resumed_batches"), f"hydra.run.dir={resumed}"]
    proc = train_py(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        reference, after = (
            steps_seen(tmp_path / "straight_batches", rank),
            steps_seen(tmp_path / "resumed_batches", rank),
        )
        assert after == {s: reference[s] for s in range(4, MAX_STEPS)}, f"rank {rank}"
    assert_same_weights(straight / "checkpoints" / "last.ckpt", resumed / "checkpoints" / "last.ckpt")


def signal_at_step_5(args: list[str], marker: Path, signum: int, env: dict[str, str]) -> tuple[int, str]:
    """Runs train.py, sends ``signum`` while it pauses after step 5; returns (exit status, output)."""
    pause = [f"+callbacks.pause._target_={__name__}.PauseAt", "+callbacks.pause.step=5"]
    pause.append(f"+callbacks.pause.marker={marker}")
    cmd = [sys.executable, "train.py", *args, *pause]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 240
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if not marker.exists():
            proc.kill()
            pytest.fail(f"train.py did not reach step 5: {proc.communicate()[0][-3000:]}")
        proc.send_signal(signum)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return proc.returncode, out


@pytest.mark.slow
def test_sigterm_saves_exits_nonzero_and_resumes_in_the_same_run_dir(
    straight: Path, toy_root: Path, tmp_path: Path
) -> None:
    """train.py SIGTERM'd after step 5 (mid-epoch): exit 128+15, last.ckpt at step 5; resuming with only
    ckpt_path continues in the same run directory and ends bit-identical to the uninterrupted run."""
    outputs = tmp_path / "outputs"
    run = outputs / "toy_seg" / "runs" / "first"
    base = [*base_overrides(toy_root), f"paths.log_dir={outputs}"]
    status, out = signal_at_step_5([*base, f"hydra.run.dir={run}"], tmp_path / "marker", signal.SIGTERM, ENV)
    assert status == 128 + signal.SIGTERM, out[-3000:]
    last = run / "checkpoints" / "last.ckpt"
    ckpt = load(last)
    assert (ckpt["epoch"], ckpt["global_step"]) == (0, 5)
    assert "Resume exactly with" in out

    resumed = train_py([*base, f"ckpt_path={last}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [p.name for p in (outputs / "toy_seg" / "runs").iterdir()] == ["first"]  # no second run dir
    assert "dirpath has changed" not in resumed.stdout + resumed.stderr
    assert load(last)["global_step"] == MAX_STEPS
    assert_same_weights(straight / "checkpoints" / "last.ckpt", last)


def fake_slurm(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Lightning's SLURMEnvironment (auto-requeue) for runs in this process, with an ``scontrol`` (SLURM's
    command-line client) that records what it is asked in the returned file."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol_calls"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    scontrol.chmod(0o755)
    slurm = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0"}
    slurm |= {"SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return calls


# where the chain below stops: right after the validation at step 4 (saved at step 4), in epoch 0's
# last batch (step 5: saved between the epochs, at step 6) and in epoch 1's first batch (saved at 7)
CHAIN_STOPS = [4, 6, 7]


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_stops_at_epoch_edges_and_after_validation_resume_bit_identical(
    straight: Path,
    toy_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    workers: int,
    signum: int,
) -> None:
    """One run stopped by a signal three times and resumed with the same arguments each time: right after
    a validation, in an epoch's last batch and in the next epoch's first batch. SIGTERM resumes from
    last.ckpt (``ckpt_path=``); SIGUSR1 under SLURM requeues, and the requeued job (same run directory,
    no ``ckpt_path``) resumes from Lightning's hpc checkpoint by itself. Every step sees the uninterrupted
    run's images and crops (with 0 or 2 loader workers) and the final weights are bit-identical."""
    calls = fake_slurm(monkeypatch, tmp_path) if signum == signal.SIGUSR1 else None
    run = tmp_path / "run"
    last = run / "checkpoints" / "last.ckpt"
    stop = [f"+callbacks.stop._target_={__name__}.SignalAt", f"+callbacks.stop.signum={int(signum)}"]
    stop += ["+callbacks.stop.val_steps=[4]", "+callbacks.stop.batch_steps=[5,6]"]
    args = [*base_overrides(toy_root, workers), *stop, *record(tmp_path / "batches")]
    resume = [f"ckpt_path={last}"] if signum == signal.SIGTERM else []
    saved = []
    for attempt in range(len(CHAIN_STOPS)):
        with pytest.raises(SystemExit) as stopped:
            train([*args, *(resume if attempt else [])], run)
        assert stopped.value.code == 128 + signum
        saved.append(load(last)["global_step"])
        if calls is not None:  # the state the requeued job resumes from is last.ckpt's
            assert (run / f"hpc_ckpt_{attempt + 1}.ckpt").read_bytes() == last.read_bytes()
    assert saved == CHAIN_STOPS
    train([*args, *resume], run)

    rows = rows_seen(tmp_path / "batches")
    assert [r["step"] for r in rows] == list(range(MAX_STEPS))  # no step repeated or skipped
    reference = {r["step"]: r for r in rows_seen(straight.parent / "batches")}
    different = [r["step"] for r in rows if r["samples"] != reference[r["step"]]["samples"]]
    assert not different, f"steps {different} saw other images or crops than the uninterrupted run"
    elsewhere = [(r["step"], r["at"]) for r in rows if r["at"] != reference[r["step"]]["at"]]
    assert not elsewhere, f"(step, [epoch, batch, logging step]) unlike the uninterrupted run: {elsewhere}"
    assert load(last)["global_step"] == MAX_STEPS
    assert_same_weights(straight / "checkpoints" / "last.ckpt", last)
    if calls is not None:
        assert calls.read_text().split() == ["requeue", "4242"] * len(CHAIN_STOPS)


@pytest.mark.slow
def test_slurm_requeue_signal_saves_at_a_batch_boundary_and_requeues(toy_root: Path, tmp_path: Path) -> None:
    """Under SLURM (Lightning's SLURMEnvironment, auto-requeue): SIGUSR1 after step 5 gives Lightning's
    hpc checkpoint and last.ckpt with the same step-5 state, one `scontrol requeue <job>`, exit 128+10."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol_calls"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"  # SLURM's command-line client, recording what it is asked
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    scontrol.chmod(0o755)
    slurm = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0"}
    slurm |= {"SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}
    env = {**ENV, **slurm, "PATH": f"{bin_dir}{os.pathsep}{ENV['PATH']}"}
    run = tmp_path / "run"
    args = [*base_overrides(toy_root), f"hydra.run.dir={run}"]
    status, out = signal_at_step_5(args, tmp_path / "marker", signal.SIGUSR1, env)
    assert status == 128 + signal.SIGUSR1, out[-3000:]
    assert calls.read_text().split() == ["requeue", "4242"]
    hpc, last = load(run / "hpc_ckpt_1.ckpt"), load(run / "checkpoints" / "last.ckpt")
    assert hpc["global_step"] == last["global_step"] == 5
    assert hpc["loops"] == last["loops"]
    assert all(torch.equal(v, last["state_dict"][k]) for k, v in hpc["state_dict"].items())


@pytest.mark.slow
def test_ddp_sim_det_resume_from_mid_epoch_checkpoint_is_bit_identical(
    toy_coco_root: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Mask R-CNN's samplers draw from each rank's own torch generator: a mid-epoch resume under 2 gloo
    processes ends bit-identical to the uninterrupted run only if every rank gets its own random states
    back (with rank 0's states on both ranks, every tensor differed)."""
    base = ["experiment=toy_det", f"data.root={toy_coco_root}", "data.num_workers=0", "data.batch_size=1"]
    base += ["data.image_size=96", "trainer=ddp_sim", "trainer.max_steps=4", "+trainer.val_check_interval=2"]
    base += ["trainer.check_val_every_n_epoch=null", "+trainer.limit_val_batches=1", "num_vis=0"]
    base += ["validate=false", "monitor=step", "monitor_mode=min"]
    base += ["task.detector.rpn_post_nms_top_n_test=20", "task.detector.box_detections_per_img=10"]
    every_val = ["+callbacks.every_val._target_=lightning.pytorch.callbacks.ModelCheckpoint"]
    every_val += ["+callbacks.every_val.save_top_k=-1", "+callbacks.every_val.filename='step{step}'"]
    every_val += ["+callbacks.every_val.auto_insert_metric_name=false"]
    straight = tmp_path / "straight"  # 8 images / 2 ranks / batch 1: 4 steps per epoch, step 2 is mid-epoch
    proc = train_py([*base, *every_val, f"hydra.run.dir={straight}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    step2 = straight / "checkpoints" / "step2.ckpt"
    assert load(step2)["rng_states"]["world_size"] == 2
    resumed = tmp_path / "resumed"
    proc = train_py([*base, f"ckpt_path={step2}", f"hydra.run.dir={resumed}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_weights(straight / "checkpoints" / "last.ckpt", resumed / "checkpoints" / "last.ckpt")


def test_per_rank_random_states_refuse_another_world_size_mid_epoch() -> None:
    """A checkpoint holds each rank's states; resuming mid-epoch on another process count is refused
    (the missing ranks' streams cannot continue), at an epoch end rank r takes saved rank r's."""
    from siglip_dense.tasks.base import (
        checkpoint_is_mid_epoch,
        collect_rng_states,
        gather_rng_states,
        rng_states_for_rank,
    )

    torch.manual_seed(3)
    saved = gather_rng_states()  # one process: [this process's states]
    assert saved["world_size"] == 1 and torch.equal(saved["ranks"][0]["torch"], torch.get_rng_state())
    two = {"world_size": 2, "ranks": [saved["ranks"][0], collect_rng_states()]}
    mid = {"loops": {"fit_loop": {"epoch_loop.batch_progress": {"is_last_batch": False}}}}
    end = {"loops": {"fit_loop": {"epoch_loop.batch_progress": {"is_last_batch": True}}}}
    assert checkpoint_is_mid_epoch(mid) and not checkpoint_is_mid_epoch(end)
    with pytest.raises(ValueError, match="random states of 2 process.*this run has 1"):
        rng_states_for_rank(two, mid_epoch=True)
    assert rng_states_for_rank(two, mid_epoch=False) is two["ranks"][0]
    assert rng_states_for_rank(saved["ranks"][0], mid_epoch=True) is saved["ranks"][0]  # older layout


def test_a_spent_sampler_pass_resumes_with_the_next_pass_on_any_world_size() -> None:
    """A position saved after the last sample of a pass (an epoch-end validation's checkpoint) leaves
    nothing of that pass to continue: loading it, also with another number of processes, starts the
    next pass (its own order), while a position inside a pass still needs the same world size."""
    from siglip_dense.data.samplers import ResumableDistributedSampler

    data = list(range(10))
    one = ResumableDistributedSampler(data, seed=3)
    first = [s.index for s in one]
    spent = {**one.state_dict(), "passes": 0, "yielded": len(first)}  # as the loader snapshots it
    two = ResumableDistributedSampler(data, num_replicas=2, rank=1, seed=3)
    two.load_state_dict(spent)
    assert [s.index for s in two] == two.order(0, 1) and two.order(0, 1) != two.order(0, 0)
    inside = {**spent, "yielded": 4}
    with pytest.raises(ValueError, match="1 process.*10 training samples, this run has 2"):
        ResumableDistributedSampler(data, num_replicas=2, seed=3).load_state_dict(inside)
    same = ResumableDistributedSampler(data, seed=3)
    same.load_state_dict(inside)
    assert [s.index for s in same] == first[4:]


def test_positions_saved_after_an_epochs_last_batch_are_not_resumed() -> None:
    """A checkpoint written after an epoch's last batch (here in its validation, the epoch cut short by
    limit_train_batches, so the sampler had samples left) holds no data position to continue: loading it
    drops the loader states (the next epoch starts a fresh pass, on any number of processes), while a
    mid-epoch checkpoint keeps them. Progress counters as Lightning writes them in on_validation_end."""
    from lightning.pytorch.loops.progress import _BatchProgress, _Progress

    from siglip_dense.callbacks import RestoreLoaderStates
    from siglip_dense.data.samplers import ResumableDistributedSampler

    sampler = ResumableDistributedSampler(list(range(24)), seed=0)
    drawn = iter(sampler)
    for _ in range(8):  # 2 batches of 4 of 6: limit_train_batches=2
        next(drawn)
    loader_state = {"_sampler_iter_state": {"sampler_state": sampler.state_dict()}}

    def checkpoint(last_batch: bool) -> dict[str, Any]:
        epochs, batches = _Progress(), _BatchProgress()
        epochs.increment_ready()  # epoch 0 under way
        epochs.increment_started()
        batches.increment_by(2 if last_batch else 1)  # batches ready, started, processed, completed
        batches.is_last_batch = last_batch
        fit = {"state_dict": {"combined_loader": [loader_state]}, "epoch_progress": epochs.state_dict()}
        return {"loops": {"fit_loop": {**fit, "epoch_loop.batch_progress": batches.state_dict()}}}

    for last_batch in (True, False):
        ckpt = checkpoint(last_batch)
        RestoreLoaderStates().on_load_checkpoint(None, None, ckpt)  # type: ignore[arg-type]
        kept = ckpt["loops"]["fit_loop"]["state_dict"].get("combined_loader")
        assert kept == (None if last_batch else [loader_state]), last_batch
