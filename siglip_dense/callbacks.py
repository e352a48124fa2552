"""Callbacks train.py adds for trustworthy resumes: last.ckpt, loader positions, SLURM pre-emption.

Lightning 2.6's ``ModelCheckpoint(save_top_k=k, monitor=..., save_last=True)`` rewrites ``last.ckpt``
only when a top-k save happens at the same step, so a run whose metric stops improving leaves
``last.ckpt`` at its best step, and the steps after the last validation are never saved.
:class:`LastCheckpoint` is a second, metric-free checkpoint callback beside the best-k one.
:class:`RestoreLoaderStates` puts the training loaders at the checkpoint's position where Lightning
misses it; :class:`GracefulRequeue` moves Lightning's SLURM requeue to a batch boundary.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.utilities.data import _set_sampler_epoch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException


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


class RestoreLoaderStates(L.Callback):
    """Puts the training loaders where a resumed fit must start; Lightning misses it in two cases.

    1. A task whose ``configure_optimizers`` reads ``trainer.estimated_stepping_batches`` (our
       schedules do) makes Lightning build and iterate the train loader before the checkpoint is
       restored; its later ``setup_data`` returns early, so the stateful loaders' states in the
       checkpoint are never loaded (Lightning issue #20550) and a mid-epoch resume would restart the
       epoch's data. Here the pending states are loaded.
    2. Resuming from a checkpoint written at ``on_train_epoch_end`` (no validation at that epoch's
       end), Lightning loads no loader state and keeps that early iterator, whose workers already
       drew indices with the sampler's initial epoch. Here the samplers get the epoch about to run.

    In both cases the batch iterator is then re-created, at ``on_train_start`` (after the restore,
    before the first batch), as Lightning's own resume path does. Fresh runs: nothing to do.
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loop = trainer.fit_loop
        if not loop.is_resuming or loop._data_fetcher is None or loop._combined_loader is None:
            return
        if loop.restarting and loop._combined_loader_states_to_load:
            loop._load_combined_loader_states()
        elif not loop.restarting:
            for loader in loop._combined_loader.flattened:
                _set_sampler_epoch(loader, loop.epoch_progress.current.processed)
        else:
            return
        iter(loop._data_fetcher)


class GracefulRequeue(L.Callback):
    """SLURM pre-emption: Lightning's requeue, moved from inside the signal handler to a batch boundary.

    With Lightning's ``SLURMEnvironment(auto_requeue=True)`` (detected under ``sbatch``/``srun``), the
    requeue signal (SIGUSR1 unless configured, ``#SBATCH --signal=SIGUSR1@90``) makes Lightning save
    ``hpc_ckpt_<n>.ckpt`` in the run directory and ``scontrol requeue`` the job, from inside the
    signal handler, i.e. mid-step. This callback replaces that handler (at ``on_train_start``, after
    Lightning installed it) with one that only asks the loop to stop, the way SIGTERM does; at the
    batch boundary (``on_exception`` with ``SIGTERMException``) it runs Lightning's handler, so the
    HPC checkpoint (which a requeued job in the same run directory resumes from by itself) and
    ``last.ckpt`` hold the same exactly resumable state. :attr:`signum` records the signal.
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
        if self.signum is not None and isinstance(exception, SIGTERMException) and callable(self._requeue):
            self._requeue(self.signum, None)  # Lightning: hpc_ckpt_<n>.ckpt + scontrol requeue


__all__ = ["GracefulRequeue", "LastCheckpoint", "RestoreLoaderStates"]
