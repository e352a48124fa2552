"""A small base for decode heads with MMSeg's ``BaseDecodeHead`` contract (our own code, same names).

MMSeg's heads read a tuple of maps; ours read a dict of named NCHW maps (``blocks.11``, ``p2`` …), so
the selection is by name (``in_keys``) or, as in MMSeg, by position (``in_index``) in the dict's
order. What the base does for every head:

- input selection and ``input_transform``: ``None`` (one map), ``"resize_concat"`` (bilinear-resize
  every map to the first one's size, concatenate on channels) or ``"multiple_select"`` (a list);
- ``in_channels``: one int (every level has that width — the usual case on a plain ViT) or a
  per-level list; after ``resize_concat`` :attr:`in_channels` is their sum, as in MMSeg;
- the classifier, a 1×1 conv from ``channels`` to ``num_classes`` named ``conv_seg`` (a subclass may
  rename it through :attr:`classifier_name`, e.g. the depth-bins head's ``conv_depth``), with PyTorch's
  default init, or MMSeg's with ``init_std=0.01`` (``init_cfg=dict(type="Normal", std=0.01,
  override=dict(name="conv_seg"))``: weight ~ N(0, 0.01²), bias 0), with ``Dropout2d(dropout_ratio)``
  before it;
- ``concat_pooled`` (DINOv2's linear probes, not MMSeg): ``resize_concat`` also appends each map's
  global average broadcast over the grid, in place of a class token (SigLIP has none).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

InputTransform = Literal["resize_concat", "multiple_select"] | None
INPUT_TRANSFORMS = (None, "resize_concat", "multiple_select")


def resize(x: torch.Tensor, size: Sequence[int], align_corners: bool = False) -> torch.Tensor:
    """Bilinear resize of an N×C×H×W map to ``size`` (H, W); a no-op when it already has that size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)


