"""Evaluate a trained checkpoint (the task, classes and normalisation come from the checkpoint).

python tools/eval.py ckpt_path=outputs/toy_seg/runs/<time>/checkpoints/last.ckpt
python tools/eval.py ckpt_path=PATH data.root=/data/ADEChallengeData2016 save_predictions=true tta=ms_flip
python tools/eval.py ckpt_path=PATH data=seg_folder data.root=DIR trainer=gpu output_dir=DIR
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from siglip_dense.evaluate import run_eval  # noqa: E402
from siglip_dense.launch import argv_for_rank  # noqa: E402


@hydra.main(version_base="1.3", config_path="../configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    run_eval(cfg)


if __name__ == "__main__":
    sys.argv = argv_for_rank(sys.argv, os.environ)  # torchrun / srun: .hydra/ by rank 0 only
    main()
