"""Convert any supported SigLIP (2) checkpoint to siglip-dense's format (safetensors + JSON config).

    python tools/convert_weights.py SRC OUT.safetensors [--img-size N]

SRC: a transformers ``save_pretrained`` directory, a timm / open_clip / transformers / birder
(``.pt`` or ``.safetensors``) weight file, a big_vision ``.npz`` (fixed-resolution or NaFlex), or a
hub id already in the local Hugging Face cache (nothing is downloaded). The output loads with
``build_backbone(checkpoint=OUT.safetensors)`` without any other file, and keeps the source's
position-table rule (``pos_resample``): transformers, NaFlex and birder tables stay at their own grid.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from siglip_dense.models.backbone import match_timm_arch  # noqa: E402
from siglip_dense.models.weights import CheckpointError, read_checkpoint, save_checkpoint  # noqa: E402


def _first(keys: list[str], n: int = 5) -> str:
    more = f", ... (+{len(keys) - n})" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="checkpoint file, directory, or cached hub id (org/name)")
    parser.add_argument(
        "out", type=Path, help="output .safetensors path (a .json config is written beside it)"
    )
    parser.add_argument(
        "--img-size",
        type=int,
        default=None,
        help="NaFlex (Siglip2) checkpoints: the square input size to record (the table is kept as is)",
    )
    args = parser.parse_args(argv)
    if args.out.suffix != ".safetensors":
        parser.error(f"OUT must end in .safetensors, got {args.out}")
    try:
        loaded = read_checkpoint(args.src, img_size=args.img_size)
        loaded.arch.arch = loaded.arch.arch or match_timm_arch(loaded.arch)
        save_checkpoint(args.out, loaded.state_dict, loaded.arch)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    a = loaded.arch
    print(f"read {loaded.path} ({loaded.source_format}): {len(loaded.state_dict)} tensors")
    print(
        f"arch {a.arch or 'custom'}: embed_dim={a.embed_dim} depth={a.depth} heads={a.num_heads} "
        f"mlp={a.mlp_dim} patch={a.patch_size} img_size={tuple(a.img_size)} eps={a.norm_eps} "
        f"act={a.act_layer} head={a.has_head} pos_resample={a.pos_resample}"
    )
    if loaded.guessed:
        print(f"guessed (not in the checkpoint): {', '.join(sorted(loaded.guessed))}")
    if loaded.dropped_keys:
        print(f"dropped {len(loaded.dropped_keys)} non-vision keys: {_first(loaded.dropped_keys)}")
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
