"""Detectors on the SigLIP pyramid: each trains a few steps, predicts, and refuses level mismatches early."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torchvision.models.detection.image_list import ImageList

from siglip_dense.data.detection import DetDataModule
from siglip_dense.models import build_backbone
from siglip_dense.models.heads.detection import (
    NominalStrideAnchorGenerator,
    NominalStrideRoIAlign,
    build_detector,
)
from siglip_dense.models.necks import SimpleFeaturePyramid
from siglip_dense.tasks.base import param_groups_layer_decay
from siglip_dense.tasks.detection import DetectionTask
from tests.test_coco_data import toy_coco_root  # noqa: F401 - shared session fixture

SIZE = 128
BACKBONE = {"_target_": "siglip_dense.models.build_backbone", "arch": "tiny", "out_indices": [5]}
RCNN_NECK = {
    "_target_": "siglip_dense.models.necks.SimpleFeaturePyramid",
    "out_channels": 32,
    "top_block": True,
}
# 64 channels: FCOS's GroupNorm(32) needs > 1 value per group on the 1×1 p7 of a small image
ONE_STAGE_NECK = {**RCNN_NECK, "out_channels": 64, "scale_factors": [2.0, 1.0, 0.5], "top_block": False}
LIGHT_RCNN = {
    "representation_size": 64,
    "mask_head_channels": 16,
    "rpn_batch_size_per_image": 32,
    "box_batch_size_per_image": 32,
    "rpn_pre_nms_top_n_train": 200,
    "rpn_post_nms_top_n_train": 100,
    "rpn_pre_nms_top_n_test": 100,
    "rpn_post_nms_top_n_test": 50,
}
DETECTORS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "faster_rcnn": (RCNN_NECK, {"kind": "faster_rcnn", "box_head": "4conv1fc", **LIGHT_RCNN}),
    "mask_rcnn": (RCNN_NECK, {"kind": "mask_rcnn", "box_head": "2fc", **LIGHT_RCNN}),
    "retinanet": (
        ONE_STAGE_NECK,
        {"kind": "retinanet", "levels": ["p3", "p4", "p5"], "extra_levels": "p6p7"},
    ),
    "fcos": (ONE_STAGE_NECK, {"kind": "fcos", "levels": ["p3", "p4", "p5"], "extra_levels": "p6p7"}),
}


@pytest.fixture(scope="module")
def toy_batches(toy_coco_root: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:  # noqa: F811
    dm = DetDataModule(toy_coco_root, image_size=SIZE, scale_range=(0.8, 1.2), num_workers=0, batch_size=2)
    dm.setup("fit")
    return next(iter(dm.train_dataloader())), next(iter(dm.val_dataloader())), dm.task_kwargs()


@pytest.mark.parametrize("kind", list(DETECTORS))
def test_detector_trains_and_predicts(kind: str, toy_batches: tuple) -> None:
    torch.manual_seed(0)
    train_batch, val_batch, data_kwargs = toy_batches
    neck, detector = DETECTORS[kind]
    task = DetectionTask(BACKBONE, neck, detector, image_size=SIZE, **data_kwargs)
    assert task.backbone is task.model.backbone.body and task.has_masks == (kind == "mask_rcnn")
    opt = torch.optim.AdamW(task.parameters(), lr=1e-4)
    task.train()
    for step in range(2):
        loss = task.training_step(train_batch, step)
        assert torch.isfinite(loss) and loss > 0
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in task.parameters() if p.grad is not None)
        opt.step()
    task.eval()
    task.model.score_thresh = 0.0  # one-stage: keep low-confidence boxes of an untrained model
    if hasattr(task.model, "roi_heads"):
        task.model.roi_heads.score_thresh = 0.0
    outs = task.detect(val_batch["image"])
    h, w = val_batch["meta"][0]["orig_size"]
    out = outs[0]
    n = len(out["boxes"])
    assert n > 0 and out["boxes"].shape == (n, 4) and out["scores"].shape == (n,)
    assert out["labels"].min() >= 0 and out["labels"].max() < data_kwargs["num_classes"]
    # boxes are in the ORIGINAL image's pixels (torchvision maps them back from the network size)
    assert (out["boxes"][:, 0::2] <= w + 1e-3).all() and (out["boxes"][:, 1::2] <= h + 1e-3).all()
    if kind == "mask_rcnn":
        assert out["masks"].shape == (n, 1, h, w)
    # the SigLIP blocks sit in the decayed groups (backbone_prefix = "backbone.body.")
    groups = param_groups_layer_decay(
        task.model, task.backbone, 0.05, 0.5, backbone_prefix=task.backbone_prefix
    )
    scales = {n: g["lr_scale"] for g in groups for n in g["names"]}
    assert scales["backbone.body.vit.blocks.0.attn.qkv.weight"] == pytest.approx(0.5**6)
    assert (
        scales[
            "backbone.neck.simfp_4.0.weight" if kind.endswith("rcnn") else "backbone.neck.simfp_3.0.weight"
        ]
        == 1.0
    )


def _parts(scale_factors: tuple[float, ...] = (4.0, 2.0, 1.0, 0.5), top_block: bool = True) -> tuple:
    body = build_backbone("tiny", out_indices=[5], verbose=False)
    neck = SimpleFeaturePyramid(
        body.embed_dim, body.patch_size, 32, scale_factors=scale_factors, top_block=top_block
    )
    return body, neck


def test_level_and_anchor_mismatches_fail_at_construction() -> None:
    body, neck = _parts()
    with pytest.raises(
        ValueError, match=r"anchor_sizes has 3 entries but the detector sees 5 pyramid levels"
    ):
        build_detector("faster_rcnn", body, neck, 3, anchor_sizes=[[32], [64], [128]])
    with pytest.raises(ValueError, match=r"aspect_ratios has 2 per-level entries"):
        build_detector("faster_rcnn", body, neck, 3, aspect_ratios=[[1.0], [1.0]])
    with pytest.raises(ValueError, match=r"levels \['p7'\] are not produced by the neck"):
        build_detector("retinanet", body, neck, 3, levels=["p3", "p7"])
    with pytest.raises(ValueError, match=r"roi_levels \['p9'\] must be a non-empty subset"):
        build_detector("mask_rcnn", body, neck, 3, roi_levels=["p9"])
    with pytest.raises(ValueError, match="same number of anchors"):
        build_detector("retinanet", body, neck, 3, anchor_sizes=[[32], [64, 90], [128], [256], [512]])
    with pytest.raises(ValueError, match="already makes p6"):
        build_detector("retinanet", body, neck, 3, levels=["p3", "p4", "p5"], extra_levels="p6p7")
    with pytest.raises(ValueError, match="unknown detector"):
        build_detector("detr", body, neck, 3)
    with pytest.raises(ValueError, match="FCOS predicts one point"):
        build_detector("fcos", body, neck, 3, aspect_ratios=[0.5, 1.0])


def test_anchors_follow_the_pyramid() -> None:
    body, neck = _parts()
    model = build_detector("mask_rcnn", body, neck, 3, image_size=256)
    gen = model.rpn.anchor_generator
    assert isinstance(gen, NominalStrideAnchorGenerator)
    assert gen.strides == [4, 8, 16, 32, 64] and [s[0] for s in gen.sizes] == [32, 64, 128, 256, 512]
    assert model.roi_heads.box_roi_pool.featmap_names == ["p2", "p3", "p4", "p5"]
    assert model.transform.size_divisible == 64 and model.transform.image_mean == [0.0, 0.0, 0.0]
    body, neck = _parts((2.0, 1.0, 0.5), top_block=False)
    retina = build_detector("retinanet", body, neck, 3, levels=["p3", "p4", "p5"], extra_levels="p6p7")
    assert retina.anchor_generator.strides == [8, 16, 32, 64, 128]
    assert retina.anchor_generator.sizes[0] == pytest.approx((32.0, 32 * 2 ** (1 / 3), 32 * 2 ** (2 / 3)))


def test_nominal_strides_for_patch14_inputs() -> None:
    """torchvision infers stride = padded_size // grid, which is wrong for patch-14 grids; ours is not."""
    gen = NominalStrideAnchorGenerator([[32.0], [64.0]], [[1.0], [1.0]], [4, 8])
    feats = [torch.zeros(1, 1, 130, 130), torch.zeros(1, 1, 65, 65)]  # a 518 input, stride-16 grid 33
    images = ImageList(torch.zeros(1, 3, 518, 518), [(518, 518)])
    anchors = gen(images, feats)[0]
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    assert centres[1, 0] - centres[0, 0] == pytest.approx(4.0)
    assert centres[130 * 130 + 1, 0] - centres[130 * 130, 0] == pytest.approx(8.0)


