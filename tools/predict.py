"""Run a trained model on images: raw outputs plus PNG visualisations.

python tools/predict.py ckpt_path=PATH input=IMAGE_OR_DIR output=DIR [device=cuda]
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from siglip_dense.cli import parse_key_values  # noqa: E402
from siglip_dense.predict import run_predict  # noqa: E402


def main(argv: list[str]) -> int:
    args = parse_key_values(argv, required=("ckpt_path", "input", "output"), optional={"device": "cpu"})
    run_predict(args["ckpt_path"], args["input"], args["output"], device=args["device"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
