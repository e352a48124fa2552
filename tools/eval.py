"""Evaluate a trained checkpoint (the task, classes and normalisation come from the checkpoint).

The same job as the ``siglip-dense-eval`` command:

python tools/eval.py ckpt_path=outputs/toy_seg/runs/<time>/checkpoints/last.ckpt
python tools/eval.py ckpt_path=PATH data.root=/data/ADEChallengeData2016 save_predictions=true tta=ms_flip
python tools/eval.py ckpt_path=PATH data=seg_folder data.root=DIR trainer=gpu output_dir=DIR
"""

from siglip_dense.cli import evaluate

if __name__ == "__main__":
    evaluate()
