"""Predictions for image files with a trained model (``tools/predict.py``), no dataset needed."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from siglip_dense.checkpoints import load_model
from siglip_dense.data.io import read_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def list_images(source: str | Path) -> list[Path]:
    """One image file, or every image in a directory (sorted, not recursive)."""
    source = Path(source)
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise FileNotFoundError(f"input not found: {source}")
    files = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {source}")
    return files


def run_predict(
    ckpt_path: str | Path, source: str | Path, output: str | Path, device: str = "cpu"
) -> list[Path]:
    """Write each image's raw prediction and a visualisation into ``output``; returns the files."""
    model = load_model(ckpt_path, device=device)
    out_dir = Path(output)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for path in list_images(source):
        image = read_image(path)  # RGB uint8 whatever the file held (grey, RGBA, palette)
        prediction = model.predict([np.ascontiguousarray(image)])[0]
        written += model.write_outputs(image, prediction, out_dir, path.stem)
        print(f"{path} -> {', '.join(p.name for p in written[-2:])}")
    return written
