"""What the segmentor and the depth model share: padding any input size to what the backbone needs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
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

    def kept_size(self, height: int, width: int) -> tuple[int, int]:
        """The part of an H×W input the backbone sees: all of it (``patch_remainder="pad"``) or its
        whole patches (``"drop"``: the last ``H mod p`` rows / ``W mod p`` columns are cropped, as the
        bare backbone and the sources do).

        Raises:
            ValueError: with ``drop``, an input smaller than one patch.
        """
        if getattr(self.backbone, "patch_remainder", "pad") != "drop":
            return height, width
        p = int(self.backbone.patch_size)
        if height < p or width < p:
            raise ValueError(
                f"input {height}×{width} is smaller than one {p}-px patch (patch_remainder=drop)"
            )
        return height - height % p, width - width % p

    def pad_input(self, images: torch.Tensor) -> torch.Tensor:
        """Pad bottom/right to ``size_divisibility`` with 0 = the mean colour (what ``forward`` feeds
        the backbone, after cropping to :meth:`kept_size`); the same rule as the training pipelines'
        pads (``data.transforms``)."""
        h, w = images.shape[-2:]
        div = self.size_divisibility
        return pad_normalized(images, (h + (-h) % div, w + (-w) % div))

    def forward(
        self, images: torch.Tensor, grid_sizes: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        if grid_sizes is not None:  # a NaFlex batch: per-image grids (siglip_dense.models.naflex)
            from siglip_dense.models.naflex import naflex_forward

            return naflex_forward(self, images, grid_sizes)
        size = tuple(images.shape[-2:])
        kept = self.kept_size(*size)  # patch_remainder=drop: whole patches only, padded as the neck needs
        x = self.pad_input(images[..., : kept[0], : kept[1]])
        out = self.decode(self.backbone(x), x.shape[-2:], kept)
        if kept != size:  # patch_remainder=drop: outputs of the kept part, resized to the whole input
            out = {
                k: F.interpolate(v, size=size, mode="bilinear", align_corners=False) for k, v in out.items()
            }
        return out

    def decode(
        self, backbone_feats: dict[str, torch.Tensor], padded_size: Sequence[int], size: Sequence[int]
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError
