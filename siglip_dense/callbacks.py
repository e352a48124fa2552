"""Callbacks train.py adds: trustworthy resumes (last.ckpt, loader positions, SLURM pre-emption), one
total of skipped samples per split and epoch, and plain-text progress lines for batch jobs.

Lightning 2.6's ``ModelCheckpoint(save_top_k=k, monitor=..., save_last=True)`` rewrites ``last.ckpt``
only when a top-k save happens at the same step, so a run whose metric stops improving leaves
``last.ckpt`` at its best step, and the steps after the last validation are never saved.
:class:`LastCheckpoint` is a second, metric-free checkpoint callback beside the best-k one.
:class:`RestoreLoaderStates` puts the training loaders at the checkpoint's position where Lightning
misses it; :class:`GracefulRequeue` moves Lightning's SLURM requeue to a batch boundary.
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.utilities.data import _set_sampler_epoch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loops.progress import (
    _BatchProgress,
    _OptimizationProgress,
    _Progress,
    _SchedulerProgress,
)
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger("siglip_dense")


class LastCheckpoint(ModelCheckpoint):
    """Writes ``<dirpath>/last.ckpt`` after every validation and epoch, at the end of training and on SIGTERM.

    Each write replaces the file atomically (a temporary file renamed over it), so a run killed
    while writing keeps the previous ``last.ckpt``. On SIGTERM Lightning stops at the next batch
    boundary (``SIGTERMException``); the state saved there resumes exactly. Other exceptions may
    leave a step half done and save nothing. List it after the best-k ``ModelCheckpoint`` (Lightning
    keeps the order of checkpoint callbacks), so the saved file carries that callback's updated state.
    """

    def __init__(self, dirpath: str | Path | None = None) -> None:
        super().__init__(
            dirpath=dirpath, monitor=None, save_top_k=0, save_last=True, enable_version_counter=False
        )

    def save_now(self, trainer: L.Trainer) -> None:
        """Save ``last.ckpt`` unless this step was saved already, or outside ``fit``."""
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save_now(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save_now(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save_now(trainer)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, SIGTERMException):
            self.save_now(trainer)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        if "://" in str(filepath):  # remote file systems: Lightning's own write
            super()._save_checkpoint(trainer, filepath)
            return
        tmp = f"{filepath}.tmp"
        super()._save_checkpoint(trainer, tmp)  # every rank takes part; rank 0 writes
        if trainer.is_global_zero:
            os.replace(tmp, filepath)
        trainer.strategy.barrier("LastCheckpoint")
        self._last_checkpoint_saved = filepath

    def state_dict(self) -> dict[str, Any]:
        return {"dirpath": self.dirpath, "last_model_path": self.last_model_path}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("dirpath") == self.dirpath:
            self.last_model_path = state_dict.get("last_model_path", self.last_model_path)


def at_epoch_boundary(fit_loop: dict[str, Any]) -> bool:
    """Whether a saved fit-loop state lies between two epochs: the epoch's last batch trained and its
    end reached (a checkpoint written in ``on_train_epoch_end``, or by a stop right after it)."""
    epochs = fit_loop.get("epoch_progress", {}).get("current", {})
    ready, started, processed = (int(epochs.get(k, 0)) for k in ("ready", "started", "processed"))
    last_batch = bool(fit_loop.get("epoch_loop.batch_progress", {}).get("is_last_batch", False))
    return last_batch and 0 < processed == started == ready


def start_next_epoch(checkpoint: dict[str, Any]) -> bool:
    """Rewrite a checkpoint saved between two epochs as the start of the next one; True if it was.

    Lightning 2.6 restores such a state (``on_train_epoch_end``: epoch processed, not yet completed)
    as "restarted on epoch end" when training by ``max_steps``: it runs one more batch in the
    finished epoch, then counts that epoch a second time, so the next epoch's sampler gets epoch
    ``e + 2`` and every later batch holds other images. The state is rewritten as Lightning's own
    counters stand when a new epoch begins (``_TrainingEpochLoop.reset`` outside a restart): the
    epoch completed, the batch, scheduler and optimizer counters of the epoch and the validation
    batch total reset. The next epoch starts a fresh pass (:class:`RestoreLoaderStates` drops the
    spent loader positions and gives the samplers the epoch's number).
    """
    fit = checkpoint.get("loops", {}).get("fit_loop")
    if not isinstance(fit, dict) or not at_epoch_boundary(fit):
        return False
    epochs = _Progress()
    epochs.load_state_dict(fit["epoch_progress"])
    epochs.total.completed, epochs.current.completed = epochs.total.processed, epochs.current.processed
    fit["epoch_progress"] = epochs.state_dict()
    fresh: dict[str, Any] = {
        "epoch_loop.batch_progress": _BatchProgress(),
        "epoch_loop.scheduler_progress": _SchedulerProgress(),
        "epoch_loop.automatic_optimization.optim_progress": _OptimizationProgress(),
    }
    for key, progress in fresh.items():
        if key in fit:
            progress.load_state_dict(fit[key])
            progress.reset_on_run()
            fit[key] = progress.state_dict()
    if "epoch_loop.val_loop.batch_progress" in fit:
        val = _BatchProgress()
        val.load_state_dict(fit["epoch_loop.val_loop.batch_progress"])
        val.total.reset()
        fit["epoch_loop.val_loop.batch_progress"] = val.state_dict()
    return True


def drop_spent_loader_states(checkpoint: dict[str, Any]) -> bool:
    """Remove the loader positions of a checkpoint written after its epoch's last batch; True if so.

    Nothing of that epoch's data is left to continue (also when ``limit_train_batches`` ended the
    epoch before the loader did), so the next batches come from a fresh pass of the next epoch, on
    any number of processes.
    """
    fit = checkpoint.get("loops", {}).get("fit_loop")
    if not isinstance(fit, dict) or not fit.get("epoch_loop.batch_progress", {}).get("is_last_batch"):
        return False
    states = fit.get("state_dict")
    return isinstance(states, dict) and states.pop("combined_loader", None) is not None


class RestoreLoaderStates(L.Callback):
    """Puts the training loaders where a resumed fit must start; Lightning misses it in three cases.

    1. A task whose ``configure_optimizers`` reads ``trainer.estimated_stepping_batches`` (our
       schedules do) makes Lightning build and iterate the train loader before the checkpoint is
       restored; its later ``setup_data`` returns early, so the stateful loaders' states in the
       checkpoint are never loaded (Lightning issue #20550) and a mid-epoch resume would restart the
       epoch's data. Here the pending states are loaded.
    2. A checkpoint written after an epoch's last batch holds spent loader positions, dropped when
       it is loaded (:func:`drop_spent_loader_states`; one written between two epochs is also
       resumed as the next epoch's start, :func:`start_next_epoch`, since Lightning's own restore of
       it repeats a batch and skips an epoch): the samplers get the number of the epoch to run.
    3. Lightning loads no loader state when the saved epoch had finished (early stopping), and
       keeps the iterator it built before the restore, whose workers drew indices with the
       sampler's initial epoch: here the samplers get the epoch about to run.

    In each case the batch iterator is then re-created, at ``on_train_start`` (after the restore,
    before the first batch), as Lightning's own resume path does. Fresh runs: nothing to do.
    """

    def __init__(self) -> None:
        self._loader_states = False  # whether the checkpoint being resumed holds loader positions
        self._epoch_start = False  # whether it was rewritten as the start of an epoch

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        drop_spent_loader_states(checkpoint)  # before Lightning restores the loops from it
        self._epoch_start = start_next_epoch(checkpoint)
        fit = checkpoint.get("loops", {}).get("fit_loop", {})
        self._loader_states = bool(fit.get("state_dict", {}).get("combined_loader"))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loop = trainer.fit_loop
        if not loop.is_resuming or loop._data_fetcher is None or loop._combined_loader is None:
            return
        if self._epoch_start:
            # nothing of this epoch ran: its loop starts as in an uninterrupted run (training by
            # max_steps Lightning restarts it, and a restarted epoch loop after an epoch-end
            # validation runs an empty first iteration that shifts the logging step by one)
            loop.epoch_loop.restarting = False
        if loop.restarting and loop._combined_loader_states_to_load:
            loop._load_combined_loader_states()
        elif loop.restarting and self._loader_states:
            return  # Lightning loaded the positions before building the iterator
        else:
            for loader in loop._combined_loader.flattened:
                _set_sampler_epoch(loader, loop.epoch_progress.current.processed)
        iter(loop._data_fetcher)


class GracefulRequeue(L.Callback):
    """SLURM pre-emption: Lightning's requeue, moved from inside the signal handler to a batch boundary.

    With Lightning's ``SLURMEnvironment(auto_requeue=True)`` (detected under ``sbatch``/``srun``), the
    requeue signal (SIGUSR1 unless configured, ``#SBATCH --signal=SIGUSR1@90``) makes Lightning save
    ``hpc_ckpt_<n>.ckpt`` in the run directory and ``scontrol requeue`` the job, from inside the
    signal handler, i.e. mid-step. This callback replaces that handler (at ``on_train_start``, after
    Lightning installed it) with one that only asks the loop to stop, the way SIGTERM does. At the
    batch boundary (``on_exception`` with ``SIGTERMException``) it brings ``last.ckpt`` up to date
    (:class:`LastCheckpoint`), copies it as ``hpc_ckpt_<n>.ckpt`` (which a requeued job in the same
    run directory resumes from by itself) and requeues the job as Lightning's handler does. A state
    Lightning would dump there after a validation restores with the logging step one ahead (it reads
    as written in ``on_validation_end``); ``last.ckpt`` holds that validation's own state. Without a
    local ``last.ckpt``, Lightning's handler runs. :attr:`signum` records the signal.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._requeue: Any = None
        self._trainer: L.Trainer | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        env = trainer._accelerator_connector.cluster_environment
        if not (isinstance(env, SLURMEnvironment) and env.auto_requeue and env.requeue_signal is not None):
            return
        if threading.current_thread() is not threading.main_thread():
            return
        self._trainer, self._requeue = trainer, signal.getsignal(env.requeue_signal)
        if callable(self._requeue):
            signal.signal(env.requeue_signal, self._defer)

    def _defer(self, signum: int, frame: Any) -> None:
        self.signum = int(signum)
        assert self._trainer is not None
        self._trainer._signal_connector.received_sigterm = True  # stop at the next batch boundary

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if self.signum is None or not isinstance(exception, SIGTERMException) or not callable(self._requeue):
            return
        last = next((cb for cb in trainer.checkpoint_callbacks if isinstance(cb, LastCheckpoint)), None)
        if last is not None:
            last.save_now(trainer)  # every rank takes part; nothing new if this step is saved already
        source = str(last.last_model_path) if last is not None else ""
        if not source or "://" in source:
            self._requeue(self.signum, None)  # Lightning: its own hpc_ckpt_<n>.ckpt + scontrol requeue
            return
        if trainer.is_global_zero:
            hpc = Path(trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir))
            partial = hpc.parent / f".requeue-{os.getpid()}.partial"
            shutil.copyfile(source, partial)
            os.replace(partial, hpc)
            log.info(f"saved {hpc} (= {source})")
            requeue_slurm_job()


def requeue_slurm_job() -> int:
    """``scontrol requeue <job>`` for this SLURM job (an array task as ``<array job>_<task>``), as
    Lightning's requeue handler does; returns scontrol's exit status (a failure is logged)."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
    status = subprocess.call(["scontrol", "requeue", job])
    if status == 0:
        log.info(f"requeued SLURM job {job}")
    else:
        log.warning(f"scontrol requeue {job} failed with exit status {status}")
    return status


def batch_metas(batch: Any) -> Iterator[dict[str, Any]]:
    """The per-sample ``meta`` dicts of a batch: ``{"meta": [...]}`` or ``{task: {"meta": [...]}}``."""
    if not isinstance(batch, dict):
        return
    metas = batch.get("meta")
    if isinstance(metas, (list, tuple)):
        yield from (m for m in metas if isinstance(m, dict))
        return
    for value in batch.values():
        yield from batch_metas(value)


def gather_objects(trainer: L.Trainer, obj: Any) -> list[Any]:
    """``obj`` of every rank (a list of one outside a process group); every rank must call it."""
    dist = torch.distributed
    if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def scan_dropped(trainer: L.Trainer) -> list[str]:
    """Files the pre-run scan left out of the validation split (``skip_bad``; data.skip.drop_samples)."""
    dm = getattr(trainer, "datamodule", None)
    members = list((getattr(dm, "datamodules", None) or {}).values()) or [dm]  # multi-task: each task's
    datasets = [getattr(m, "val_dataset", None) for m in members]
    return [f for d in datasets for f in (getattr(d, "dropped_files", None) or ())]


def _when(trainer: L.Trainer) -> str:
    """``epoch N`` while fitting; a validation after fit (``current_epoch`` is then max_epochs) is
    ``after epoch N``, an evaluation of a fresh trainer ``evaluation``."""
    if trainer.state.fn == TrainerFn.FITTING:
        return f"epoch {trainer.current_epoch + 1}"
    return f"after epoch {trainer.current_epoch}" if trainer.current_epoch else "evaluation"


class SkippedSamples(L.Callback):
    """One total of skipped samples per split and epoch, across loader workers and DDP ranks.

    Datasets with ``skip_bad`` replace a bad training sample by a seeded random substitute, and drop
    a bad evaluation sample from its batch, naming the bad file in a kept item's ``meta["skipped"]``
    (:mod:`siglip_dense.data.skip`); collate keeps the metas, so the files come back from every
    worker with the batches. At the end of each training / validation epoch the per-rank lists are
    gathered and, if any sample was skipped, rank 0 logs one line
    ``skipped N of M samples in <split> (files: ...)``: N unique bad files (validation: with those the
    scan left out of the index), M the samples of the split (delivered, plus validation's left out).
    :attr:`totals` keeps ``split -> (N, M, sorted unique files)`` of the last epoch on every rank.
    """

    def __init__(self, max_files_shown: int = 10) -> None:
        self.max_files_shown = int(max_files_shown)
        self._files: dict[str, list[str]] = {}
        self._seen: dict[str, int] = {}
        self.totals: dict[str, tuple[int, int, list[str]]] = {}

    def _record(self, split: str, batch: Any) -> None:
        if isinstance(batch, dict) and batch.get("skipped"):  # an evaluation batch left empty
            self._files.setdefault(split, []).extend(batch["skipped"])
        for meta in batch_metas(batch):
            self._seen[split] = self._seen.get(split, 0) + 1
            self._files.setdefault(split, []).extend(meta.get("skipped") or ())

    def _report(self, trainer: L.Trainer, split: str, dropped: list[str] | None = None) -> None:
        local = (self._files.pop(split, []), self._seen.pop(split, 0))
        parts = gather_objects(trainer, local)
        unique = sorted({f for fs, _ in parts for f in fs} | set(dropped or ()))
        delivered = sum(n for _, n in parts)
        # evaluation leaves skipped samples out (training delivers a substitute for each)
        total = (len(unique), delivered + len(unique) if dropped is not None else delivered, unique)
        self.totals[split] = total
        if total[0] and trainer.is_global_zero:
            shown = total[2][: self.max_files_shown]
            more = f", ... (+{len(total[2]) - len(shown)})" if len(total[2]) > len(shown) else ""
            log.warning(
                f"skipped {total[0]} of {total[1]} samples in {split} "
                f"({_when(trainer)}; files: {', '.join(shown)}{more})"
            )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._record("train", batch)

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not trainer.sanity_checking:
            self._record("validation", batch)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, "train")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._report(trainer, "validation", scan_dropped(trainer))


def _batch_size(batch: Any) -> int:
    """Images in a training batch (multi-task: summed over the tasks' batches)."""
    if not isinstance(batch, dict):
        return 0
    return sum(1 for _ in batch_metas(batch)) or len(batch.get("image", ()))


class ProgressLog(L.Callback):
    """Plain-text progress lines for a batch job (stdout is not a terminal), on rank 0.

    Every ``every_n_steps`` optimizer steps (default: the trainer's ``log_every_n_steps``) and at the
    end of each epoch, one line through the ``siglip_dense`` logger, which Hydra writes to the run's
    ``train.log`` and to stdout::

        epoch 1/12 step 20/96 loss 0.8123 lr 1.00e-03 41.2 img/s ETA 0:00:45

    ``loss`` is the training step's returned loss on rank 0 (read from the device only on those
    steps), ``lr`` the largest learning rate of the optimizer's groups (layer decay lowers the
    others), ``img/s`` the images of all ranks per second since the previous line, and ETA the
    remaining steps at the average step time of this run.
    """

    def __init__(self, every_n_steps: int | None = None) -> None:
        self.every_n_steps = every_n_steps
        self._start: tuple[float, int] = (0.0, 0)
        self._mark: tuple[float, int] = (0.0, 0)
        self._images = 0
        self._last_step = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        now = time.monotonic()
        self._start = self._mark = (now, trainer.global_step)
        self._images, self._last_step = 0, -1

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._images += _batch_size(batch)
        every = max(1, int(self.every_n_steps or trainer.log_every_n_steps or 1))
        step = trainer.global_step
        if step != self._last_step and (step % every == 0 or trainer.is_last_batch):
            self._emit(trainer, outputs)

    def _emit(self, trainer: L.Trainer, outputs: Any) -> None:
        step, now = trainer.global_step, time.monotonic()
        self._last_step = step
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        rate = self._images * trainer.world_size / max(now - self._mark[0], 1e-9)
        self._mark, self._images = (now, step), 0
        if not trainer.is_global_zero:
            return
        total = trainer.estimated_stepping_batches
        done = step - self._start[1]
        eta = "?"
        if done > 0 and total not in (None, float("inf")):
            left = max(0.0, (now - self._start[0]) / done * (int(total) - step))
            eta = str(datetime.timedelta(seconds=round(left)))
        lrs = [g["lr"] for opt in trainer.optimizers for g in opt.param_groups]
        loss_text = f"{float(loss):.4f}" if loss is not None else "n/a"
        max_epochs = trainer.max_epochs if trainer.max_epochs not in (None, -1) else "?"
        log.info(
            f"epoch {trainer.current_epoch + 1}/{max_epochs} step {step}/{total} loss {loss_text} "
            f"lr {max(lrs) if lrs else float('nan'):.2e} {rate:.1f} img/s ETA {eta}"
        )


__all__ = [
    "GracefulRequeue",
    "LastCheckpoint",
    "ProgressLog",
    "RestoreLoaderStates",
    "SkippedSamples",
    "at_epoch_boundary",
    "batch_metas",
    "drop_spent_loader_states",
    "requeue_slurm_job",
    "start_next_epoch",
]