def test_bad_targets_are_clear_errors(toy_batches: tuple) -> None:
    train_batch, _, data_kwargs = toy_batches
    neck, detector = DETECTORS["mask_rcnn"]
    task = DetectionTask(BACKBONE, neck, detector, image_size=SIZE, **data_kwargs)
    bad = {**train_batch, "target": [dict(t) for t in train_batch["target"]]}
    bad["target"][0]["labels"] = torch.full_like(bad["target"][0]["labels"], 7)
    # checked on the host before the device transfer (no sync inside the training step)
    with pytest.raises(ValueError, match=r"outside 0\.\.4 in .*\.jpg"):
        task.check_batch(bad)
    no_masks = {
        **train_batch,
        "target": [{k: v for k, v in t.items() if k != "masks"} for t in train_batch["target"]],
    }
    with pytest.raises(ValueError, match="with_masks=true"):
        task.training_step(no_masks, 0)
    with pytest.raises(ValueError, match="category_ids"):
        DetectionTask(BACKBONE, neck, detector, num_classes=2, category_ids=[3, 3])


def test_bf16_autocast_keeps_boxes_fp32(toy_batches: tuple) -> None:
    """Under autocast the weights stay fp32 and the heads' outputs are decoded in fp32."""
    train_batch, val_batch, data_kwargs = toy_batches
    neck, detector = DETECTORS["mask_rcnn"]
    task = DetectionTask(BACKBONE, neck, detector, image_size=SIZE, **data_kwargs)
    task.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = task.training_step(train_batch, 0)
        task.eval()
        task.model.roi_heads.score_thresh = 0.0
        out = task.detect(val_batch["image"])[0]
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in task.parameters())
    assert out["boxes"].dtype == torch.float32 and len(out["boxes"]) > 0
    # coordinates are not on the bf16 grid (steps of 0.5-1 px above 128)
    big = out["boxes"][out["boxes"] > 64]
    assert big.numel() == 0 or not torch.equal(big, big.bfloat16().float())


