"""What a batch job's logs say: progress lines in train.log, one total of skipped samples per split
(across loader workers and DDP ranks), no Lightning sync warnings under DDP, and data errors as one
clear line naming the file (the full traceback only with HYDRA_FULL_ERROR=1). COCO's skip_bad. A
warmup as long as the run, before its first step."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from siglip_dense.cli import data_error_message
from siglip_dense.data.coco import CocoDetection
from siglip_dense.data.io import DataError
from siglip_dense.data.samplers import PerSampleSeeded, SeededIndex
from siglip_dense.data.seg_folder import SegFolderDataset
from siglip_dense.data.segmentation import collate_seg_eval
from siglip_dense.data.toy import ensure_toy_data
from siglip_dense.data.transforms import build_det_eval_transform
from siglip_dense.tasks.optim import warmup_schedule
from tests.conftest import REPO

ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
PROGRESS = re.compile(
    r"epoch \d+/\d+ step \d+/\d+ loss \d+\.\d+ lr \d\.\d\de[+-]\d+ \d+\.\d img/s ETA (\d+:\d\d:\d\d|\?)"
)
# a traceback frame inside Lightning or torch's DataLoader
FRAME = re.compile(r'^\s*File ".*(lightning/pytorch|torch/utils/data)')
BAD = (1, 5)  # training images made unreadable


@pytest.fixture(scope="module")
def bad_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Toy ADE20K-layout data (8 training images) with two training images that do not decode."""
    root = ensure_toy_data(tmp_path_factory.mktemp("bad") / "toy_seg", num_train=8, num_val=4, seed=3)
    images = sorted((root / "images" / "training").iterdir())
    for i in BAD:
        images[i].write_bytes(b"not an image")
    return root


def bad_files(root: Path) -> list[str]:
    images = sorted((root / "images" / "training").iterdir())
    return sorted(str(images[i]) for i in BAD)


def train_cmd(root: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "train.py",
        "experiment=toy_seg",
        f"data.root={root}",
        "trainer.max_epochs=1",
        "data.batch_size=2",
        "num_vis=0",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


def test_data_error_message_from_a_loader_worker(bad_root: Path) -> None:
    """A DataError raised in a worker reaches the main process wrapped in the worker's traceback;
    the message we report is the one the dataset raised."""
    ds = SegFolderDataset(bad_root, "training", num_classes=8)
    with pytest.raises(DataError) as direct:
        ds[BAD[0]]
    loader = DataLoader(ds, batch_size=1, num_workers=1, collate_fn=collate_seg_eval)
    with pytest.raises(DataError) as from_worker:
        for _ in loader:
            pass
    assert "Original Traceback" in str(from_worker.value)  # torch's wrapping, which we unwrap
    assert data_error_message(from_worker.value) == str(direct.value)
    assert data_error_message(ValueError("x")) is None


def test_coco_skip_bad_skips_counts_and_names_the_file(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    (root / "train2017").mkdir(parents=True)
    images = []
    for i in (1, 2, 3):
        Image.fromarray(np.full((32, 40, 3), 40 * i, np.uint8)).save(root / "train2017" / f"{i:012d}.jpg")
        images.append({"id": i, "file_name": f"{i:012d}.jpg", "height": 32, "width": 40})
    (root / "train2017" / "000000000002.jpg").write_bytes(b"truncated")
    anns = [{"id": i, "image_id": i, "category_id": 1, "bbox": [2, 2, 10, 10]} for i in (1, 2, 3)]
    ann = root / "instances.json"
    ann.write_text(
        json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}]})
    )
    transform = build_det_eval_transform((0.5,) * 3, (0.5,) * 3)
    strict = CocoDetection(root / "train2017", ann, transform=transform)
    with pytest.raises(DataError, match="000000000002.jpg"):
        strict[1]
    lenient = CocoDetection(root / "train2017", ann, transform=transform, skip_bad=True)
    with pytest.warns(UserWarning, match=r"skipped bad sample \(1 so far.*000000000002\.jpg"):
        item = PerSampleSeeded(lenient)[SeededIndex(1, 0)]  # training: a seeded substitute
    assert item["meta"]["image_id"] in (1, 3) and lenient.num_skipped == 1
    assert item["meta"]["skipped"] == [str(root / "train2017" / "000000000002.jpg")]
    assert "skipped" not in lenient[0]["meta"]


