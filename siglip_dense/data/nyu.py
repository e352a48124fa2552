"""NYUv2 in the BTS / Depth Anything layout: ``ROOT/splits/{train,val}.txt`` with
``rgb_relpath depth_relpath [focal]`` lines (paths relative to ROOT, a leading "/" ignored), depth as
16-bit PNG in millimetres (0 = no measurement)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from siglip_dense.data.depth_folder import DepthDataset, DepthSample
from siglip_dense.data.io import DataError


def _rel(root: Path, entry: str) -> Path:
    """Split-file paths are relative to ROOT; BTS's train list starts them with '/'."""
    return root / entry.lstrip("/")


class NYUDepthDataset(DepthDataset):
    """The BTS / Depth Anything NYUv2 layout: ``ROOT/splits/<split>.txt`` (or ``split`` = a file path)."""

    def __init__(
        self,
        root: str | Path,
        split: str,
        transform: Callable[..., dict[str, Any]] | None = None,
        depth_scale: float = 1000.0,
        skip_bad: bool = False,
    ) -> None:
        super().__init__(transform, depth_scale, skip_bad)
        self.root = Path(root)
        self.split = split
        candidate = Path(split)
        self.split_file = (
            candidate
            if candidate.suffix == ".txt" and candidate.is_file()
            else self.root / "splits" / f"{split}.txt"
        )
        self.samples = self._read_split()

    def _read_split(self) -> list[DepthSample]:
        if not self.split_file.is_file():
            raise DataError(
                f"split file not found: {self.split_file} (NYUv2 layout: ROOT/splits/{self.split}.txt with "
                "'rgb_relpath depth_relpath [focal]' lines)"
            )
        samples, bad = [], []
        for lineno, raw in enumerate(self.split_file.read_text().splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            where = f"{self.split_file} line {lineno}"
            if len(parts) < 2:
                raise DataError(f"{where}: expected 'rgb_relpath depth_relpath [focal]', got {line!r}")
            rgb, depth = _rel(self.root, parts[0]), _rel(self.root, parts[1])
            focal = None
            if len(parts) > 2:
                try:
                    focal = float(parts[2])
                except ValueError:
                    focal = None
            if parts[1] == "None":
                bad.append(f"{where}: no depth file listed for {rgb}")
            elif not rgb.is_file():
                bad.append(f"{where}: image {rgb} not found")
            elif not depth.is_file():
                bad.append(f"{where}: depth {depth} not found")
            else:
                samples.append(DepthSample(rgb, depth, focal, where))
        if bad:
            if not self.skip_bad:
                more = (
                    f" ({len(bad)} bad lines in all; set data.skip_bad=true to drop them)"
                    if len(bad) > 1
                    else ""
                )
                raise DataError(bad[0] + more)
            warnings.warn(f"dropped {len(bad)} lines of {self.split_file}, e.g. {bad[0]}", stacklevel=3)
        if not samples:
            raise DataError(f"{self.split_file} lists no usable sample")
        return samples


__all__ = ["NYUDepthDataset"]
