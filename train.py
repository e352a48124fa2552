"""Train a dense predictor on a SigLIP 2 backbone.

python train.py                                  # toy segmentation on CPU (== experiment=toy_seg)
python train.py experiment=ade20k_upernet_so400m16 trainer=gpu data.root=/data/ADEChallengeData2016
"""

import os
import sys

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from siglip_dense.launch import argv_for_rank, argv_resuming_in_run_dir  # noqa: E402
from siglip_dense.train import run_train  # noqa: E402


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    run_train(cfg)


if __name__ == "__main__":
    sys.argv = argv_for_rank(sys.argv, os.environ)  # torchrun / srun: .hydra/ by rank 0 only
    sys.argv = argv_resuming_in_run_dir(sys.argv)  # ckpt_path=<run>/checkpoints/...: continue in <run>
    main()
