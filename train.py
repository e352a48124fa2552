"""Train a dense predictor on a SigLIP 2 backbone (the same job as the ``siglip-dense-train`` command).

python train.py                                  # toy segmentation on CPU (== experiment=toy_seg)
python train.py experiment=ade20k_upernet_so400m16 trainer=gpu data.root=/data/ADEChallengeData2016
"""

from siglip_dense.cli import train

if __name__ == "__main__":
    train()
