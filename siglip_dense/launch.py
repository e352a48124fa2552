"""Command-line preprocessing of ``train.py``: the run directory under external launchers and on resume.

Hydra under external launchers (torchrun, SLURM's srun): every rank runs the Hydra app itself.

Lightning's own DDP launcher re-runs ``sys.argv`` for its children with ``hydra.output_subdir`` and
``hydra.job.name`` set per rank. Under torchrun or srun nobody does that, so all ranks would write
``.hydra/`` and append to one ``train.log``. :func:`argv_for_rank` gives ranks > 0 the same
treatment: the config is written by rank 0 only, each rank logs to its own file, and all ranks share
the run directory (``hydra.run.dir`` must then be fixed, see README: Multi-GPU).

Resuming (``ckpt_path=<run>/checkpoints/last.ckpt``) continues in that run's directory:
:func:`argv_resuming_in_run_dir` adds ``hydra.run.dir=<run>`` unless the command line sets it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def external_rank(env: Mapping[str, str]) -> int | None:
    """This process's global rank when torchrun (``RANK``) or a multi-task srun started it."""
    if env.get("RANK", "").isdigit():
        return int(env["RANK"])
    if env.get("SLURM_PROCID", "").isdigit() and int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        return int(env["SLURM_PROCID"])
    return None


def argv_for_rank(argv: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """``argv`` plus, on ranks > 0, no ``.hydra/`` output and a per-rank log (``train_rank1.log``).

    Keys the command line already sets (as Lightning's launcher does for its children) are kept.
    """
    argv = list(argv)
    rank = external_rank(env)
    if not rank:
        return argv
    given = {a.split("=", 1)[0].lstrip("+~") for a in argv[1:]}
    extra = {
        "hydra.output_subdir": "null",
        "hydra.job.name": f"{Path(argv[0]).stem}_rank{rank}",
    }
    return argv + [f"{k}={v}" for k, v in extra.items() if k not in given]


def _overrides(argv: Sequence[str]) -> dict[str, str]:
    """``key=value`` arguments by key (``+``/``~`` prefixes dropped, surrounding quotes removed)."""
    out = {}
    for arg in argv[1:]:
        if "=" in arg and not arg.startswith("-"):
            key, value = arg.split("=", 1)
            out[key.lstrip("+~")] = value.strip().strip("'\"")
    return out


def run_dir_of_checkpoint(ckpt_path: str | Path) -> Path | None:
    """The run directory of ``<run>/checkpoints/<name>.ckpt`` when that run's record is beside it, else None.

    A run directory holds ``run_info.json`` (written by train.py) or Hydra's ``.hydra/``; a checkpoint
    elsewhere (copied, downloaded) gets a new run directory as usual.
    """
    path = Path(ckpt_path).expanduser()
    run = path.parent.parent
    if path.parent.name != "checkpoints" or not path.is_file():
        return None
    if (run / "run_info.json").is_file() or (run / ".hydra").is_dir():
        return run.resolve()
    return None


def argv_resuming_in_run_dir(argv: Sequence[str]) -> list[str]:
    """``argv`` plus ``hydra.run.dir=<run>`` when it resumes from a run's checkpoint and sets no run dir.

    So a resumed run writes its checkpoints and logs into the directory it was started in (the same
    ``checkpoints/``: Lightning's ModelCheckpoint then restores its best-k state instead of warning
    "The dirpath has changed").
    """
    argv = list(argv)
    given = _overrides(argv)
    if "hydra.run.dir" in given or not given.get("ckpt_path"):
        return argv
    run = run_dir_of_checkpoint(given["ckpt_path"])
    if run is None:
        return argv
    value = str(run) if "'" in str(run) else f"'{run}'"  # quoted: Hydra's grammar reserves some characters
    return [*argv, f"hydra.run.dir={value}"]


__all__ = ["argv_for_rank", "argv_resuming_in_run_dir", "external_rank", "run_dir_of_checkpoint"]
