"""Export a trained checkpoint for deployment: model.safetensors + config.json (no optimizer state).

python tools/export.py ckpt_path=PATH out=DIR
then: from siglip_dense import load_model; model = load_model(DIR); model.predict([rgb_uint8])
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from siglip_dense.checkpoints import export  # noqa: E402
from siglip_dense.cli import parse_key_values  # noqa: E402


def main(argv: list[str]) -> int:
    args = parse_key_values(argv, required=("ckpt_path", "out"))
    out = export(args["ckpt_path"], args["out"])
    print(f"exported {args['ckpt_path']} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
