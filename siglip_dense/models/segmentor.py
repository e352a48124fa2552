"""Backbone → (neck) → head, returning logits at the input size for any input size."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from siglip_dense.models.dense_model import DenseModel


class Segmentor(DenseModel):
    """An encoder-decoder segmentor (mmseg's ``EncoderDecoder`` without the loss).

    Inputs of any size work: they are zero-padded bottom/right (zero is the mean colour after
    SigLIP's normalisation) to the divisibility the neck (or backbone) needs, and the logits are
    upsampled to the padded size and cropped back, so pixels keep their positions.
    """

    def __init__(
        self,
        backbone: nn.Module,
        neck: nn.Module | None = None,
        head: nn.Module | None = None,
        aux_head: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if head is None:
            raise ValueError("Segmentor needs a head")
        self.backbone = backbone
        self.neck = neck
        self.head = head
        self.aux_head = aux_head

    def extract_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone(images)
        return self.neck(feats) if self.neck is not None else feats

    def decode(
        self, backbone_feats: dict[str, torch.Tensor], padded_size: Sequence[int], size: Sequence[int]
    ) -> dict[str, torch.Tensor]:
        """Backbone maps of a padded batch → neck → head(s) → logits at the unpadded ``size``.

        ``forward`` is ``decode(backbone(pad_input(images)), padded size, input size)``; a caller that
        runs one backbone pass for several heads (multi-task training) calls the pieces itself.
        """
        h, w = int(size[0]), int(size[1])
        padded = torch.Size([int(padded_size[0]), int(padded_size[1])])
        feats = self.neck(backbone_feats) if self.neck is not None else backbone_feats
        out = {"logits": self._to_input(self.head(feats), padded, h, w)}
        if self.training and self.aux_head is not None:
            out["aux_logits"] = self._to_input(self.aux_head(feats), padded, h, w)
        return out

    @staticmethod
    def _to_input(logits: torch.Tensor, padded: torch.Size, h: int, w: int) -> torch.Tensor:
        if logits.shape[-2:] != padded:
            logits = F.interpolate(logits, size=tuple(padded), mode="bilinear", align_corners=False)
        return logits[..., :h, :w]


__all__ = ["Segmentor"]
