"""Convert any supported SigLIP (2) checkpoint to siglip-dense's format (safetensors + JSON config).

    python tools/convert_weights.py SRC OUT.safetensors [--img-size N]
    python tools/convert_weights.py src=SRC out=OUT.safetensors [img_size=N]   # == siglip-dense-convert

SRC: a transformers ``save_pretrained`` directory, a timm / open_clip / transformers / birder
(``.pt`` or ``.safetensors``) weight file, a big_vision ``.npz`` (fixed-resolution or NaFlex), or a
hub id already in the local Hugging Face cache (nothing is downloaded). The output loads with
``build_backbone(checkpoint=OUT.safetensors)`` without any other file, and keeps the source's
position-table rule (``pos_resample``): transformers, NaFlex and birder tables stay at their own grid.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from siglip_dense.cli import compose_config, hydra_quote, run_convert


def overrides_of(argv: Sequence[str]) -> list[str]:
    """The Hydra overrides of ``argv``: ``key=value`` arguments as given, the positional form translated."""
    if argv and all("=" in a and not a.startswith("-") for a in argv):
        return list(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="checkpoint file, directory, or cached hub id (org/name)")
    parser.add_argument("out", help="output .safetensors path (a .json config is written beside it)")
    parser.add_argument(
        "--img-size",
        type=int,
        default=None,
        help="NaFlex (Siglip2) checkpoints: the square input size to record (the table is kept as is)",
    )
    args = parser.parse_args(argv)
    overrides = [f"src={hydra_quote(args.src)}", f"out={hydra_quote(args.out)}"]
    return overrides + ([f"img_size={args.img_size}"] if args.img_size is not None else [])


def main(argv: Sequence[str] | None = None) -> int:
    """Convert as ``argv`` says (default ``sys.argv[1:]``); returns the exit status (1: unreadable SRC)."""
    return run_convert(compose_config("convert", overrides_of(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
