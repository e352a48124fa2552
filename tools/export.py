"""Export a trained checkpoint for deployment: model.safetensors + config.json (``siglip-dense-export``).

python tools/export.py ckpt_path=PATH out=DIR
then: from siglip_dense import load_model; model = load_model(DIR); model.predict([rgb_uint8])
"""

from siglip_dense.cli import export

if __name__ == "__main__":
    export()
