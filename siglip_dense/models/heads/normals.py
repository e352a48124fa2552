"""Surface-normal heads: the frozen-probe linear head and DPT, both ending in unit vectors per pixel.

Outputs are B×3×h×w unit normals in the camera frame of the data (NYUv2 as distributed: x right,
y down, z away from the camera). :class:`NormalsModel` upsamples the raw 3-vectors bilinearly to
the input size and normalises after upsampling (interpolating unit vectors shortens them).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from siglip_dense.models.dense_model import DenseModel
from siglip_dense.models.heads.base import BaseDecodeHead
from siglip_dense.models.heads.depth import DPTHead


def normalize_normals(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """L2-normalise the channel axis of B×3×H×W vectors in float32 (a zero vector stays ~0)."""
    return F.normalize(x.float(), dim=1, eps=eps)


class LinearNormalsHead(BaseDecodeHead):
    """The linear probe for normals: (BN +) 1×1 conv on the chosen blocks' patch features → 3 channels.

    Same shape as the segmentation / depth linear probes (:class:`BaseDecodeHead`, ``resize_concat``
    of ``in_keys``, optional pooled-token stand-in ``concat_pooled``); the classifier ``conv_normal``
    outputs raw 3-vectors at the patch grid, L2-normalised by :class:`NormalsModel` after upsampling.
    """

    classifier_name = "conv_normal"

    def __init__(
        self,
        in_channels: int | Sequence[int],
        in_keys: Sequence[str] | None = None,
        use_bn: bool = True,
        concat_pooled: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(
            in_channels,
            channels=None,
            num_classes=3,
            in_keys=in_keys,
            input_transform="resize_concat",
            dropout_ratio=dropout,
            concat_pooled=concat_pooled,
        )
        self.bn = self.input_batch_norm() if use_bn else nn.Identity()

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Named block maps → B×3×h×w raw normal vectors at the first map's grid."""
        return self.cls_seg(self.bn(self._transform_inputs(features)))


class DPTNormalsHead(DPTHead):
    """The depth DPT decoder (reassemble, RefineNet fusion, output convs) with a 3-channel output.

    Everything but the last 1×1 conv is :class:`~siglip_dense.models.heads.depth.DPTHead`'s (same
    module names, so a depth DPT's decoder weights load into it, all but ``output_conv2.2``); the
    output is raw 3-vectors (no depth activation), normalised by :class:`NormalsModel`.
    """

    def __init__(
        self,
        in_channels: int,
        in_keys: Sequence[str],
        patch_size: int = 16,
        features: int = 256,
        out_channels: Sequence[int] = (256, 512, 1024, 1024),
        head_channels: int = 32,
        use_bn: bool = False,
    ) -> None:
        super().__init__(in_channels, in_keys, patch_size, features, out_channels, head_channels, use_bn)
        self.output_conv2[-1] = nn.Conv2d(int(head_channels), 3, 1)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Four block maps → B×3×(h·p)×(w·p) raw normal vectors (the depth activation is skipped)."""
        return self.decode_raw(features)


class NormalsModel(DenseModel):
    """Backbone → (neck →) head → unit normals B×3×H×W at the input size (padded, upsampled, cropped)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, neck: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.head = head

    def decode(
        self, backbone_feats: dict[str, torch.Tensor], padded_size: Sequence[int], size: Sequence[int]
    ) -> dict[str, torch.Tensor]:
        """Backbone maps of a padded batch → ``{"normals": B×3×h×w unit vectors}`` at ``size``."""
        h, w = int(size[0]), int(size[1])
        padded = (int(padded_size[0]), int(padded_size[1]))
        feats = self.neck(backbone_feats) if self.neck is not None else backbone_feats
        raw = self.head(feats).float()
        if tuple(raw.shape[-2:]) != padded:
            raw = F.interpolate(raw, size=padded, mode="bilinear", align_corners=False)
        return {"normals": normalize_normals(raw[..., :h, :w])}


__all__ = ["DPTNormalsHead", "LinearNormalsHead", "NormalsModel", "normalize_normals"]
