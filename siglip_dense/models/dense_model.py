"""What the segmentor and the depth model share: padding any input size to what the backbone needs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class DenseModel(nn.Module):
    """Backbone → (neck) → head for inputs of any size; subclasses say how to ``decode``.

    Inputs are zero-padded bottom/right (zero is the mean colour after SigLIP's normalisation) to
    the divisibility the neck (or backbone) needs; ``decode`` maps the padded batch's backbone maps to
    outputs at the unpadded size, so pixels keep their positions. Multi-task training calls the
    pieces itself to run one backbone pass for several heads.
    """

    backbone: nn.Module
    neck: nn.Module | None

    @property
    def size_divisibility(self) -> int:
        source = self.neck if self.neck is not None else self.backbone
        return int(getattr(source, "size_divisibility", 1) or 1)

    def pad_input(self, images: torch.Tensor) -> torch.Tensor:
        """Zero-pad bottom/right to ``size_divisibility`` (what ``forward`` feeds the backbone)."""
        h, w = images.shape[-2:]
        div = self.size_divisibility
        pad_h, pad_w = (-h) % div, (-w) % div
        return F.pad(images, (0, pad_w, 0, pad_h)) if pad_h or pad_w else images

    def forward(
        self, images: torch.Tensor, grid_sizes: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        if grid_sizes is not None:  # a NaFlex batch: per-image grids (siglip_dense.models.naflex)
            from siglip_dense.models.naflex import naflex_forward

            return naflex_forward(self, images, grid_sizes)
        x = self.pad_input(images)
        return self.decode(self.backbone(x), x.shape[-2:], images.shape[-2:])

    def decode(
        self, backbone_feats: dict[str, torch.Tensor], padded_size: Sequence[int], size: Sequence[int]
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError
