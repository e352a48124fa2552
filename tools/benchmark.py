"""Benchmarks against the peers (shim: the code lives in ``siglip_dense.benchmark``).

    python tools/benchmark.py backbone --arch so400m16 --img-size 512 --batch-size 8 --dtype bf16
    python tools/benchmark.py data --images 16 --iters 40
    python tools/benchmark.py eval --coco-images 200
    python tools/benchmark.py train-step --batch-size 2

See ``python tools/benchmark.py --help`` and ``docs/benchmarks.md``.
"""

from __future__ import annotations

import sys

from siglip_dense.benchmark.cli import main

if __name__ == "__main__":
    sys.exit(main())
