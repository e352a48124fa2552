"""torchrun / srun launch: every rank runs Hydra; the run directory and ``.hydra/`` stay rank 0's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from siglip_dense.launch import argv_for_rank, argv_resuming_in_run_dir, external_rank, run_dir_of_checkpoint

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize(
    ("env", "rank"),
    [
        ({}, None),  # plain python, or Lightning's own launcher (it sets LOCAL_RANK only)
        ({"LOCAL_RANK": "1"}, None),
        ({"RANK": "0", "WORLD_SIZE": "2"}, 0),  # torchrun
        ({"RANK": "3", "WORLD_SIZE": "4"}, 3),
        ({"SLURM_PROCID": "2", "SLURM_NTASKS": "16"}, 2),  # srun
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, None),  # one task: Lightning launches the rest
    ],
)
def test_external_rank(env: dict[str, str], rank: int | None) -> None:
    assert external_rank(env) == rank


def test_argv_for_rank_keeps_rank0_and_given_keys() -> None:
    argv = ["train.py", "experiment=toy_seg", "hydra.run.dir=/shared/run"]
    assert argv_for_rank(argv, {"RANK": "0"}) == argv
    assert argv_for_rank(argv, {}) == argv
    assert argv_for_rank(argv, {"RANK": "2"}) == [
        *argv,
        "hydra.output_subdir=null",
        "hydra.job.name=train_rank2",
    ]
    given = [*argv, "hydra.job.name=mine"]
    assert argv_for_rank(given, {"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}) == [
        *given,
        "hydra.output_subdir=null",
    ]


def test_resuming_from_a_run_checkpoint_continues_in_its_run_dir(tmp_path: Path) -> None:
    run = tmp_path / "outputs" / "toy_seg" / "runs" / "2026-01-01_00-00-00"
    (run / "checkpoints").mkdir(parents=True)
    (run / "run_info.json").write_text("{}")
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(b"")
    argv = ["train.py", "experiment=toy_seg", f"ckpt_path={last}"]
    assert argv_resuming_in_run_dir(argv) == [*argv, f"hydra.run.dir='{run.resolve()}'"]
    quoted = ["train.py", f"ckpt_path='{last}'"]
    assert argv_resuming_in_run_dir(quoted)[-1] == f"hydra.run.dir='{run.resolve()}'"
    # the user's run dir wins; no checkpoint, a keyword or a checkpoint outside a run: unchanged
    for argv in (
        ["train.py", f"ckpt_path={last}", "hydra.run.dir=/elsewhere"],
        ["train.py", "experiment=toy_seg"],
        ["train.py", "ckpt_path=null"],
        ["train.py", "ckpt_path=last"],
        ["train.py", f"ckpt_path={run / 'checkpoints' / 'missing.ckpt'}"],
    ):
        assert argv_resuming_in_run_dir(argv) == argv
    loose = tmp_path / "downloads" / "checkpoints" / "model.ckpt"  # no run record beside it
    loose.parent.mkdir(parents=True)
    loose.write_bytes(b"")
    assert run_dir_of_checkpoint(loose) is None
    assert run_dir_of_checkpoint(last) == run.resolve()


@pytest.mark.slow
def test_torchrun_two_ranks_share_one_run_directory(tmp_path: Path, toy_data_root: Path) -> None:
    run_dir = tmp_path / "outputs" / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd += ["train.py", "experiment=toy_seg", "trainer=ddp_sim", f"data.root={toy_data_root}"]
    cmd += ["trainer.max_epochs=1", "+trainer.limit_train_batches=2", "data.batch_size=2"]
    cmd += ["data.num_workers=0", "num_vis=0", "validate=false"]
    cmd += [f"hydra.run.dir={run_dir}", f"paths.log_dir={tmp_path / 'outputs'}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=ENV)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "MEMBER: 2/2" in out  # a real 2-process group (Lightning's TorchElastic path)
    assert [p.name for p in (tmp_path / "outputs").iterdir()] == ["run"]
    names = {p.name for p in run_dir.iterdir()}
    assert {".hydra", "config.yaml", "checkpoints", "train.log", "train_rank1.log"} <= names
    assert not any(n.startswith(".pr") for n in names)  # no per-rank config copies
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