def resize_concat(
    maps: Sequence[torch.Tensor], align_corners: bool = False, concat_pooled: bool = False
) -> torch.Tensor:
    """Resize every map to the first one's H×W and concatenate on channels (MMSeg ``resize_concat``).

    With ``concat_pooled`` each map is followed by its spatial mean broadcast to H×W (DINOv2's linear
    probes' class-token stand-in), so the output has ``2 · Σ Cᵢ`` channels instead of ``Σ Cᵢ``.
    """
    size = maps[0].shape[-2:]
    parts = []
    for m in maps:
        m = resize(m, size, align_corners)
        parts.append(m)
        if concat_pooled:
            parts.append(m.mean(dim=(2, 3), keepdim=True).expand_as(m))
    return torch.cat(parts, dim=1)


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that also trains where a batch holds one value per channel (a batch of one).

    Batch statistics need several values per channel. A 1×1 map of a single image (UPerNet's
    pyramid pooling at scale 1) has one: torch raises "Expected more than 1 value per channel when
    training". Channels that carry one value per image broadcast over the map (``pooled_channels``:
    the linear probes' ``concat_pooled`` averages) have one per image: at batch 1 their variance is
    0, so training erases them and drives their running variance to 0. Those channels are normalised
    per sample with the running statistics, which they leave unchanged (as in evaluation; the rule
    of detectron2's ``FrozenBatchNorm2d``); every other case is ``nn.BatchNorm2d``'s, with the same
    outputs, running-statistic updates and state-dict keys. ``trainer.sync_batchnorm`` (several
    devices) replaces it with torch's ``SyncBatchNorm``, whose statistics span the devices.
    """

    def __init__(
        self, num_features: int, pooled_channels: Sequence[bool] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(num_features, **kwargs)
        pooled = [False] * num_features if pooled_channels is None else [bool(p) for p in pooled_channels]
        if len(pooled) != num_features:
            raise ValueError(f"pooled_channels has {len(pooled)} entries for {num_features} channels")
        self.has_pooled = any(pooled)
        # not persistent: the state-dict keys stay nn.BatchNorm2d's
        self.register_buffer("pooled_channels", torch.tensor(pooled, dtype=torch.bool), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.track_running_stats) or x.ndim != 4:
            return super().forward(x)
        b, _, h, w = x.shape
        if b * h * w == 1:
            return self._per_sample(x, self.running_mean, self.running_var)
        if b != 1 or not self.has_pooled:
            return super().forward(x)
        running = (self.running_mean.clone(), self.running_var.clone())
        out = super().forward(x)
        pooled = self.pooled_channels
        with torch.no_grad():  # the pooled channels' statistics stay as they were
            self.running_mean.copy_(torch.where(pooled, running[0], self.running_mean))
            self.running_var.copy_(torch.where(pooled, running[1], self.running_var))
        return torch.where(pooled.view(1, -1, 1, 1), self._per_sample(x, *running), out)

    def _per_sample(self, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, self.eps)


def init_classifier(conv: nn.Conv2d, std: float = 0.01) -> None:
    """MMSeg's classifier init: weight ~ N(0, std²), bias 0 (``normal_init(conv_seg, std=0.01)``)."""
    nn.init.normal_(conv.weight, mean=0.0, std=std)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def _as_list(x: int | str | Sequence[int] | Sequence[str] | None) -> list | None:
    if x is None:
        return None
    return [x] if isinstance(x, (int, str)) else list(x)


class BaseDecodeHead(nn.Module):
    """Input selection/transform + dropout + classifier shared by decode heads (see the module doc).

    Args:
        in_channels: width of each selected map, one int for all or a per-level list.
        channels: width of the features given to :meth:`cls_seg` (the classifier's input);
            ``None`` means the transformed input's width (a linear probe: no layers in between).
        num_classes: classifier outputs (classes, or depth bins).
        in_keys: names of the maps to read; ``None`` reads by ``in_index``, or else all maps of the
            input, which must then be as many as the head was built for.
        in_index: positions (in the input dict's order) of the maps to read, MMSeg's selection.
        input_transform: ``None`` | ``"resize_concat"`` | ``"multiple_select"``.
        dropout_ratio: ``Dropout2d`` probability before the classifier (0 → none).
        align_corners: for every bilinear resize in the head.
        concat_pooled: with ``resize_concat``, append each map's spatial mean (DINOv2 linear probes).

    Raises:
        ValueError: unknown ``input_transform``; ``in_keys`` with ``in_index``; level counts of
            ``in_channels`` / ``in_keys`` / ``in_index`` that disagree; several maps with
            ``input_transform=None``; at forward, a map count or width the head was not built for.
    """

    classifier_name = "conv_seg"

    def __init__(
        self,
        in_channels: int | Sequence[int],
        channels: int | None,
        num_classes: int,
        *,
        in_keys: Sequence[str] | None = None,
        in_index: int | Sequence[int] | None = None,
        input_transform: InputTransform = None,
        dropout_ratio: float = 0.1,
        align_corners: bool = False,
        concat_pooled: bool = False,
        init_std: float | None = None,
    ) -> None:
        super().__init__()
        if input_transform not in INPUT_TRANSFORMS:
            raise ValueError(f"unknown input_transform {input_transform!r}: use one of {INPUT_TRANSFORMS}")
        if in_keys and in_index is not None:
            raise ValueError(f"set in_keys={list(in_keys)} or in_index={in_index}, not both")
        if concat_pooled and input_transform != "resize_concat":
            raise ValueError("concat_pooled needs input_transform='resize_concat'")
        self.in_keys: list[str] | None = _as_list(in_keys) or None
        self.in_index: list[int] | None = _as_list(in_index)
        self.input_transform = input_transform
        self.align_corners = bool(align_corners)
        self.concat_pooled = bool(concat_pooled)
        self.level_channels = self._level_channels(in_channels)
        if input_transform is None and len(self.level_channels) != 1:
            raise ValueError(
                f"{type(self).__name__} reads one map with input_transform=None, got "
                f"{len(self.level_channels)} levels (in_channels={in_channels}, in_keys={self.in_keys})"
            )
        if input_transform == "resize_concat":
            self.in_channels: int | list[int] = sum(self.level_channels) * (2 if concat_pooled else 1)
        elif input_transform == "multiple_select":
            self.in_channels = list(self.level_channels)
        else:
            self.in_channels = self.level_channels[0]
        if channels is None and input_transform == "multiple_select":
            raise ValueError("channels=None (the input's width) needs one map or resize_concat")
        self.channels = int(self.in_channels if channels is None else channels)  # type: ignore[arg-type]
        self.num_classes = int(num_classes)
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else nn.Identity()
        classifier = nn.Conv2d(self.channels, self.num_classes, kernel_size=1)
        # None keeps PyTorch's default init: MMSeg's N(0, 0.01²) (init_std=0.01) cost the from-scratch toy
        # recipes ~0.3 mIoU (toy_seg, 6 epochs: 0.41 vs 0.70), so it is opt-in until they are re-tuned
        if init_std is not None:
            init_classifier(classifier, init_std)
        setattr(self, self.classifier_name, classifier)

    def _level_channels(self, in_channels: int | Sequence[int]) -> list[int]:
        """Per-level widths; an int is repeated over the selected levels (one if none are named)."""
        selected = self.in_keys or self.in_index
        if isinstance(in_channels, int):
            return [int(in_channels)] * (len(selected) if selected else 1)
        widths = [int(c) for c in in_channels]
        if selected and len(selected) != len(widths):
            raise ValueError(
                f"in_channels={widths} lists {len(widths)} levels but the head reads {len(selected)} "
                f"(in_keys={self.in_keys}, in_index={self.in_index})"
            )
        return widths

    @property
    def num_levels(self) -> int:
        return len(self.level_channels)

    def pooled_channel_mask(self) -> list[bool]:
        """Per channel of the transformed input: True where it is a map's broadcast average
        (``concat_pooled``: each level's channels, then their averages)."""
        if not self.concat_pooled:
            return [False] * sum(self.level_channels)
        return [p for c in self.level_channels for p in [False] * c + [True] * c]

    def input_batch_norm(self) -> BatchNorm2d:
        """BatchNorm over the ``resize_concat`` input (the linear probes'), batch-1 safe (:class:`BatchNorm2d`)."""
        return BatchNorm2d(self.channels, pooled_channels=self.pooled_channel_mask())

    def select_inputs(self, features: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The maps this head reads, checked against the level count and widths it was built for."""
        if self.in_keys:
            missing = [k for k in self.in_keys if k not in features]
            if missing:
                raise ValueError(f"{type(self).__name__} reads {missing} but the input has {list(features)}")
            names = self.in_keys
        elif self.in_index is not None:
            keys = list(features)
            try:
                names = [keys[i] for i in self.in_index]
            except IndexError:
                raise ValueError(
                    f"{type(self).__name__}: in_index={self.in_index} out of range for maps {keys}"
                ) from None
        else:
            names = list(features)
        if len(names) != self.num_levels:
            raise ValueError(
                f"{type(self).__name__} was built for {self.num_levels} map(s) but got {len(names)} "
                f"({names}): pass in_keys listing the maps it should read"
            )
        maps = [features[k] for k in names]
        for name, m, width in zip(names, maps, self.level_channels, strict=True):
            if m.shape[1] != width:
                raise ValueError(
                    f"{type(self).__name__}: map {name!r} has {m.shape[1]} channels, in_channels says {width}"
                )
        return maps

    def _transform_inputs(self, features: dict[str, torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        """Selected maps → one map (``None``), their resized concatenation, or the list."""
        maps = self.select_inputs(features)
        if self.input_transform == "resize_concat":
            return resize_concat(maps, self.align_corners, self.concat_pooled)
        if self.input_transform == "multiple_select":
            return maps
        return maps[0]

    def cls_seg(self, feat: torch.Tensor) -> torch.Tensor:
        """Dropout → the 1×1 classifier: N×channels×H×W → N×num_classes×H×W."""
        return getattr(self, self.classifier_name)(self.dropout(feat))


__all__ = ["BaseDecodeHead", "init_classifier", "resize", "resize_concat"]
