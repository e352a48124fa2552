"""What the segmentor and the depth model share: padding any input size to what the backbone needs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from siglip_dense.data.transforms import pad_normalized


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
        """Pad bottom/right to ``size_divisibility`` with 0 = the mean colour (what ``forward`` feeds
        the backbone); the same rule as the training pipelines' pads (``data.transforms``)."""
        h, w = images.shape[-2:]
        div = self.size_divisibility
        return pad_normalized(images, (h + (-h) % div, w + (-w) % div))

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
