"""VOC list files: one id a line (MMSeg / devkit) or DeepLab's two-column image/label lines; any other
line is refused with the list file and line number."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from siglip_dense.data.io import DataError
from siglip_dense.data.voc import VOCSegDataset
from tests.test_voc import write_voc


def test_deeplab_two_column_lines_pair_image_and_label(tmp_path: Path) -> None:
    labels = {"2007_000032": np.full((8, 8), 3, np.uint8), "2008_000001": np.full((8, 8), 7, np.uint8)}
    write_voc(tmp_path, labels)
    lines = [f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png" for i in labels]
    (tmp_path / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(lines) + "\n")
    ds = VOCSegDataset(tmp_path, "val")
    assert ds.samples == [
        (tmp_path / "JPEGImages" / f"{i}.jpg", tmp_path / "SegmentationClassAug" / f"{i}.png") for i in labels
    ]
    np.testing.assert_array_equal(ds.load(1)[1], labels["2008_000001"])


@pytest.mark.parametrize("line", ["/JPEGImages/a.jpg", "a b c"])
def test_other_line_forms_name_the_list_and_line(tmp_path: Path, line: str) -> None:
    write_voc(tmp_path, {"a": np.zeros((8, 8), np.uint8)})
    split = tmp_path / "ImageSets" / "Segmentation" / "val.txt"
    split.write_text(f"a\n\n{line}\n")
    with pytest.raises(DataError, match=f"{split}, line 3: .*neither an image id"):
        VOCSegDataset(tmp_path, "val")
