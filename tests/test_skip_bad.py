"""``skip_bad`` (issue 18 fixes): one count per bad file, unbiased training substitutes, evaluation
samples dropped rather than replaced, and a scan that leaves the warning filters alone."""

from __future__ import annotations

import collections
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from siglip_dense.callbacks import SkippedSamples
from siglip_dense.data.base import DenseDataModule
from siglip_dense.data.io import DataError
from siglip_dense.data.scan import run_checks, scan_dataset
from siglip_dense.data.seg_folder import SegFolderDataset
from siglip_dense.data.segmentation import collate_seg_eval, collate_seg_train

NUM, BAD = 100, range(10, 90)  # 80 unreadable images in a row


def seg_folder(root: Path, num: int, bad: range = range(0)) -> Path:
    """A seg_folder split of 8×8 images (value = index) with label maps; ``bad`` images corrupt."""
    for sub in ("images", "annotations"):
        (root / sub / "training").mkdir(parents=True, exist_ok=True)
    for i in range(num):
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(root / "images" / "training" / f"{i:03d}.png")
        Image.fromarray(np.full((8, 8), 1 + i % 3, np.uint8)).save(
            root / "annotations" / "training" / f"{i:03d}.png"
        )
    for i in bad:
        (root / "images" / "training" / f"{i:03d}.png").write_bytes(b"not an image")
    return root


class _Data(DenseDataModule):
    collate_train = staticmethod(collate_seg_train)
    collate_eval = staticmethod(collate_seg_eval)

    def __init__(self, dataset: SegFolderDataset) -> None:
        super().__init__()
        self.train_dataset = dataset
        self.batch_size, self.val_batch_size, self.num_workers, self.seed = 10, 10, 2, 0


