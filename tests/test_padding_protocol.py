"""One padding rule for training and evaluation (seg, depth, det) and ViTDet's test protocol.

References: the training pipelines' output tensors against what the evaluation path feeds the
backbone for the same image (captured with a forward pre-hook); detectron2 ViTDet's test resize
(``ResizeShortestEdge(S, max_size=S)``: scale = S / long side, ``int(x·scale + 0.5)``) and
``square_pad=S``; timm's position table used as stored when the grid is the training grid.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from siglip_dense.data.transforms import (
    apply_det_transform,
    build_depth_eval_transform,
    build_depth_train_transform,
    build_det_eval_transform,
    build_det_train_transform,
    build_seg_eval_transform,
    build_seg_train_transform,
)
from siglip_dense.models import build_backbone
from siglip_dense.models.heads.depth import DepthModel
from siglip_dense.models.heads.detection import build_detector
from siglip_dense.models.necks import SimpleFeaturePyramid
from siglip_dense.models.segmentor import Segmentor

MEAN = STD = (0.5, 0.5, 0.5)


def _tiny(img_size: int | None = None) -> nn.Module:
    return build_backbone("tiny", img_size=img_size, out_indices=[5], verbose=False)


def _p6_neck(channels: int = 16) -> SimpleFeaturePyramid:
    # p2..p6 of a patch-16 backbone: inputs padded to a multiple of 64
    return SimpleFeaturePyramid(192, 16, out_channels=channels, in_keys=["blocks.5"], top_block=True)


class _Head(nn.Module):
    """Any head: the test reads the backbone's input, not the output."""

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return next(iter(feats.values()))[:, :1]


def _backbone_input(model: nn.Module, backbone: nn.Module, call: Any) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    handle = backbone.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    try:
        with torch.no_grad():
            call()
    finally:
        handle.remove()
    assert len(seen) == 1
    return seen[0]


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_seg_train_and_eval_pad_identically() -> None:
    image = _image(40, 50)
    label = np.random.default_rng(1).integers(0, 5, (40, 50), dtype=np.uint8)
    # no random geometry: scale 1 (base size = the image), crop larger than the image, no flip/colour
    train = build_seg_train_transform(
        (64, 64), scale_range=(1.0, 1.0), base_size=(50, 40), hflip=0.0, photometric=False, seed=0
    )
    out = train(image=image, mask=label)
    model = Segmentor(_tiny(), _p6_neck(), _Head()).eval()
    x = build_seg_eval_transform(MEAN, STD)(image=image)["image"][None]
    seen = _backbone_input(model, model.backbone, lambda: model(x))
    assert seen.shape == (1, 3, 64, 64)
    torch.testing.assert_close(seen[0], out["image"], rtol=0, atol=1e-6)
    assert (seen[0, :, 40:] == 0).all() and (seen[0, :, :, 50:] == 0).all()  # the mean colour
    mask = torch.as_tensor(out["mask"])
    assert (mask[40:] == 255).all() and (mask[:, 50:] == 255).all()


def test_depth_train_and_eval_pad_identically() -> None:
    image = _image(40, 50, seed=2)
    depth = np.full((40, 50), 2.5, np.float32)
    train = build_depth_train_transform((64, 64), rotate=0, flip=False, photometric=False, seed=0)
    out = train(image=image, mask=depth)
    model = DepthModel(_tiny(), _Head(), _p6_neck()).eval()
    x = build_depth_eval_transform(MEAN, STD)(image=image)["image"][None]
    seen = _backbone_input(model, model.backbone, lambda: model(x))
    assert seen.shape == (1, 3, 64, 64)
    torch.testing.assert_close(seen[0], out["image"], rtol=0, atol=1e-6)
    d = out["mask"].numpy()
    assert (d[40:] == 0).all() and (d[:, 50:] == 0).all() and (d[:40, :50] == 2.5).all()  # pads invalid


def _detector(image_size: int, protocol: str = "vitdet", body: nn.Module | None = None) -> nn.Module:
    return build_detector(
        "faster_rcnn",
        body or _tiny(image_size),
        _p6_neck(),
        num_classes=3,
        image_size=image_size,
        box_head="2fc",
        representation_size=32,
        rpn_conv_depth=2,
        test_protocol=protocol,
    )


def test_det_train_and_eval_pad_identically() -> None:
    image = _image(48, 64, seed=3)  # long side = the 64 training size: LSJ scale 1, test scale 1
    boxes = np.array([[5, 6, 20, 30]], np.float32)
    train = build_det_train_transform(64, scale_range=(1.0, 1.0), hflip=0.0, mean=MEAN, std=STD, seed=0)
    out = apply_det_transform(train, image, boxes, np.array([0]))
    det = _detector(64)
    det.train()
    # training batches the LSJ crop as torchvision's transform does (no resize, pad to 64)
    seen_train = det.transform([out["image"]])[0].tensors
    det.eval()
    x = apply_det_transform(build_det_eval_transform(MEAN, STD), image, boxes, np.array([0]))["image"]
    seen_eval = _backbone_input(det, det.backbone.body, lambda: det([x]))
    assert out["image"].shape == seen_eval.shape[1:] == (3, 64, 64)
    torch.testing.assert_close(seen_eval[0], out["image"], rtol=0, atol=1e-6)
    torch.testing.assert_close(seen_train, seen_eval, rtol=0, atol=1e-6)
    assert (seen_eval[0, :, 48:] == 0).all()