@pytest.mark.slow
def test_ddp_sim_batch_job_logs(bad_root: Path, tmp_path: Path) -> None:
    """Redirected ``trainer=ddp_sim`` run with 2 loader workers per rank: train.log has progress
    lines, one total of skipped samples equal to the bad files, and stderr no sync_dist warning."""
    run_dir = tmp_path / "run"
    cmd = train_cmd(bad_root, run_dir, "trainer=ddp_sim", "data.num_workers=2", "data.skip_bad=true")
    cmd.append("trainer.log_every_n_steps=1")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (run_dir / "train.log").read_text()
    progress = [line for line in log.splitlines() if PROGRESS.search(line)]
    assert len(progress) == 2, log  # 8 images / 2 ranks / batch 2 = 2 steps, a line each
    assert "step 2/2" in progress[-1] and "ETA 0:00:00" in progress[-1]
    totals = [line for line in log.splitlines() if "skipped" in line and "samples in" in line]
    assert len(totals) == 1, log  # rank 0 only, once per split and epoch
    assert f"skipped {len(BAD)} of 8 samples in train" in totals[0]
    assert all(f in totals[0] for f in bad_files(bad_root))
    assert "sync_dist" not in proc.stderr
    assert PROGRESS.search(proc.stdout)  # stdout too


@pytest.mark.slow
@pytest.mark.parametrize("full_error", [False, True])
def test_data_error_is_one_line_naming_the_file(bad_root: Path, tmp_path: Path, full_error: bool) -> None:
    """A corrupt training image (read in a loader worker, no scan): exit status 1, the first error
    line on stderr names the file; Lightning / DataLoader frames only with HYDRA_FULL_ERROR=1."""
    cmd = train_cmd(bad_root, tmp_path / "run", "data.num_workers=2", "data.scan=false")
    env = (
        {**ENV, "HYDRA_FULL_ERROR": "1"}
        if full_error
        else {k: v for k, v in ENV.items() if k != "HYDRA_FULL_ERROR"}
    )
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 1 if not full_error else proc.returncode != 0
    frames = [line for line in proc.stderr.splitlines() if FRAME.match(line)]
    if full_error:
        assert "Traceback" in proc.stderr and frames, proc.stderr[-3000:]
        return
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors and errors[0].startswith("error: cannot decode image "), proc.stderr[-3000:]
    assert any(f in errors[0] for f in bad_files(bad_root)), errors[0]
    assert "Traceback" not in proc.stderr and not frames, proc.stderr[-3000:]
    assert errors[0][len("error: ") :] in (tmp_path / "run" / "train.log").read_text()


def test_one_skip_total_over_two_workers_and_progress_lines(
    bad_root: Path, tmp_path: Path, hydra_cleanup: None, caplog: pytest.LogCaptureFixture
) -> None:
    """In one process with 2 loader workers (each counts its own skips): one total per epoch equal to
    the bad files, and with progress=log a line per step with every field."""
    from siglip_dense.train import run_train
    from tests.conftest import compose_train_cfg

    overrides = ["experiment=toy_seg", f"data.root={bad_root}", "data.num_workers=2", "data.skip_bad=true"]
    overrides += ["trainer.max_epochs=1", "data.batch_size=2", "validate=false", "num_vis=0"]
    overrides += ["progress=log", "progress_every_n_steps=1", "trainer.check_val_every_n_epoch=2"]
    cfg = compose_train_cfg(overrides, tmp_path / "run")
    with caplog.at_level("INFO", logger="siglip_dense"):
        run_train(cfg)
    lines = [r.getMessage() for r in caplog.records if r.name == "siglip_dense"]
    totals = [line for line in lines if "samples in" in line]
    assert totals == [f"skipped 2 of 8 samples in train (epoch 1; files: {', '.join(bad_files(bad_root))})"]
    progress = [line for line in lines if PROGRESS.search(line)]
    assert [line.split(" loss")[0] for line in progress] == [f"epoch 1/1 step {s}/4" for s in range(1, 5)]


@pytest.mark.parametrize(
    ("total", "warmup", "ratio", "warned"),
    [
        (30, 30, None, True),
        (30, 45, None, True),
        (20, None, 1.0, True),
        (31, 30, None, False),
        (30, 0, None, False),
    ],
)
def test_warmup_as_long_as_the_run_is_warned_naming_both_numbers(
    total: int, warmup: int | None, ratio: float | None, warned: bool, recwarn: pytest.WarningsRecorder
) -> None:
    """toy_det on a 30-step run with warmup_steps=30 raised the learning rate for the whole run, silently.
    The schedule is built in configure_optimizers, before step 1: the warning names both step counts."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    kwargs = {"warmup_steps": warmup} if ratio is None else {"warmup_ratio": ratio}
    warmup_schedule(optimizer, total_steps=total, **kwargs)
    messages = [str(w.message) for w in recwarn if "warmup" in str(w.message)]
    if not warned:
        assert not messages
        return
    steps = warmup if ratio is None else int(ratio * total)
    assert len(messages) == 1 and f"warmup of {steps} steps" in messages[0], messages
    assert f"run's {total} optimizer steps" in messages[0]
