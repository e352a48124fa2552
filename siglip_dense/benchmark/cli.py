"""Benchmarks against the peers, all measured in one run (machines are noisy: read the ratios).

    python tools/benchmark.py backbone --arch so400m16 --img-size 512 --batch-size 8 --dtype bf16
    python tools/benchmark.py backbone --arch tiny --img-size 224 --batch-size 4      # CPU smoke
    python tools/benchmark.py data --images 16 --iters 40      # augmentation images/s per worker
    python tools/benchmark.py eval --coco-images 200           # COCO eval, sliding window, mIoU update
    python tools/benchmark.py train-step --batch-size 2        # one training step per task and variant

Each measurement prints one JSON line; a summary table with ratios against ours follows.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402

from siglip_dense.benchmark import backbone, data, train_step  # noqa: E402
from siglip_dense.benchmark import eval as eval_bench  # noqa: E402  (a module named for its subcommand)

BENCHMARKS = {m.NAME: m for m in (backbone, data, eval_bench, train_step)}


def build_parser() -> argparse.ArgumentParser:
    """One subcommand per benchmark module, each adding its own arguments plus ``--out``."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="bench", required=True)
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    for name, module in BENCHMARKS.items():
        p = sub.add_parser(name, help=module.HELP)
        module.add_arguments(p, default_device)
        p.add_argument("--out", type=Path, default=None, help="also write the JSON lines here")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one benchmark: JSON lines as measured, then its summary; ``--out`` also saves the lines."""
    args = build_parser().parse_args(argv)
    if getattr(args, "device", "cpu") == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    lines, table = BENCHMARKS[args.bench].run(args)
    print(table)
    if args.out:
        args.out.write_text("".join(line + "\n" for line in lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
