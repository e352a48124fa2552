"""Necks: single-scale ViT block maps → a p2..p5 feature pyramid (strides 4/8/16/32).

A plain ViT has one stride (its patch size). Dense heads built for CNN pyramids (UPerNet, FPN
detectors) want strides 4..32, so a neck rescales the block maps with (transposed) convolutions
and pooling. Both necks follow detectron2's conventions: ``out_channels: int``, ``strides`` (ordered
``p2..p5[, p6]``) and ``size_divisibility``.

Patch-14 rule: a stride-14 map cannot be turned into strides 4/8/16/32 by factors of 2, so it is
first resized bilinearly to the stride-16 grid ``ceil(h·14/16) × ceil(w·14/16)`` (the grid of the
input padded to a multiple of 16); every level then has its nominal stride. Max pooling uses
``ceil_mode=True`` so an odd stride-16 grid still gives the ``ceil(H/32)`` level instead of dropping
the last row (identical to ViTDet / mmseg's floor pooling for even grids).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn

BASE_STRIDE = 16  # the grid the pyramid is built around: scale 1.0 = stride 16 = p4
_SUPPORTED_SCALES = (4.0, 2.0, 1.0, 0.5)


def _norm(kind: str | None, channels: int) -> nn.Module:
    """detectron2's ``get_norm`` subset: LayerNorm over channels (ViTDet), BatchNorm (BEiT), or none."""
    kind = (kind or "").upper()
    if kind == "LN":
        return LayerNorm2d(channels)
    if kind == "BN":
        return nn.BatchNorm2d(channels)
    if kind in ("", "NONE"):
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}: use 'LN', 'BN' or ''")


def _level_name(scale: float) -> str:
    if scale not in _SUPPORTED_SCALES:
        raise ValueError(f"scale factor {scale} is not supported; use a subset of {_SUPPORTED_SCALES}")
    return f"p{int(round(math.log2(BASE_STRIDE / scale)))}"


