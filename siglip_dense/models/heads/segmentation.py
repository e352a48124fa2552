"""Segmentation heads: linear probe (SigLIP 2 / DINOv2), UPerNet and FCN (mmseg).

Every head takes ``in_channels`` and ``num_classes``, reads named NCHW maps from a dict, and returns
logits at the resolution of its first input map. Input selection, resizing, dropout and the final
1×1 classifier ``conv_seg`` (PyTorch's default init; MMSeg's N(0, 0.01²) with ``init_std=0.01``; ``init_from`` re-initialises it when the class
count changes) come from :class:`~siglip_dense.models.heads.base.BaseDecodeHead`. Upsampling to the
image is the segmentor's job.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from siglip_dense.models.heads.base import BaseDecodeHead, BatchNorm2d, resize


class ConvBNReLU(nn.Sequential):
    """mmcv's ``ConvModule`` with BN + ReLU (bias-free conv, as mmseg builds it); the BN trains at
    batch 1 too (:class:`~siglip_dense.models.heads.base.BatchNorm2d`)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=False),
            BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class LinearHead(BaseDecodeHead):
    """The linear probe of SigLIP 2 / DINOv2 (MMSeg's ``BNHead`` as DINOv2 configures it): BN + 1×1 conv.

    lin.1 reads one block; lin.4 concatenates several (``resize_concat`` to the first map's size);
    ``concat_pooled`` appends each map's global average broadcast over the grid, standing in for
    DINOv2's class token (SigLIP has none). The number of maps is fixed at construction from
    ``in_keys`` (the task fills it from the backbone) or a per-level ``in_channels`` list; with
    neither it is one, and then ``forward`` reads all maps of the input, which must then be exactly
    one. ``dropout`` is the configs' name for ``dropout_ratio``.
    """

    def __init__(
        self,
        in_channels: int | Sequence[int],
        num_classes: int,
        in_keys: Sequence[str] | None = None,
        use_bn: bool = True,
        concat_pooled: bool = False,
        dropout: float = 0.0,
        align_corners: bool = False,
    ) -> None:
        super().__init__(
            in_channels,
            channels=None,
            num_classes=num_classes,
            in_keys=in_keys,
            input_transform="resize_concat",
            dropout_ratio=dropout,
            align_corners=align_corners,
            concat_pooled=concat_pooled,
        )
        self.bn = self.input_batch_norm() if use_bn else nn.Identity()

    @property
    def feat_channels(self) -> int:
        """Width of the concatenated features (kept from before the base; equals ``channels``)."""
        return self.channels

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.cls_seg(self.bn(self._transform_inputs(features)))


class PPM(nn.ModuleList):
    """Pyramid pooling (PSPNet): average-pool to each scale, 1×1 ConvBNReLU, upsample back."""

    def __init__(
        self, pool_scales: Sequence[int], in_channels: int, channels: int, align_corners: bool = False
    ) -> None:
        super().__init__(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvBNReLU(in_channels, channels, 1)) for s in pool_scales
        )
        self.align_corners = align_corners

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        return [resize(stage(x), x.shape[-2:], self.align_corners) for stage in self]


class UPerHead(BaseDecodeHead):
    """mmseg's ``UPerHead`` (UPerNet, Xiao et al. 2018): PPM on the coarsest level + FPN fusion.

    ``in_channels`` is one int (every level that wide, as after our necks) or MMSeg's per-level list
    (e.g. ``[96, 192, 384, 768]``), one entry per ``in_keys`` map, finest first. ``dropout`` is the
    configs' name for ``dropout_ratio``.
    """

    def __init__(
        self,
        in_channels: int | Sequence[int],
        num_classes: int,
        in_keys: Sequence[str] = ("p2", "p3", "p4", "p5"),
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
        align_corners: bool = False,
    ) -> None:
        super().__init__(
            in_channels,
            channels,
            num_classes,
            in_keys=in_keys,
            input_transform="multiple_select",
            dropout_ratio=dropout,
            align_corners=align_corners,
        )
        widths, n = self.level_channels, self.num_levels
        self.psp_modules = PPM(pool_scales, widths[-1], channels, align_corners)
        self.bottleneck = ConvBNReLU(widths[-1] + len(pool_scales) * channels, channels, 3, padding=1)
        self.lateral_convs = nn.ModuleList(ConvBNReLU(widths[i], channels, 1) for i in range(n - 1))
        self.fpn_convs = nn.ModuleList(ConvBNReLU(channels, channels, 3, padding=1) for _ in range(n - 1))
        self.fpn_bottleneck = ConvBNReLU(n * channels, channels, 3, padding=1)

    def psp_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(torch.cat([x, *self.psp_modules(x)], dim=1))

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = self._transform_inputs(features)
        laterals = [conv(inputs[i]) for i, conv in enumerate(self.lateral_convs)]
        laterals.append(self.psp_forward(inputs[-1]))
        for i in range(len(laterals) - 1, 0, -1):  # top-down path
            up = resize(laterals[i], laterals[i - 1].shape[-2:], self.align_corners)
            laterals[i - 1] = laterals[i - 1] + up
        outs = [conv(laterals[i]) for i, conv in enumerate(self.fpn_convs)]
        outs.append(laterals[-1])
        size = outs[0].shape[-2:]
        outs = [resize(o, size, self.align_corners) for o in outs]
        return self.cls_seg(self.fpn_bottleneck(torch.cat(outs, dim=1)))


class FCNHead(BaseDecodeHead):
    """mmseg's ``FCNHead``: ``num_convs`` 3×3 ConvBNReLU on one level; the usual auxiliary head."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        in_key: str = "p4",
        channels: int = 256,
        num_convs: int = 1,
        concat_input: bool = False,
        dropout: float = 0.1,
    ) -> None:
        if num_convs == 0 and in_channels != channels:
            raise ValueError("FCNHead with num_convs=0 needs channels == in_channels")
        super().__init__(in_channels, channels, num_classes, in_keys=[in_key], dropout_ratio=dropout)
        self.in_key = in_key
        convs = [
            ConvBNReLU(in_channels if i == 0 else channels, channels, 3, padding=1) for i in range(num_convs)
        ]
        self.convs = nn.Sequential(*convs) if convs else nn.Identity()
        self.conv_cat = ConvBNReLU(in_channels + channels, channels, 3, padding=1) if concat_input else None

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        x = self._transform_inputs(features)
        out = self.convs(x)
        if self.conv_cat is not None:
            out = self.conv_cat(torch.cat([x, out], dim=1))
        return self.cls_seg(out)


__all__ = ["FCNHead", "LinearHead", "UPerHead"]
