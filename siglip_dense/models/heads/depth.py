"""Depth heads on ViT block maps: DPT (Ranftl et al. 2021) and the DINOv2 linear-bins probe.

Heads take ``in_channels`` (the block maps' width), ``in_keys`` (which maps to read), ``min_depth`` /
``max_depth`` (metres), and return a positive B×1×h×w depth map at some stride; :class:`DepthModel`
upsamples it to the input size. Patch size is a parameter: a stride-14 token grid is first resized
to the stride-16 grid (the necks' patch-14 rule), so the DPT levels are at strides 4/8/16/32 for any
patch size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from siglip_dense.models.dense_model import DenseModel
from siglip_dense.models.heads.base import BaseDecodeHead, BatchNorm2d
from siglip_dense.models.necks import to_stride16_grid

DEPTH_ACTIVATIONS = ("sigmoid", "softplus", "relu")


def depth_activation(x: torch.Tensor, kind: str, min_depth: float, max_depth: float) -> torch.Tensor:
    """Raw output → positive metres: ``sigmoid`` × max_depth (Depth Anything metric), or softplus / relu."""
    if kind == "sigmoid":
        return torch.sigmoid(x) * max_depth
    if kind == "softplus":
        return F.softplus(x) + min_depth
    if kind == "relu":
        return F.relu(x) + min_depth
    raise ValueError(f"unknown depth activation {kind!r}: use one of {DEPTH_ACTIVATIONS}")


# ---------------------------------------------------------------------------------------------
# DPT
# ---------------------------------------------------------------------------------------------
class ResidualConvUnit(nn.Module):
    """DPT's pre-activation residual unit: ReLU → 3×3 conv (→ BN) → ReLU → 3×3 conv (→ BN), + input."""

    def __init__(self, channels: int, use_bn: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=not use_bn)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=not use_bn)
        self.bn1 = BatchNorm2d(channels) if use_bn else nn.Identity()
        self.bn2 = BatchNorm2d(channels) if use_bn else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(self.conv1(F.relu(x)))
        out = self.bn2(self.conv2(F.relu(out)))
        return out + x


class FeatureFusionBlock(nn.Module):
    """RefineNet-style fusion: add the refined skip, refine, upsample (to the next level), 1×1 conv.

    ``with_skip=False`` for the top block, which has no skip: DPT builds a skip unit there that never
    runs, and a parameter without gradient makes DDP fail unless it searches for unused parameters.
    """

    def __init__(self, channels: int, use_bn: bool = False, with_skip: bool = True) -> None:
        super().__init__()
        self.res1 = ResidualConvUnit(channels, use_bn) if with_skip else None
        self.res2 = ResidualConvUnit(channels, use_bn)
        self.out_conv = nn.Conv2d(channels, channels, 1)

    def forward(
        self, x: torch.Tensor, skip: torch.Tensor | None = None, size: Sequence[int] | None = None
    ) -> torch.Tensor:
        if skip is not None:
            if self.res1 is None:
                raise ValueError("this fusion block was built without a skip unit (with_skip=False)")
            if skip.shape[-2:] != x.shape[-2:]:
                x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=True)
            x = x + self.res1(skip)
        x = self.res2(x)
        size = tuple(size) if size is not None else (x.shape[-2] * 2, x.shape[-1] * 2)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        return self.out_conv(x)