def test_det_train_flips_before_padding_so_the_pad_stays_bottom_right() -> None:
    """detectron2's LSJ flips before resize/crop: a flipped sample is the flipped image padded as
    evaluation pads it (right/bottom), not padded on the left."""
    image = _image(64, 40, seed=4)  # long side = the 64 training size: LSJ scale 1, 24 columns of pad
    boxes = np.array([[5, 6, 20, 30]], np.float32)  # xywh
    train = build_det_train_transform(64, scale_range=(1.0, 1.0), hflip=1.0, mean=MEAN, std=STD, seed=0)
    out = apply_det_transform(train, image, boxes, np.array([0]))
    flipped = np.ascontiguousarray(image[:, ::-1])
    det = _detector(64).eval()
    x = apply_det_transform(build_det_eval_transform(MEAN, STD), flipped, boxes, np.array([0]))["image"]
    seen_eval = _backbone_input(det, det.backbone.body, lambda: det([x]))
    assert out["image"].shape == seen_eval.shape[1:] == (3, 64, 64)
    torch.testing.assert_close(out["image"], seen_eval[0], rtol=0, atol=1e-6)
    assert (out["image"][:, :, 40:] == 0).all() and (out["image"][:, :, :40] != 0).any(0).all()
    # the box is mirrored in the 40-pixel-wide image: x1' = 40 - (x + w), x2' = 40 - x
    np.testing.assert_allclose(out["boxes"], [[40 - 25, 6, 40 - 5, 36]])


def test_vitdet_eval_pads_640x480_to_1024_square_with_the_position_table_unresampled() -> None:
    body = _tiny(1024)
    det = _detector(1024, body=body).eval()
    image = torch.randn(3, 480, 640)
    batch, _ = det.transform([image])
    # detectron2 ResizeShortestEdge(1024, max_size=1024): scale 1024/640 = 1.6 -> 768 x 1024
    assert batch.image_sizes == [(int(480 * 1.6 + 0.5), int(640 * 1.6 + 0.5))] == [(768, 1024)]
    assert batch.tensors.shape == (1, 3, 1024, 1024)
    resized = F.interpolate(image[None], size=(768, 1024), mode="bilinear", align_corners=False)
    torch.testing.assert_close(batch.tensors[:, :, :768], resized, rtol=1e-5, atol=1e-5)
    assert (batch.tensors[:, :, 768:] == 0).all()
    # timm adds the stored table unchanged: the 64×64 grid is the one the table was built for
    vit = body.vit
    assert tuple(vit.patch_embed.grid_size) == (64, 64)
    with torch.no_grad():
        tokens = vit.patch_embed(batch.tensors)
        assert tuple(tokens.shape[1:3]) == (64, 64)
        embedded = vit._pos_embed(tokens)
    expected = tokens.reshape(1, 64 * 64, -1) + vit.pos_embed
    torch.testing.assert_close(embedded, expected, rtol=0, atol=0)
    # the other named protocol pads to the divisibility only: a 768 x 1024 input, a resampled table
    det.transform.set_test_protocol("long_side")
    assert det.transform([image])[0].tensors.shape == (1, 3, 768, 1024)
    with pytest.raises(ValueError, match="test_protocol must be one of"):
        det.transform.set_test_protocol("square")


def test_rpn_head_conv_depth() -> None:
    two = _detector(64)
    assert len(two.rpn.head.conv) == 2
    one = build_detector("faster_rcnn", _tiny(), _p6_neck(), num_classes=3, image_size=64, box_head="2fc")
    assert len(one.rpn.head.conv) == 1  # torchvision's default (checkpoints written before the option)


@pytest.mark.parametrize("size", ["b16", "l16", "so400m14", "so400m16", "g16"])
def test_coco_vitdet_recipes_evaluate_with_vitdet_protocol(
    size: str, tmp_path: Path, hydra_cleanup: None
) -> None:
    """The square pad is the backbone's own size, so the position table is used as built."""
    from siglip_dense.models.heads.detection import square_pad_size
    from siglip_dense.models.necks import pyramid_size_divisibility
    from tests.conftest import compose_train_cfg

    cfg = compose_train_cfg([f"experiment=coco_maskrcnn_vitdet_{size}"], tmp_path)
    det = cfg.task.detector
    assert det.rpn_conv_depth == 2 and det.test_protocol == "vitdet"
    patch = 14 if size.endswith("14") else 16
    div = pyramid_size_divisibility(patch, 64)
    assert square_pad_size(cfg.task.image_size, div) == cfg.backbone.img_size == cfg.data.image_size


def test_vitdet_square_pad_refuses_a_non_square_training_size() -> None:
    """ViTDet's square pad has no square that equals a non-square training crop: refused at
    construction (training), and at evaluation for a model rebuilt from a checkpoint, where
    ``test_protocol=long_side`` is the named way out."""
    from siglip_dense.evaluation.deferred import defer_eval_checks

    with pytest.raises(ValueError, match=r"training size is 64×96 .*use a square image_size"):
        _detector_sized((64, 96), "vitdet")
    long_side = _detector_sized((64, 96), "long_side").eval()
    assert long_side.transform([torch.randn(3, 40, 60)])[0].tensors.shape == (1, 3, 64, 128)
    with defer_eval_checks():  # as checkpoints.load_task rebuilds a stored model
        det = _detector_sized((64, 96), "vitdet").eval()
    with pytest.raises(ValueError, match=r"64×96.*tools/eval.py test_protocol=long_side"):
        det.transform([torch.randn(3, 40, 60)])
    det.transform.set_test_protocol("long_side")
    assert det.transform([torch.randn(3, 40, 60)])[0].tensors.shape == (1, 3, 64, 128)


def _detector_sized(size: tuple[int, int], protocol: str) -> nn.Module:
    return build_detector(
        "faster_rcnn",
        _tiny(max(size)),
        _p6_neck(),
        num_classes=3,
        image_size=size,
        box_head="2fc",
        representation_size=32,
        test_protocol=protocol,
    )