class _Probe(L.LightningModule):
    """Records which images each training batch held (the value of its pixels = its index)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[int] = []
        self.validated: list[int] = []

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        self.seen += [int(Path(m["path"]).stem) for m in batch["meta"]]
        return (self.w * batch["image"].mean()) ** 2

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.validated += [int(Path(m["path"]).stem) for m in batch["meta"]]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_run_of_bad_images_counts_each_once_and_substitutes_are_spread(tmp_path: Path) -> None:
    """80 bad images in a row, 2 loader workers: the epoch total is 80 of 100 and the 80 substitutes
    are drawn across the 20 good images (the old "next good one" drew image 90 81 times)."""
    root = seg_folder(tmp_path / "d", NUM, BAD)
    ds = SegFolderDataset(root, "training", num_classes=4, skip_bad=True)
    skips, probe = SkippedSamples(), _Probe()
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, callbacks=[skips],
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(probe, datamodule=_Data(ds))
    total, delivered, files = skips.totals["train"]
    assert (total, delivered) == (80, 100)
    assert files == sorted(str(root / "images" / "training" / f"{i:03d}.png") for i in BAD)
    counts = collections.Counter(probe.seen)
    assert not set(counts) & set(BAD) and sum(counts.values()) == NUM
    # each good image: itself once + Binomial(80, 1/20) substitutes (mean 4; P(> 14) < 1e-4)
    assert max(counts.values()) <= 15, counts.most_common(3)
    assert len(counts) == 20


def test_substitutes_are_reproducible_per_seed(tmp_path: Path) -> None:
    """The substitute of a bad sample depends only on its seed (workers / resume do not change it)."""
    from siglip_dense.data.samplers import PerSampleSeeded, SeededIndex

    root = seg_folder(tmp_path / "d", 12, range(3, 9))
    view = PerSampleSeeded(SegFolderDataset(root, "training", num_classes=4, skip_bad=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = [view[SeededIndex(5, s)]["meta"]["path"] for s in range(20)]
        b = [view[SeededIndex(5, s)]["meta"]["path"] for s in range(20)]
        item = view[SeededIndex(5, 0)]
    assert a == b and len(set(a)) > 1
    assert item["meta"]["skipped"] == [str(root / "images" / "training" / "005.png")]


def test_scan_leaves_the_warning_filters_alone() -> None:
    """Checks that warn, run on 4 threads: afterwards a main-thread warning is still shown (20 scans)."""

    def check() -> None:
        warnings.warn("per-sample", UserWarning, stacklevel=1)

    def bad() -> None:
        raise DataError("bad file x.png")

    for _ in range(20):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            errors = run_checks([check, bad] * 100, workers=4)
            warnings.warn("after the scan", UserWarning, stacklevel=1)
        assert len(errors) == 100
        assert any(str(w.message) == "after the scan" for w in caught)


def test_scan_drops_bad_evaluation_samples_and_names_them(tmp_path: Path) -> None:
    """A fully decoded (evaluation) split loses its bad files from the index, warned about by name."""
    root = seg_folder(tmp_path / "d", 6, range(2, 3))
    ds = SegFolderDataset(root, "training", num_classes=4, skip_bad=True)
    bad = str(root / "images" / "training" / "002.png")
    with pytest.warns(UserWarning, match=r"1 of 6 val samples are unreadable and are left out.*002\.png"):
        assert scan_dataset(ds, "val", decode=True, workers=2) == 1
    assert len(ds) == 5 and ds.dropped_files == [bad]
    assert bad not in {str(s[0]) for s in ds.samples}


@pytest.mark.parametrize("trainer", ["cpu", "gpu", "ddp", "ddp_sim", "fsdp", "multinode"])
def test_every_trainer_config_sets_the_keys_readme_lists(
    trainer: str, tmp_path: Path, hydra_cleanup: None
) -> None:
    """README "Trainer keys": every trainer config defines these (settable without a ``+``)."""
    from tests.conftest import compose_train_cfg

    cfg = compose_train_cfg(["experiment=toy_seg", f"trainer={trainer}"], tmp_path / "run")
    keys = "accelerator devices precision max_epochs max_steps check_val_every_n_epoch log_every_n_steps"
    keys += " gradient_clip_val deterministic num_sanity_val_steps enable_model_summary"
    assert [k for k in keys.split() if k not in cfg.trainer] == []


def test_eval_sample_failing_after_the_scan_is_dropped_and_labelled(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A validation file that fails in the loader is dropped from its batch (batch size 1: an empty
    batch, passed over), counted once; the validation after fit is labelled "after epoch 1"."""
    root = seg_folder(tmp_path / "d", 6, range(2, 3))
    data = _Data(SegFolderDataset(root, "training", num_classes=4, skip_bad=True))
    data.val_dataset = SegFolderDataset(root, "training", num_classes=4, skip_bad=True)
    data.val_batch_size, data.num_workers = 1, 0
    skips, probe = SkippedSamples(), _Probe()
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, callbacks=[skips],
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    with warnings.catch_warnings(), caplog.at_level("WARNING", logger="siglip_dense"):
        warnings.simplefilter("ignore")
        trainer.fit(probe, datamodule=data)
        trainer.validate(probe, datamodule=data, verbose=False)
    assert probe.validated == [0, 1, 3, 4, 5] * 2
    bad = str(root / "images" / "training" / "002.png")
    assert skips.totals["validation"] == (1, 6, [bad])
    lines = [r.getMessage() for r in caplog.records if "samples in validation" in r.getMessage()]
    assert lines == [
        f"skipped 1 of 6 samples in validation (epoch 1; files: {bad})",
        f"skipped 1 of 6 samples in validation (after epoch 1; files: {bad})",
    ]


def test_a_bad_file_in_an_evaluation_run_is_checked_before_evaluation(tmp_path: Path) -> None:
    """``validate`` stage: the error says when the check ran (not "before training")."""
    from types import SimpleNamespace

    from siglip_dense.data.scan import scan_datamodule

    root = seg_folder(tmp_path / "d", 4, range(1, 2))
    dm = SimpleNamespace(train_dataset=None, val_dataset=SegFolderDataset(root, "training"), num_workers=1)
    with pytest.raises(DataError, match=r"001\.png.*checked before evaluation; set data.skip_bad=true"):
        scan_datamodule(dm, "validate")