def to_stride16_grid(x: torch.Tensor, in_stride: int) -> torch.Tensor:
    """Resize a stride-``in_stride`` map to the stride-16 grid (the patch-14 rule); no-op for 16."""
    if in_stride == BASE_STRIDE:
        return x
    h, w = x.shape[-2:]
    size = (math.ceil(h * in_stride / BASE_STRIDE), math.ceil(w * in_stride / BASE_STRIDE))
    if size == (h, w):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def pyramid_size_divisibility(in_stride: int, coarsest_stride: int) -> int:
    """Input multiple that yields exact levels, or just ``in_stride`` when exactness is too costly.

    When the patch divides the coarsest stride (patch 8/16/32) the answer is the coarsest stride
    (32, or 64 with p6). For patch 14, exact levels would need lcm(14, 32) = 224 (448 with p6): a
    518 crop would be padded to 672 (1.7× the tokens). The ceil-grid resize plus ceil-mode pooling
    already keeps every level consistent at ``ceil(H_pad / stride)``, so we only ask for the patch
    multiple the backbone needs anyway. ``exact_size_divisibility`` gives the lcm for those who want it.
    """
    if coarsest_stride % in_stride == 0:
        return coarsest_stride
    return in_stride


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid (Li et al. 2022) from the last block's map.

    Stages are named as in detectron2 (``simfp_<stage>``); each level is upsample/downsample →
    1×1 conv (+norm) → 3×3 conv (+norm), convs without bias when normed. ``in_keys`` only picks the
    input map (its last entry); ``top_block`` adds p6 (detectron2 ``LastLevelMaxPool``).
    """

    def __init__(
        self,
        in_channels: int,
        in_stride: int,
        out_channels: int = 256,
        in_keys: Sequence[str] | None = None,
        scale_factors: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
        top_block: bool = False,
        norm: str = "LN",
    ) -> None:
        super().__init__()
        self.in_channels = int(in_channels)
        self.in_stride = int(in_stride)
        self.out_channels = int(out_channels)
        self.in_keys = list(in_keys) if in_keys else None
        self.scale_factors = tuple(float(s) for s in scale_factors)
        self.top_block = bool(top_block)
        use_bias = (norm or "").upper() in ("", "NONE")
        dim = self.in_channels
        self.level_names: list[str] = []
        for scale in self.scale_factors:
            name = _level_name(scale)
            out_dim = dim
            if scale == 4.0:
                layers: list[nn.Module] = [
                    nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2),
                    _norm(norm, dim // 2),
                    nn.GELU(),
                    nn.ConvTranspose2d(dim // 2, dim // 4, kernel_size=2, stride=2),
                ]
                out_dim = dim // 4
            elif scale == 2.0:
                layers = [nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2)]
                out_dim = dim // 2
            elif scale == 1.0:
                layers = []
            else:
                layers = [nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)]
            layers += [
                nn.Conv2d(out_dim, self.out_channels, kernel_size=1, bias=use_bias),
                _norm(norm, self.out_channels),
                nn.Conv2d(self.out_channels, self.out_channels, kernel_size=3, padding=1, bias=use_bias),
                _norm(norm, self.out_channels),
            ]
            self.add_module(f"simfp_{name[1:]}", nn.Sequential(*layers))
            self.level_names.append(name)
        strides = {n: 2 ** int(n[1:]) for n in self.level_names}
        if self.top_block:
            last = self.level_names[-1]
            strides[f"p{int(last[1:]) + 1}"] = strides[last] * 2
        self.strides: dict[str, int] = strides
        coarsest = max(strides.values())
        self.size_divisibility = pyramid_size_divisibility(self.in_stride, coarsest)
        self.exact_size_divisibility = math.lcm(self.in_stride, coarsest)

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        key = self.in_keys[-1] if self.in_keys else list(features)[-1]
        x = to_stride16_grid(features[key], self.in_stride)
        out = {name: getattr(self, f"simfp_{name[1:]}")(x) for name in self.level_names}
        if self.top_block:
            # detectron2 LastLevelMaxPool: a stride-2 subsample of the coarsest level
            last = self.level_names[-1]
            out[f"p{int(last[1:]) + 1}"] = F.max_pool2d(out[last], kernel_size=1, stride=2)
        return out


class MultiLevelNeck(nn.Module):
    """BEiT / mmseg ``Feature2Pyramid``: four intermediate block maps → p2..p5.

    Map ``in_keys[i]`` is rescaled by ``scale_factors[i]`` (4× = ConvT→norm→GELU→ConvT, 2× = ConvT,
    1× = identity, 0.5× = max pool); channels stay ``in_channels`` unless ``out_channels`` asks for a
    1×1 projection per level. ``norm`` defaults to BN as in BEiT's UPerNet (mmseg uses SyncBN).
    """

    def __init__(
        self,
        in_channels: int,
        in_stride: int,
        in_keys: Sequence[str],
        out_channels: int | None = None,
        scale_factors: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
        norm: str = "BN",
    ) -> None:
        super().__init__()
        if in_keys is None or len(in_keys) != len(scale_factors):
            raise ValueError(
                f"MultiLevelNeck needs one input key per scale factor {tuple(scale_factors)}, got "
                f"in_keys={in_keys}: set backbone.out_indices to {len(scale_factors)} blocks"
            )
        self.in_channels = int(in_channels)
        self.in_stride = int(in_stride)
        self.in_keys = list(in_keys)
        self.scale_factors = tuple(float(s) for s in scale_factors)
        self.out_channels = int(out_channels) if out_channels else self.in_channels
        dim = self.in_channels
        self.level_names = [_level_name(s) for s in self.scale_factors]
        if len(set(self.level_names)) != len(self.level_names):
            raise ValueError(f"repeated scale factors {self.scale_factors}")
        rescale: list[nn.Module] = []
        for scale in self.scale_factors:
            if scale == 4.0:
                rescale.append(
                    nn.Sequential(
                        nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2),
                        _norm(norm, dim),
                        nn.GELU(),
                        nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2),
                    )
                )
            elif scale == 2.0:
                rescale.append(nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2))
            elif scale == 1.0:
                rescale.append(nn.Identity())
            else:
                rescale.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
        self.rescale = nn.ModuleList(rescale)
        if out_channels and self.out_channels != dim:
            self.proj = nn.ModuleList(nn.Conv2d(dim, self.out_channels, 1) for _ in self.scale_factors)
        else:
            self.proj = None
        # ordered p2..p5 whatever order the scale factors were given in
        order = sorted(range(len(self.level_names)), key=lambda i: int(self.level_names[i][1:]))
        self._order = order
        self.strides: dict[str, int] = {self.level_names[i]: 2 ** int(self.level_names[i][1:]) for i in order}
        coarsest = max(self.strides.values())
        self.size_divisibility = pyramid_size_divisibility(self.in_stride, coarsest)
        self.exact_size_divisibility = math.lcm(self.in_stride, coarsest)

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for i in self._order:
            x = self.rescale[i](to_stride16_grid(features[self.in_keys[i]], self.in_stride))
            if self.proj is not None:
                x = self.proj[i](x)
            out[self.level_names[i]] = x
        return out


__all__ = ["MultiLevelNeck", "SimpleFeaturePyramid", "pyramid_size_divisibility", "to_stride16_grid"]
