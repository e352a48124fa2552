"""Run a trained model on images: raw outputs plus PNG visualisations (``siglip-dense-predict``).

python tools/predict.py ckpt_path=PATH input=IMAGE_OR_DIR output=DIR [device=cuda]
"""

from siglip_dense.cli import predict

if __name__ == "__main__":
    predict()
