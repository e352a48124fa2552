"""Segmentation heads: linear probe (SigLIP 2 / DINOv2), UPerNet and FCN (mmseg).

Every head takes ``in_channels`` and ``num_classes``, reads named NCHW maps from a dict, and returns
logits at the resolution of its first input map; the final classifier is the 1×1 conv ``conv_seg``
(``init_from`` re-initialises it when the class count changes). Upsampling to the image is the
segmentor's job.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class ConvBNReLU(nn.Sequential):
    """mmcv's ``ConvModule`` with BN + ReLU (bias-free conv, as mmseg builds it)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class LinearHead(nn.Module):
    """The linear probe of SigLIP 2 / DINOv2: (BN +) a 1×1 conv on patch features.

    lin.1 reads one block; lin.4 concatenates several (resized to the first map's size);
    ``concat_pooled`` appends each map's global average broadcast over the grid, standing in for
    DINOv2's class token (SigLIP has none). The number of maps is fixed at construction from
    ``in_keys`` (the task fills it from the backbone); ``None`` means one map, and then ``forward``
    reads all maps of the input, which must then be exactly one.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        in_keys: Sequence[str] | None = None,
        use_bn: bool = True,
        concat_pooled: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_keys = list(in_keys) if in_keys else None
        self.concat_pooled = bool(concat_pooled)
        num_maps = len(self.in_keys) if self.in_keys else 1
        self.feat_channels = int(in_channels) * num_maps * (2 if self.concat_pooled else 1)
        self.bn = nn.BatchNorm2d(self.feat_channels) if use_bn else nn.Identity()
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(self.feat_channels, int(num_classes), kernel_size=1)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        maps = [features[k] for k in self.in_keys] if self.in_keys else list(features.values())
        size = maps[0].shape[-2:]
        parts = []
        for m in maps:
            m = _resize(m, size)
            parts.append(m)
            if self.concat_pooled:
                parts.append(m.mean(dim=(2, 3), keepdim=True).expand_as(m))
        x = torch.cat(parts, dim=1)
        if x.shape[1] != self.feat_channels:
            raise ValueError(
                f"LinearHead was built for {self.feat_channels} channels but got {x.shape[1]} from "
                f"{len(maps)} maps: pass in_keys listing the maps it should read"
            )
        return self.conv_seg(self.dropout(self.bn(x)))


class PPM(nn.ModuleList):
    """Pyramid pooling (PSPNet): average-pool to each scale, 1×1 ConvBNReLU, upsample back."""

    def __init__(self, pool_scales: Sequence[int], in_channels: int, channels: int) -> None:
        super().__init__(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvBNReLU(in_channels, channels, 1)) for s in pool_scales
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        return [_resize(stage(x), x.shape[-2:]) for stage in self]


class UPerHead(nn.Module):
    """mmseg's ``UPerHead`` (UPerNet, Xiao et al. 2018): PPM on the coarsest level + FPN fusion."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        in_keys: Sequence[str] = ("p2", "p3", "p4", "p5"),
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.in_keys = list(in_keys)
        n = len(self.in_keys)
        self.psp_modules = PPM(pool_scales, in_channels, channels)
        self.bottleneck = ConvBNReLU(in_channels + len(pool_scales) * channels, channels, 3, padding=1)
        self.lateral_convs = nn.ModuleList(ConvBNReLU(in_channels, channels, 1) for _ in range(n - 1))
        self.fpn_convs = nn.ModuleList(ConvBNReLU(channels, channels, 3, padding=1) for _ in range(n - 1))
        self.fpn_bottleneck = ConvBNReLU(n * channels, channels, 3, padding=1)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, int(num_classes), kernel_size=1)

    def psp_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(torch.cat([x, *self.psp_modules(x)], dim=1))

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = [features[k] for k in self.in_keys]
        laterals = [conv(inputs[i]) for i, conv in enumerate(self.lateral_convs)]
        laterals.append(self.psp_forward(inputs[-1]))
        for i in range(len(laterals) - 1, 0, -1):  # top-down path
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(laterals[i]) for i, conv in enumerate(self.fpn_convs)]
        outs.append(laterals[-1])
        size = outs[0].shape[-2:]
        feats = self.fpn_bottleneck(torch.cat([_resize(o, size) for o in outs], dim=1))
        return self.conv_seg(self.dropout(feats))


class FCNHead(nn.Module):
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
        super().__init__()
        if num_convs == 0 and in_channels != channels:
            raise ValueError("FCNHead with num_convs=0 needs channels == in_channels")
        self.in_key = in_key
        convs = [
            ConvBNReLU(in_channels if i == 0 else channels, channels, 3, padding=1) for i in range(num_convs)
        ]
        self.convs = nn.Sequential(*convs) if convs else nn.Identity()
        self.conv_cat = ConvBNReLU(in_channels + channels, channels, 3, padding=1) if concat_input else None
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, int(num_classes), kernel_size=1)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        x = features[self.in_key]
        out = self.convs(x)
        if self.conv_cat is not None:
            out = self.conv_cat(torch.cat([x, out], dim=1))
        return self.conv_seg(self.dropout(out))


__all__ = ["FCNHead", "LinearHead", "UPerHead"]
