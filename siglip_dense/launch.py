"""Hydra under external launchers (torchrun, SLURM's srun): every rank runs the Hydra app itself.

Lightning's own DDP launcher re-runs ``sys.argv`` for its children with ``hydra.output_subdir`` and
``hydra.job.name`` set per rank. Under torchrun or srun nobody does that, so all ranks would write
``.hydra/`` and append to one ``train.log``. :func:`argv_for_rank` gives ranks > 0 the same
treatment: the config is written by rank 0 only, each rank logs to its own file, and all ranks share
the run directory (``hydra.run.dir`` must then be fixed, see README: Multi-GPU).
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


__all__ = ["argv_for_rank", "external_rank"]
