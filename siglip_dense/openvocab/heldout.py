"""Held-out classes: train on the seen label set only, evaluate on seen + unseen names.

The zero-shot segmentation protocol of SPNet / ZS3Net / ZegFormer: the unseen classes' pixels are
ignored during training and their names never reach the head; evaluation then uses every name, and
reports mIoU over the seen and the unseen classes and their harmonic mean (hIoU).

``python -m siglip_dense.openvocab.heldout SRC DST ball,ring`` writes DST, a copy of the segmentation
folder SRC (ADE20K layout: ``images/<split>``, ``annotations/<split>/*.png``, ``classes.txt``) whose
label set is the seen classes only; train on DST, evaluate on SRC with ``open_vocab.held_out=[ball,ring]``.
"""

from __future__ import annotations

import argparse
import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from siglip_dense.data.io import DataError, read_label, write_label
from siglip_dense.data.seg_folder import load_class_names
from siglip_dense.data.transforms import IGNORE_INDEX


def seen_label_map(names: Sequence[str], held_out: Sequence[str], reduce_zero_label: bool) -> np.ndarray:
    """A 256-entry lookup table from the full label ids to the seen-only ids.

    With ``reduce_zero_label`` (ADE20K convention: 0 = ignored, class i stored as i + 1) unseen classes
    become 0; otherwise (class i stored as i) they become 255. Raises ValueError for a held-out name
    that is not a class, or when no class would be left.
    """
    unknown = [n for n in held_out if n not in names]
    if unknown:
        raise ValueError(f"held_out: {unknown} are not class names; classes: {list(names)}")
    seen = [n for n in names if n not in set(held_out)]
    if not seen:
        raise ValueError("held_out: every class is held out; at least one must be seen")
    offset = 1 if reduce_zero_label else 0
    ignored = 0 if reduce_zero_label else IGNORE_INDEX
    lut = np.arange(256, dtype=np.uint8)
    new_id = {n: i for i, n in enumerate(seen)}
    for i, name in enumerate(names):
        lut[i + offset] = new_id[name] + offset if name in new_id else ignored
    return lut


def write_seen_split(
    src: str | Path, dst: str | Path, held_out: Sequence[str], reduce_zero_label: bool = True
) -> list[str]:
    """DST = SRC with the held-out classes removed from the label set (every split); returns the seen
    names (DST/classes.txt). Images are copied unchanged; each annotation goes through
    :func:`seen_label_map`. Raises DataError when SRC has no annotations or DST already exists."""
    src, dst = Path(src), Path(dst)
    if dst.exists():
        raise DataError(f"{dst} exists: write the seen-class copy to a new folder")
    names = load_class_names(src, dataset="folder")
    lut = seen_label_map(names, held_out, reduce_zero_label)
    annotations = sorted((src / "annotations").glob("*/*.png"))
    if not annotations:
        raise DataError(f"no annotations (annotations/<split>/*.png) under {src}")
    shutil.copytree(src / "images", dst / "images")
    for ann in annotations:
        out = dst / ann.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_label(out, lut[read_label(ann)])
    seen = [n for n in names if n not in set(held_out)]
    (dst / "classes.txt").write_text("\n".join(seen) + "\n")
    return seen


def seen_unseen_miou(per_class_iou: Mapping[str, float | None], held_out: Sequence[str]) -> dict[str, float]:
    """mIoU over the seen and the unseen classes (classes absent from the data, IoU None/NaN, left
    out) and their harmonic mean hIoU = 2·s·u / (s + u) (Xian et al. 2019, SPNet). NaN where empty."""

    def mean(values: list[float | None]) -> float:
        kept = [v for v in values if v is not None and not math.isnan(v)]
        return float(np.mean(kept)) if kept else float("nan")

    unknown = [n for n in held_out if n not in per_class_iou]
    if unknown:
        raise ValueError(f"held_out: {unknown} are not among the evaluated classes {list(per_class_iou)}")
    held = set(held_out)
    seen = mean([v for n, v in per_class_iou.items() if n not in held])
    unseen = mean([v for n, v in per_class_iou.items() if n in held])
    h = 2 * seen * unseen / (seen + unseen) if seen + unseen > 0 else float("nan")
    return {"mIoU_seen": seen, "mIoU_unseen": unseen, "hIoU": h}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="segmentation folder (images/, annotations/, classes.txt)")
    parser.add_argument("dst", help="new folder for the seen-class copy")
    parser.add_argument("held_out", help="comma-separated class names to hold out")
    parser.add_argument(
        "--no-reduce-zero-label",
        action="store_true",
        help="labels are 0-based with 255 ignored (default: ADE20K's 0 = ignored, class i stored as i + 1)",
    )
    args = parser.parse_args(argv)
    held_out = [n.strip() for n in args.held_out.split(",") if n.strip()]
    seen = write_seen_split(args.src, args.dst, held_out, not args.no_reduce_zero_label)
    print(f"{args.dst}: {len(seen)} seen classes {seen}; held out {held_out}")


if __name__ == "__main__":
    main()