def _drop_top_skip_unit(module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """Checkpoints written while the top fusion block still had its never-run skip unit load as-is."""
    for key in [k for k in state_dict if k.startswith(f"{prefix}refinenets.3.res1.")]:
        del state_dict[key]


class DPTHead(nn.Module):
    """DPT decoder on four intermediate block maps (no class token: SigLIP has none).

    Reassemble: per map a 1×1 projection to ``out_channels[i]``, then ×4 (ConvT), ×2 (ConvT), ×1,
    ×½ (3×3 stride-2 conv) → strides 4/8/16/32 of the stride-16 grid; a 3×3 conv to ``features``;
    RefineNet fusion top-down; output conv → upsample to the (padded) input grid ``h·p × w·p`` → 3×3
    conv → ReLU → 1×1 conv → positive depth (Depth Anything's head layout).
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
        activation: str = "sigmoid",
        min_depth: float = 1e-3,
        max_depth: float = 10.0,
    ) -> None:
        super().__init__()
        if in_keys is None or len(in_keys) != 4 or len(out_channels) != 4:
            raise ValueError(
                f"DPTHead reads 4 block maps, got in_keys={in_keys} and out_channels={tuple(out_channels)}: "
                "set backbone.out_indices to 4 blocks"
            )
        if activation not in DEPTH_ACTIVATIONS:
            raise ValueError(f"unknown depth activation {activation!r}: use one of {DEPTH_ACTIVATIONS}")
        self.in_keys = list(in_keys)
        self.patch_size = int(patch_size)
        self.activation = activation
        self.min_depth, self.max_depth = float(min_depth), float(max_depth)
        oc = [int(c) for c in out_channels]
        self.projects = nn.ModuleList(nn.Conv2d(int(in_channels), c, 1) for c in oc)
        self.resize_layers = nn.ModuleList(
            [
                nn.ConvTranspose2d(oc[0], oc[0], kernel_size=4, stride=4),
                nn.ConvTranspose2d(oc[1], oc[1], kernel_size=2, stride=2),
                nn.Identity(),
                nn.Conv2d(oc[3], oc[3], kernel_size=3, stride=2, padding=1),
            ]
        )
        self.layer_rn = nn.ModuleList(nn.Conv2d(c, features, 3, padding=1, bias=False) for c in oc)
        self.refinenets = nn.ModuleList(
            FeatureFusionBlock(features, use_bn, with_skip=i < 3) for i in range(4)
        )
        self.output_conv1 = nn.Conv2d(features, features // 2, 3, padding=1)
        self.output_conv2 = nn.Sequential(
            nn.Conv2d(features // 2, head_channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(head_channels, 1, 1),
        )
        self.register_load_state_dict_pre_hook(_drop_top_skip_unit)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return depth_activation(self.decode_raw(features), self.activation, self.min_depth, self.max_depth)

    def decode_raw(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """The decoder up to the last 1×1 conv, before the depth activation (the normals DPT reuses it)."""
        maps = [features[k] for k in self.in_keys]
        h, w = maps[0].shape[-2:]
        layers = []
        for i, x in enumerate(maps):
            x = to_stride16_grid(x, self.patch_size)
            layers.append(self.layer_rn[i](self.resize_layers[i](self.projects[i](x))))
        l1, l2, l3, l4 = layers
        path = self.refinenets[3](l4, size=l3.shape[-2:])
        path = self.refinenets[2](path, l3, size=l2.shape[-2:])
        path = self.refinenets[1](path, l2, size=l1.shape[-2:])
        path = self.refinenets[0](path, l1)
        out = self.output_conv1(path)
        out = F.interpolate(
            out, size=(h * self.patch_size, w * self.patch_size), mode="bilinear", align_corners=True
        )
        return self.output_conv2(out)


# ---------------------------------------------------------------------------------------------
# linear probe with depth bins (DINOv2 lin.1 / lin.4)
# ---------------------------------------------------------------------------------------------
class LinearBinsHead(BaseDecodeHead):
    """DINOv2's linear depth probe: BN + 1×1 conv to ``num_bins`` logits, ×``upsample`` bilinear,
    normalised ("linear": ReLU + 0.1, divided by the sum — AdaBins; or "softmax") and averaged over
    bin centres uniformly spaced in ``[min_depth, max_depth]``.

    lin.1 reads one block, lin.4 concatenates four (``in_keys``, ``resize_concat`` to the first map's
    size); ``concat_pooled`` appends each map's mean token in place of DINOv2's class token. The 1×1
    conv ``conv_depth`` (the base's classifier, MMSeg init) is applied before the ×4 upsampling
    (DINOv2 upsamples the features first): both are per-pixel affine and commute with bilinear
    resizing, so eval outputs are the same at 1/16 of the memory.
    """

    classifier_name = "conv_depth"

    def __init__(
        self,
        in_channels: int | Sequence[int],
        in_keys: Sequence[str] | None = None,
        num_bins: int = 256,
        norm: str = "linear",
        use_bn: bool = True,
        concat_pooled: bool = True,
        upsample: int = 4,
        min_depth: float = 1e-3,
        max_depth: float = 10.0,
    ) -> None:
        if norm not in ("linear", "softmax"):
            raise ValueError(f"unknown bins normalisation {norm!r}: use 'linear' or 'softmax'")
        super().__init__(
            in_channels,
            channels=None,
            num_classes=num_bins,
            in_keys=in_keys,
            input_transform="resize_concat",
            dropout_ratio=0.0,
            concat_pooled=concat_pooled,
        )
        self.norm = norm
        self.upsample = int(upsample)
        self.min_depth, self.max_depth = float(min_depth), float(max_depth)
        self.bn = self.input_batch_norm() if use_bn else nn.Identity()
        self.register_buffer(
            "bins", torch.linspace(self.min_depth, self.max_depth, int(num_bins)), persistent=False
        )

    @property
    def feat_channels(self) -> int:
        """Width of the concatenated features (kept from before the base; equals ``channels``)."""
        return self.channels

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self.cls_seg(self.bn(self._transform_inputs(features)))
        if self.upsample > 1:
            logits = F.interpolate(logits, scale_factor=self.upsample, mode="bilinear", align_corners=False)
        logits = logits.float()
        if self.norm == "linear":
            weights = F.relu(logits) + 0.1
            weights = weights / weights.sum(dim=1, keepdim=True)
        else:
            weights = torch.softmax(logits, dim=1)
        return torch.einsum("bkhw,k->bhw", weights, self.bins.float())[:, None]


# ---------------------------------------------------------------------------------------------
# backbone → (neck) → head → depth at the input size
# ---------------------------------------------------------------------------------------------
class DepthModel(DenseModel):
    """A depth estimator: inputs of any size are zero-padded bottom/right to the patch (or neck)
    multiple, and the depth is upsampled bilinearly to the padded size and cropped back."""

    def __init__(self, backbone: nn.Module, head: nn.Module, neck: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.head = head

    def decode(
        self, backbone_feats: dict[str, torch.Tensor], padded_size: Sequence[int], size: Sequence[int]
    ) -> dict[str, torch.Tensor]:
        """Backbone maps of a padded batch → (neck →) head → depth at the unpadded ``size``.

        ``forward`` is ``decode(backbone(pad_input(images)), padded size, input size)``; a caller that
        runs one backbone pass for several heads (multi-task training) calls the pieces itself.
        """
        h, w = int(size[0]), int(size[1])
        padded = (int(padded_size[0]), int(padded_size[1]))
        feats = self.neck(backbone_feats) if self.neck is not None else backbone_feats
        depth = self.head(feats)
        if tuple(depth.shape[-2:]) != padded:
            depth = F.interpolate(depth.float(), size=padded, mode="bilinear", align_corners=False)
        return {"depth": depth[..., :h, :w]}


__all__ = ["DPTHead", "DepthModel", "FeatureFusionBlock", "LinearBinsHead", "depth_activation"]
