"""torchvision detectors (Faster / Mask R-CNN, RetinaNet, FCOS) on the SigLIP 2 simple feature pyramid.

The detectors are torchvision's own; this module only adapts them to a plain ViT (ViTDet, Li et al.
2022): the backbone is SigLIP2Backbone + SimpleFeaturePyramid, anchors and RoI poolers are derived
from the pyramid's strides (never hard-coded, never inferred from the images seen), torchvision's
internal transform neither normalises a second time nor resizes against our LSJ pipeline, and
padding follows what the neck needs.

Conventions:
- inputs are already normalised with the backbone's mean/std (our data pipeline), so torchvision's
  transform gets mean 0 / std 1;
- in training the images are the pipeline's fixed-size crops (torchvision's resize is skipped); in
  evaluation the original image is resized so its longest side is the configured size S and, under
  the default ``test_protocol="vitdet"``, padded bottom/right to the S×S training size (detectron2
  ViTDet's ``ResizeShortestEdge(S, max_size=S)`` + ``square_pad=S``), so the backbone sees the size
  it was trained at and its position table is never resampled; ``"long_side"`` pads only to the
  pyramid's divisibility (torchvision's batching). Predictions are mapped back to original pixels;
- every pad is 0 on normalised images (the mean colour), the same rule as the training pipeline;
- the R-CNN RPN head has ``rpn_conv_depth`` 3×3 convs: 2 in ViTDet (detectron2
  ``StandardRPNHead(conv_dims=[-1, -1])``, what the task configs use), 1 in torchvision (the
  default here, so checkpoints written before the option existed rebuild as they were trained);
- the task's labels are contiguous 0..K-1; R-CNNs reserve 0 for background, so the task shifts labels
  by ``detector.label_offset`` (1 for R-CNNs, 0 for RetinaNet / FCOS) on the way in and out;
- head outputs are fp32 even under bf16 autocast (see :func:`keep_head_outputs_fp32`).
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.poolers import initLevelMapper

from siglip_dense.evaluation.deferred import eval_checks_deferred
from siglip_dense.models.necks import pyramid_size_divisibility

DETECTORS = ("faster_rcnn", "mask_rcnn", "retinanet", "fcos")
TEST_PROTOCOLS = ("vitdet", "long_side")
# anchor size = base · stride · 2^(i / scales_per_octave): detectron2 (R-CNN 32 px at stride 4),
# RetinaNet (32 px at stride 8, 3 octave scales), FCOS (one point per location, size = stride)
DEFAULT_ANCHORS: dict[str, dict[str, Any]] = {
    "faster_rcnn": {"anchor_scale": 8.0, "scales_per_octave": 1, "aspect_ratios": (0.5, 1.0, 2.0)},
    "mask_rcnn": {"anchor_scale": 8.0, "scales_per_octave": 1, "aspect_ratios": (0.5, 1.0, 2.0)},
    "retinanet": {"anchor_scale": 4.0, "scales_per_octave": 3, "aspect_ratios": (0.5, 1.0, 2.0)},
    "fcos": {"anchor_scale": 1.0, "scales_per_octave": 1, "aspect_ratios": (1.0,)},
}


def norm_layer(kind: str | None) -> Any:
    """A ``norm_layer(channels)`` factory for torchvision heads: LN (ViTDet), GN(32), BN, or none."""
    kind = (kind or "").upper()
    if kind == "LN":
        return LayerNorm2d
    if kind == "GN":
        return lambda c: nn.GroupNorm(32 if c % 32 == 0 else math.gcd(c, 32), c)
    if kind == "BN":
        return nn.BatchNorm2d
    if kind in ("", "NONE"):
        return None
    raise ValueError(f"unknown head norm {kind!r}: use 'LN', 'GN', 'BN' or ''")


class PyramidBackbone(nn.Module):
    """SigLIP2Backbone + neck (+ RetinaNet's P6/P7) as torchvision wants a backbone.

    Returns an ``OrderedDict`` of the chosen ``levels`` (finest first) and exposes ``out_channels``;
    ``strides`` are the nominal ones the neck promises, ``size_divisibility`` what the padding needs.
    """

    def __init__(
        self,
        body: nn.Module,
        neck: nn.Module,
        levels: Sequence[str] | None = None,
        extra_levels: str = "none",
    ) -> None:
        super().__init__()
        self.body = body
        self.neck = neck
        neck_strides = dict(neck.strides)
        levels = list(levels) if levels else list(neck_strides)
        unknown = [lv for lv in levels if lv not in neck_strides]
        if unknown:
            raise ValueError(
                f"detector levels {unknown} are not produced by the neck (it gives {list(neck_strides)}); "
                "change the neck's scale_factors / top_block or the detector's levels"
            )
        levels = sorted(levels, key=lambda n: neck_strides[n])
        self.levels = levels
        self.out_channels = int(neck.out_channels)
        strides = OrderedDict((n, int(neck_strides[n])) for n in levels)
        if extra_levels not in ("none", "p6p7"):
            raise ValueError(f"extra_levels must be 'none' or 'p6p7', got {extra_levels!r}")
        self.extra_levels = extra_levels
        if extra_levels == "p6p7":
            last = levels[-1]
            k = int(last[1:])
            if any(f"p{k + i}" in neck_strides for i in (1, 2)):
                raise ValueError(f"extra_levels='p6p7' after {last}, but the neck already makes p{k + 1}")
            self.p6 = nn.Conv2d(self.out_channels, self.out_channels, 3, 2, 1)
            self.p7 = nn.Conv2d(self.out_channels, self.out_channels, 3, 2, 1)
            for m in (self.p6, self.p7):  # torchvision's LastLevelP6P7 init
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.constant_(m.bias, 0)
            strides[f"p{k + 1}"] = strides[last] * 2
            strides[f"p{k + 2}"] = strides[last] * 4
            self._extra_names = (f"p{k + 1}", f"p{k + 2}")
        self.strides: OrderedDict[str, int] = strides
        in_stride = int(getattr(neck, "in_stride", getattr(body, "patch_size", 16)))
        self.size_divisibility = pyramid_size_divisibility(in_stride, max(strides.values()))

    @property
    def names(self) -> list[str]:
        return list(self.strides)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        feats = self.neck(self.body(x))
        out = OrderedDict((n, feats[n]) for n in self.levels)
        if self.extra_levels == "p6p7":
            p6 = self.p6(out[self.levels[-1]])
            out[self._extra_names[0]] = p6
            out[self._extra_names[1]] = self.p7(F.relu(p6))
        return out

    def freeze(self, num_blocks: int | None = None) -> None:
        """Freeze the SigLIP body (DenseTask.finish_init calls ``model.backbone.freeze``)."""
        self.body.freeze(num_blocks)


class NominalStrideAnchorGenerator(AnchorGenerator):
    """torchvision's AnchorGenerator with the pyramid's nominal strides.

    torchvision infers a level's stride as ``padded_size // grid``, which is wrong whenever the padded
    size is not a multiple of the stride (patch-14 backbones: a 518 input has a 130-cell p2 grid, and
    518 // 130 = 3, not 4). The neck guarantees the nominal strides, so use them. Anchors are fp32
    (fp64 for fp64 features) whatever the features' dtype (bf16 under autocast).
    """

    def __init__(
        self,
        sizes: Sequence[Sequence[float]],
        aspect_ratios: Sequence[Sequence[float]],
        strides: Sequence[int],
    ) -> None:
        super().__init__(tuple(tuple(s) for s in sizes), tuple(tuple(a) for a in aspect_ratios))
        if len(strides) != len(self.sizes):
            raise ValueError(f"{len(self.sizes)} anchor size tuples for {len(strides)} strides")
        self.strides = [int(s) for s in strides]

    def forward(self, image_list: ImageList, feature_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(feature_maps) != len(self.strides):
            raise ValueError(
                f"anchor generator built for {len(self.strides)} levels got {len(feature_maps)} feature maps"
            )
        grid_sizes = [fm.shape[-2:] for fm in feature_maps]
        # fp32 (or wider) whatever the features' dtype: bf16 anchors would round coordinates to 2-4 px
        # above 256 px, and set_cell_anchors keeps the dtype it is given for every later call
        dtype = torch.promote_types(feature_maps[0].dtype, torch.float32)
        device = feature_maps[0].device
        strides = [
            [
                torch.tensor(s, dtype=torch.int64, device=device),
                torch.tensor(s, dtype=torch.int64, device=device),
            ]
            for s in self.strides
        ]
        self.set_cell_anchors(dtype, device)
        per_level = self.grid_anchors(grid_sizes, strides)
        flat = torch.cat(per_level)
        return [flat for _ in range(len(image_list.image_sizes))]


class NominalStrideRoIAlign(MultiScaleRoIAlign):
    """torchvision's MultiScaleRoIAlign with its scales fixed by the pyramid's nominal strides.

    torchvision infers ``scales`` (and the FPN level mapper) from the first call's feature and image
    sizes and keeps them (they are not in the state dict): with the ViTDet square pad, a landscape
    first image gives scales 2× (or more) off for the model's lifetime. Here they are ``1 / stride`` from
    construction and restored before every call, never read from data. The level mapper is FPN's
    eq. 1 (canonical box 224 px at level 4), as torchvision's and detectron2's ``ROIPooler``.

    Raises:
        ValueError: strides that are not powers of two doubling from one level to the next (the
            level mapper indexes levels by ``log2(stride)``, so a gap would pool from no level).
    """

    def __init__(
        self,
        featmap_names: Sequence[str],
        strides: Sequence[int],
        output_size: int,
        sampling_ratio: int,
    ) -> None:
        super().__init__(list(featmap_names), output_size, sampling_ratio)
        strides = [int(s) for s in strides]
        if len(strides) != len(featmap_names):
            raise ValueError(f"{len(featmap_names)} RoI levels {list(featmap_names)} for strides {strides}")
        log2 = [math.log2(s) if s > 0 else math.nan for s in strides]
        if any(not v.is_integer() for v in log2) or any(b - a != 1 for a, b in zip(log2, log2[1:])):
            raise ValueError(
                f"roi_levels {list(featmap_names)} have strides {strides}: RoI pooling needs consecutive "
                "pyramid levels (strides doubling, e.g. p2..p5); set task.detector.roi_levels accordingly"
            )
        self.strides = strides
        self._nominal_scales = [1.0 / s for s in strides]
        self._nominal_mapper = initLevelMapper(int(log2[0]), int(log2[-1]))
        self.scales, self.map_levels = list(self._nominal_scales), self._nominal_mapper

    def forward(
        self, x: dict[str, torch.Tensor], boxes: list[torch.Tensor], image_shapes: list[tuple[int, int]]
    ) -> torch.Tensor:
        missing = [n for n in self.featmap_names if n not in x]
        if missing:
            raise ValueError(f"RoI pooling needs pyramid levels {missing}, the features have {list(x)}")
        self.scales, self.map_levels = list(self._nominal_scales), self._nominal_mapper
        return super().forward(x, boxes, image_shapes)

    def extra_repr(self) -> str:
        return f"strides={self.strides}"


def square_pad_size(image_size: int | Sequence[int], size_divisibility: int) -> int:
    """ViTDet's ``square_pad``: the training size's long side, rounded up to the divisibility."""
    side = int(max(image_size)) if isinstance(image_size, (list, tuple)) else int(image_size)
    div = max(int(size_divisibility), 1)
    return int(math.ceil(side / div) * div)


class DetectorTransform(GeneralizedRCNNTransform):
    """torchvision's detector transform with the test protocol as a named option.

    Resizing is torchvision's (longest side → ``max_size`` at test time when ``min_size ==
    max_size``). Batching pads bottom/right with 0 (the mean colour on normalised inputs) to a
    multiple of ``size_divisible``; in evaluation under ``test_protocol="vitdet"`` it pads to
    ``square_size``² instead (detectron2 ViTDet ``square_pad``). ``test_protocol`` can be switched
    after construction (``set_test_protocol``): it changes no parameter.
    """

    def __init__(
        self, *args: Any, test_protocol: str = "vitdet", square_size: int = 1024, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.square_size = int(square_size)
        self.test_protocol = check_test_protocol(test_protocol)

    def set_test_protocol(self, name: str) -> None:
        self.test_protocol = check_test_protocol(name)

    def batch_images(self, images: list[torch.Tensor], size_divisible: int = 32) -> torch.Tensor:
        if self.training or self.test_protocol != "vitdet":
            return super().batch_images(images, size_divisible)
        check_square_training_size(self.min_size[-1], self.max_size, "tools/eval.py test_protocol=long_side")
        side = max([self.square_size] + [int(s) for im in images for s in im.shape[-2:]])
        side = int(math.ceil(side / size_divisible) * size_divisible)
        out = images[0].new_zeros((len(images), images[0].shape[0], side, side))
        for i, im in enumerate(images):
            out[i, :, : im.shape[-2], : im.shape[-1]].copy_(im)
        return out

    def extra_repr(self) -> str:
        return f"test_protocol={self.test_protocol!r}, square_size={self.square_size}"


def check_square_training_size(
    short: int, long: int, fix: str = "task.detector.test_protocol=long_side"
) -> None:
    """ViTDet's ``square_pad`` assumes square S×S training crops; refuse other sizes, naming the fix.

    A non-square training size has no square the evaluation could pad to that the backbone saw in
    training (and the test resize of a portrait image does not fit an H×W pad either).
    """
    if int(short) != int(long):
        raise ValueError(
            f"test_protocol='vitdet' pads evaluation images to a square of the training size "
            f"(detectron2 ViTDet square_pad), but the training size is {int(short)}×{int(long)} "
            f"(task.image_size / data.image_size not square): use a square image_size, or {fix}"
        )


def check_test_protocol(name: str) -> str:
    if name not in TEST_PROTOCOLS:
        raise ValueError(f"detector test_protocol must be one of {TEST_PROTOCOLS}, got {name!r}")
    return name


def _to_float32(module: nn.Module, args: Any, output: Any) -> Any:
    """Forward hook: head outputs (box deltas, logits) leave autocast as fp32.

    torchvision's ``BoxCoder.decode`` casts the fp32 anchors / proposals to the deltas' dtype; bf16 deltas
    would round every box coordinate to bf16 (8-bit mantissa: ~4 px steps at 1024 px).
    """
    if isinstance(output, torch.Tensor):
        return output.float()
    if isinstance(output, dict):
        return {k: _to_float32(module, args, v) for k, v in output.items()}
    if isinstance(output, (list, tuple)):
        return type(output)(_to_float32(module, args, v) for v in output)
    return output


def keep_head_outputs_fp32(model: nn.Module) -> None:
    """Hook every prediction head of a torchvision detector (RPN, box / mask predictors, one-stage head)."""
    for name in ("rpn.head", "roi_heads.box_predictor", "roi_heads.mask_predictor", "head"):
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        if module is not None:
            module.register_forward_hook(_to_float32)


def anchor_sizes_for(
    strides: Sequence[int], anchor_scale: float, scales_per_octave: int
) -> list[tuple[float, ...]]:
    """Per-level anchor sizes ``anchor_scale · stride · 2^(i / scales_per_octave)``."""
    n = max(int(scales_per_octave), 1)
    return [tuple(float(anchor_scale * s * 2 ** (i / n)) for i in range(n)) for s in strides]


def build_anchor_generator(
    strides: Sequence[int],
    anchor_sizes: Sequence[Sequence[float]] | None,
    aspect_ratios: Sequence[float] | Sequence[Sequence[float]],
    anchor_scale: float,
    scales_per_octave: int,
    same_count: bool = False,
) -> NominalStrideAnchorGenerator:
    """Anchors derived from the levels; any explicit sizes / ratios must match the level count."""
    n = len(strides)
    sizes = (
        [tuple(s) for s in anchor_sizes]
        if anchor_sizes
        else anchor_sizes_for(strides, anchor_scale, scales_per_octave)
    )
    if len(sizes) != n:
        raise ValueError(
            f"anchor_sizes has {len(sizes)} entries but the detector sees {n} pyramid levels "
            f"(strides {list(strides)}): give one tuple of sizes per level"
        )
    if aspect_ratios and isinstance(aspect_ratios[0], (list, tuple)):
        ratios = [tuple(float(r) for r in a) for a in aspect_ratios]  # type: ignore[union-attr]
        if len(ratios) != n:
            raise ValueError(
                f"aspect_ratios has {len(ratios)} per-level entries but the detector sees {n} levels"
            )
    else:
        ratios = [tuple(float(r) for r in aspect_ratios)] * n  # type: ignore[arg-type]
    counts = {len(s) * len(r) for s, r in zip(sizes, ratios)}
    if same_count and len(counts) != 1:
        raise ValueError(
            f"every level needs the same number of anchors for a shared head, got {sorted(counts)}"
        )
    return NominalStrideAnchorGenerator(sizes, ratios, list(strides))


# constructor options that only one family understands: a config written for one detector (the toy
# experiment's R-CNN settings) still builds another after ``task=det_fcos``, with a warning
_RCNN_ONLY = ("rpn_", "box_", "bbox_reg_weights")
_ONE_STAGE_ONLY = (
    "score_thresh",
    "nms_thresh",
    "detections_per_img",
    "topk_candidates",
    "center_sampling_radius",
    "fg_iou_thresh",
    "bg_iou_thresh",
    "proposal_matcher",
)


def _drop_other_family_kwargs(kind: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    one_stage = kind in ("retinanet", "fcos")
    foreign = [k for k in kwargs if (k.startswith(_RCNN_ONLY) if one_stage else k in _ONE_STAGE_ONLY)]
    if foreign:
        warnings.warn(f"{kind} ignores options of the other detector family: {sorted(foreign)}", stacklevel=3)
    return {k: v for k, v in kwargs.items() if k not in foreign}


def build_detector(
    kind: str,
    body: nn.Module,
    neck: nn.Module,
    num_classes: int,
    image_size: int | Sequence[int] = 1024,
    levels: Sequence[str] | None = None,
    extra_levels: str = "none",
    roi_levels: Sequence[str] | None = None,
    anchor_sizes: Sequence[Sequence[float]] | None = None,
    aspect_ratios: Sequence[float] | Sequence[Sequence[float]] | None = None,
    anchor_scale: float | None = None,
    scales_per_octave: int | None = None,
    box_head: str = "4conv1fc",
    head_norm: str = "LN",
    representation_size: int = 1024,
    mask_head_channels: int = 256,
    sampling_ratio: int = 0,
    rpn_conv_depth: int = 1,
    test_protocol: str = "vitdet",
    **detector_kwargs: Any,
) -> nn.Module:
    """One of ``DETECTORS`` on ``body`` (SigLIP2Backbone) + ``neck``; every level mismatch raises here.

    ``levels``: neck levels fed to the detector (default: all). ``extra_levels='p6p7'`` adds
    RetinaNet's convolutional P6/P7 after the last one. ``roi_levels``: R-CNN RoI pooling levels
    (default: those with stride ≤ 32, i.e. p2..p5; p6 only feeds the RPN, as in detectron2).
    ``box_head``: ``4conv1fc`` (ViTDet, convs normed by ``head_norm``) or ``2fc`` (torchvision's
    TwoMLPHead). ``rpn_conv_depth``: 3×3 convs in the RPN head (ViTDet 2, torchvision 1).
    ``test_protocol``: ``vitdet`` (square pad to the training size) or ``long_side`` (pad to the
    divisibility), see :class:`DetectorTransform`. Remaining kwargs go to the torchvision
    constructor (score thresholds, sampling sizes).
    """
    check_test_protocol(test_protocol)
    if int(rpn_conv_depth) < 1:
        raise ValueError(f"rpn_conv_depth must be >= 1, got {rpn_conv_depth}")
    if kind not in DETECTORS:
        raise ValueError(f"unknown detector {kind!r}; choose one of {DETECTORS}")
    detector_kwargs = _drop_other_family_kwargs(kind, detector_kwargs)
    if num_classes < 1:
        raise ValueError(f"num_classes must be ≥ 1, got {num_classes}")
    backbone = PyramidBackbone(body, neck, levels, extra_levels)
    names, strides = backbone.names, list(backbone.strides.values())
    defaults = DEFAULT_ANCHORS[kind]
    anchors = build_anchor_generator(
        strides,
        anchor_sizes,
        aspect_ratios if aspect_ratios is not None else defaults["aspect_ratios"],
        float(anchor_scale if anchor_scale is not None else defaults["anchor_scale"]),
        int(scales_per_octave if scales_per_octave is not None else defaults["scales_per_octave"]),
        same_count=True,
    )
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    common = dict(
        min_size=int(min(image_size)),
        max_size=int(max(image_size)),
        image_mean=[0.0, 0.0, 0.0],  # inputs arrive normalised by our pipeline
        image_std=[1.0, 1.0, 1.0],
        size_divisible=backbone.size_divisibility,
        _skip_resize=True,  # training crops are already the configured size (LSJ)
    )
    ch = backbone.out_channels
    num_anchors = anchors.num_anchors_per_location()[0]
    if kind in ("retinanet", "fcos"):
        if kind == "retinanet":
            head = RetinaNetHead(ch, num_anchors, num_classes, norm_layer=norm_layer(head_norm))
            model: nn.Module = RetinaNet(
                backbone, num_classes, anchor_generator=anchors, head=head, **common, **detector_kwargs
            )
        else:
            if num_anchors != 1:
                raise ValueError(f"FCOS predicts one point per location, got {num_anchors} anchors per level")
            head = FCOSHead(ch, num_anchors, num_classes)
            model = FCOS(
                backbone, num_classes, anchor_generator=anchors, head=head, **common, **detector_kwargs
            )
        model.label_offset = 0
        model.has_masks = False
        model.kind = kind
        _install_transform(model, common, test_protocol, image_size, backbone.size_divisibility)
        keep_head_outputs_fp32(model)
        return model

    roi_levels = list(roi_levels) if roi_levels else [n for n in names if backbone.strides[n] <= 32]
    bad = [lv for lv in roi_levels if lv not in names]
    if bad or not roi_levels:
        raise ValueError(f"roi_levels {roi_levels} must be a non-empty subset of the detector levels {names}")
    roi_levels = sorted(roi_levels, key=lambda n: backbone.strides[n])  # the order the features come in
    roi_strides = [backbone.strides[n] for n in roi_levels]
    box_pool = NominalStrideRoIAlign(roi_levels, roi_strides, output_size=7, sampling_ratio=sampling_ratio)
    nl = norm_layer(head_norm)
    if box_head == "4conv1fc":
        head_module: nn.Module = FastRCNNConvFCHead(
            (ch, 7, 7), [ch] * 4, [representation_size], norm_layer=nl
        )
    elif box_head == "2fc":
        head_module = TwoMLPHead(ch * 7 * 7, representation_size)
    else:
        raise ValueError(f"box_head must be '4conv1fc' or '2fc', got {box_head!r}")
    predictor = FastRCNNPredictor(representation_size, num_classes + 1)
    rpn_head = RPNHead(ch, num_anchors, conv_depth=int(rpn_conv_depth))
    rpn_kwargs = {
        "rpn_anchor_generator": anchors,
        "rpn_head": rpn_head,
        "box_roi_pool": box_pool,
        "box_head": head_module,
    }
    if kind == "faster_rcnn":
        model = FasterRCNN(backbone, None, box_predictor=predictor, **rpn_kwargs, **common, **detector_kwargs)
        model.has_masks = False
    else:
        mask_pool = NominalStrideRoIAlign(
            roi_levels, roi_strides, output_size=14, sampling_ratio=sampling_ratio
        )
        mask_head = MaskRCNNHeads(ch, [mask_head_channels] * 4, 1, norm_layer=nl)
        mask_predictor = MaskRCNNPredictor(mask_head_channels, mask_head_channels, num_classes + 1)
        model = MaskRCNN(
            backbone,
            None,
            box_predictor=predictor,
            mask_roi_pool=mask_pool,
            mask_head=mask_head,
            mask_predictor=mask_predictor,
            **rpn_kwargs,
            **common,
            **detector_kwargs,
        )
        model.has_masks = True
    # RPN: one objectness/box head shared by all levels — same anchor count per level checked above
    model.label_offset = 1  # R-CNN class 0 is background
    model.kind = kind
    _install_transform(model, common, test_protocol, image_size, backbone.size_divisibility)
    keep_head_outputs_fp32(model)
    return model


def _install_transform(
    model: nn.Module, common: dict[str, Any], protocol: str, image_size: Sequence[int], div: int
) -> None:
    """Replace torchvision's transform by :class:`DetectorTransform` (same settings, no parameters)."""
    if protocol == "vitdet" and not eval_checks_deferred():  # a checkpoint: checked when evaluated
        check_square_training_size(min(image_size), max(image_size))
    model.transform = DetectorTransform(
        common["min_size"],
        common["max_size"],
        common["image_mean"],
        common["image_std"],
        size_divisible=common["size_divisible"],
        _skip_resize=common["_skip_resize"],
        test_protocol=protocol,
        square_size=square_pad_size(image_size, div),
    )


__all__ = [
    "DETECTORS",
    "TEST_PROTOCOLS",
    "DetectorTransform",
    "NominalStrideAnchorGenerator",
    "NominalStrideRoIAlign",
    "PyramidBackbone",
    "anchor_sizes_for",
    "build_anchor_generator",
    "build_detector",
    "keep_head_outputs_fp32",
    "norm_layer",
    "square_pad_size",
]
