"""Several tasks' data at once: one named data module per task, for :class:`~siglip_dense.tasks.multitask.MultiTask`.

Training batches are dicts ``{task: batch}`` from Lightning's ``CombinedLoader`` in ``max_size_cycle``
mode (an epoch is the longest task's loader; shorter ones start over). Evaluation gets one loader per
task, in the order of ``datamodules`` (Lightning passes the index as ``dataloader_idx``).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import lightning as L
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from torch.utils.data import DataLoader

from siglip_dense.data.io import DataError


@contextlib.contextmanager
def member_keys(name: str) -> Iterator[None]:
    """Data errors of member ``name`` name its own keys (``data.datamodules.<name>.root``, not ``data.root``)."""
    try:
        yield
    except InstantiationException as exc:
        if isinstance(exc.__cause__, DataError):
            raise DataError(_member_message(name, str(exc.__cause__))) from exc.__cause__
        raise
    except DataError as exc:
        raise DataError(_member_message(name, str(exc))) from exc


def _member_message(name: str, message: str) -> str:
    return re.sub(r"\bdata\.(?!datamodules\.)", f"data.datamodules.{name}.", message)


class MultiTaskDataModule(L.LightningDataModule):
    """Named data modules, one per task: ``{"seg": SegDataModule(...), "depth": DepthDataModule(...)}``.

    ``datamodules`` values are data modules or their configs (dicts with ``_target_``: what Hydra
    composes from the existing ``data`` configs). ``batch_size`` / ``num_workers``, when set, override
    every member's. ``mean`` / ``std`` (train.py sets them to the backbone's) reach every member.
    """

    def __init__(
        self,
        datamodules: Mapping[str, Any],
        batch_size: int | None = None,
        num_workers: int | None = None,
        mode: str = "max_size_cycle",
    ) -> None:
        super().__init__()
        if not datamodules:
            raise ValueError("MultiTaskDataModule needs at least one named data module (datamodules={})")
        self.datamodules: dict[str, L.LightningDataModule] = {}
        for name, dm in datamodules.items():
            if dm is None:
                raise ValueError(f"task {name!r} has no data module config (datamodules.{name} is null)")
            if isinstance(dm, Mapping):
                with member_keys(str(name)):
                    dm = instantiate(dict(dm), _convert_="all")
            if not isinstance(dm, L.LightningDataModule):
                raise TypeError(f"datamodules.{name} is a {type(dm).__name__}, not a LightningDataModule")
            self.datamodules[str(name)] = dm
        for dm in self.datamodules.values():
            if batch_size is not None:
                dm.batch_size = int(batch_size)
            if num_workers is not None:
                dm.num_workers = int(num_workers)
        self.mode = mode

    @property
    def task_names(self) -> list[str]:
        """The tasks in loader order (``val_dataloader()[i]`` belongs to ``task_names[i]``)."""
        return list(self.datamodules)

    # mean / std: train.py assigns the backbone's normalisation before fit; every member needs it
    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(next(iter(self.datamodules.values())).mean)

    @mean.setter
    def mean(self, value: Sequence[float]) -> None:
        for dm in self.datamodules.values():
            dm.mean = tuple(value)

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(next(iter(self.datamodules.values())).std)

    @std.setter
    def std(self, value: Sequence[float]) -> None:
        for dm in self.datamodules.values():
            dm.std = tuple(value)

    def task_kwargs(self) -> dict[str, Any]:
        """Per-task sizes / protocols from each member's data (train.py passes this to the task)."""
        return {
            "tasks_kwargs": {
                name: (dict(dm.task_kwargs()) if hasattr(dm, "task_kwargs") else {})
                for name, dm in self.datamodules.items()
            }
        }

    # -- Lightning hooks ------------------------------------------------------------------------------
    def _attach(self) -> None:
        """Members read the trainer (global rank for seeds and samplers)."""
        for dm in self.datamodules.values():
            dm.trainer = self.trainer

    def prepare_data(self) -> None:
        for dm in self.datamodules.values():
            dm.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        self._attach()
        for name, dm in self.datamodules.items():
            with member_keys(name):
                dm.setup(stage)

    def teardown(self, stage: str | None = None) -> None:
        for dm in self.datamodules.values():
            dm.teardown(stage)

    def train_dataloader(self) -> CombinedLoader:
        self._attach()
        return CombinedLoader(
            {name: dm.train_dataloader() for name, dm in self.datamodules.items()}, mode=self.mode
        )

    def val_dataloader(self) -> list[DataLoader]:
        self._attach()
        return [dm.val_dataloader() for dm in self.datamodules.values()]

    def test_dataloader(self) -> list[DataLoader]:
        self._attach()
        return [dm.test_dataloader() for dm in self.datamodules.values()]

    def predict_dataloader(self) -> list[DataLoader]:
        return self.val_dataloader()


__all__ = ["MultiTaskDataModule"]
