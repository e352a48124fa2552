"""Write the synthetic toy scenes in a real dataset layout (ADE20K, COCO instances or NYUv2).

Usage: python tools/make_toy_data.py OUT_DIR [--layout ade20k|coco|nyu] [--num-train N] [--num-val N] [--seed S]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from siglip_dense.data.toy import (
    DEFAULT_NUM_TRAIN,
    DEFAULT_NUM_VAL,
    LAYOUT_WRITERS,
    ensure_toy_data,
)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="dataset root to create")
    parser.add_argument("--layout", choices=sorted(LAYOUT_WRITERS), default="ade20k")
    parser.add_argument("--num-train", type=int, default=DEFAULT_NUM_TRAIN)
    parser.add_argument("--num-val", type=int, default=DEFAULT_NUM_VAL)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    root = ensure_toy_data(
        args.out_dir, num_train=args.num_train, num_val=args.num_val, seed=args.seed, layout=args.layout
    )
    print(
        f"toy {args.layout} layout at {root}: {args.num_train} train / {args.num_val} val images "
        f"({time.perf_counter() - start:.1f} s)"
    )
    return root


if __name__ == "__main__":
    main()