@pytest.mark.parametrize("kind", list(DETECTORS))
def test_detections_do_not_depend_on_the_images_seen_before(kind: str, toy_batches: tuple) -> None:
    """An image's detections are the same alone, after a landscape image, after a portrait one.

    torchvision's RoI pooler infers its scales from the first image it pools and keeps them: under
    the square pad a landscape image's short side made them 4× off for every later image.
    """
    _, _, data_kwargs = toy_batches
    neck, detector = DETECTORS[kind]
    torch.manual_seed(0)
    fresh = DetectionTask(BACKBONE, neck, detector, image_size=SIZE, **data_kwargs).eval()
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (96, 112, 3), dtype=np.uint8)
    landscape = rng.integers(0, 256, (40, 160, 3), dtype=np.uint8)
    portrait = rng.integers(0, 256, (160, 40, 3), dtype=np.uint8)

    def photo_after(*before: np.ndarray) -> Any:
        return copy.deepcopy(fresh).predict([*before, photo], score_threshold=0.0)[-1]

    alone = photo_after()
    assert len(alone.boxes) > 0
    for before in ([landscape], [portrait], [landscape, portrait]):
        after = photo_after(*before)
        np.testing.assert_array_equal(after.boxes, alone.boxes)
        np.testing.assert_array_equal(after.scores, alone.scores)
        np.testing.assert_array_equal(after.labels, alone.labels)


def test_roi_pooling_scales_come_from_the_strides() -> None:
    """1 / stride per level and FPN's level mapper (eq. 1: 224 px boxes at level 4) from the start."""
    body, neck = _parts()
    model = build_detector("mask_rcnn", body, neck, 3, image_size=128, roi_levels=["p5", "p3", "p4", "p2"])
    for pool in (model.roi_heads.box_roi_pool, model.roi_heads.mask_roi_pool):
        assert isinstance(pool, NominalStrideRoIAlign)
        assert pool.featmap_names == ["p2", "p3", "p4", "p5"]
        assert pool.scales == [1 / 4, 1 / 8, 1 / 16, 1 / 32]
        boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0], [0.0, 0.0, 224.0, 224.0], [0.0, 0.0, 900.0, 900.0]])
        # floor(4 + log2(sqrt(area) / 224)) clamped to 2..5, as an index from p2
        assert pool.map_levels([boxes]).tolist() == [0, 2, 3]
        feats = {f"p{k}": torch.zeros(1, 2, 512 // 2**k, 512 // 2**k) for k in range(2, 6)}
        pool(feats, [boxes], [(160, 512)])  # a landscape first image: nothing is inferred from it
        assert pool.scales == [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    with pytest.raises(ValueError, match="consecutive pyramid levels"):
        build_detector("faster_rcnn", body, neck, 3, image_size=128, roi_levels=["p2", "p4"])


def test_anchors_under_bf16_features_are_the_fp32_anchors() -> None:
    """Under autocast the features are bf16; anchors stay fp32 (bf16 rounds 377 px to 376)."""
    gen = NominalStrideAnchorGenerator([[32.0, 45.0]], [[0.5, 1.0, 2.0]], [4])
    images = ImageList(torch.zeros(1, 3, 512, 512), [(512, 512)])
    fp32 = gen(images, [torch.zeros(1, 1, 128, 128)])[0]
    bf16 = gen(images, [torch.zeros(1, 1, 128, 128, dtype=torch.bfloat16)])[0]
    assert bf16.dtype == torch.float32 and torch.equal(bf16, fp32)
    assert torch.equal(gen(images, [torch.zeros(1, 1, 128, 128)])[0], fp32)  # after a bf16 call too
