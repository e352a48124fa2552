"""NaFlex for dense tasks: target sizes equal transformers' processor, batches equal images alone."""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest
import torch
from transformers.models.siglip2.image_processing_siglip2 import get_image_size_for_max_num_patches

from siglip_dense.data.naflex import (
    NaFlexRescale,
    build_naflex_seg_train_transform,
    naflex_resize,
    naflex_target_size,
    pad_to_batch,
)
from siglip_dense.evaluation.naflex import check_naflex_eval

# (H, W, patch, budget): landscape, portrait, square, extreme ratios, tiny, huge, upsampling
SIZE_CASES = [
    (480, 640, 16, 256),
    (640, 480, 16, 1024),
    (512, 683, 16, 1024),
    (375, 500, 16, 576),
    (512, 512, 16, 256),
    (100, 2000, 16, 256),
    (3000, 40, 16, 784),
    (7, 9, 16, 64),
    (1, 1, 14, 16),
    (2448, 3264, 14, 729),
    (333, 777, 16, 128),
    (240, 400, 16, 240),
]


@pytest.mark.parametrize(("h", "w", "patch", "budget"), SIZE_CASES)
def test_target_size_equals_transformers_processor(h: int, w: int, patch: int, budget: int) -> None:
    ours = naflex_target_size(h, w, patch, budget)
    assert ours == get_image_size_for_max_num_patches(h, w, patch, budget)
    assert ours[0] % patch == 0 and ours[1] % patch == 0
    assert (ours[0] // patch) * (ours[1] // patch) <= budget


def test_target_size_rejects_bad_budget() -> None:
    with pytest.raises(ValueError, match="max_num_patches=0"):
        naflex_target_size(10, 10, 16, 0)


def test_pad_to_batch_places_images_top_left_with_their_grids() -> None:
    a, b = torch.randn(3, 32, 64), torch.randn(3, 48, 16)
    batch, grid = pad_to_batch([a, b], 16)
    assert batch.shape == (2, 3, 48, 64)
    assert grid.tolist() == [[2, 4], [3, 1]]
    torch.testing.assert_close(batch[0, :, :32, :64], a, rtol=0, atol=0)
    torch.testing.assert_close(batch[1, :, :48, :16], b, rtol=0, atol=0)
    assert batch[0, :, 32:].abs().sum() == 0 and batch[1, :, :, 16:].abs().sum() == 0
    with pytest.raises(ValueError, match="not multiples of the patch size 16"):
        pad_to_batch([torch.randn(3, 30, 32)], 16)


def test_resize_keeps_ratio_within_budget() -> None:
    x = torch.rand(3, 300, 500)
    y = naflex_resize(x, 16, 256)
    assert tuple(y.shape[-2:]) == get_image_size_for_max_num_patches(300, 500, 16, 256)


def test_target_size_equals_transformers_on_random_sizes() -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        h, w = (int(v) for v in torch.randint(1, 4000, (2,), generator=gen))
        budget = int(torch.randint(1, 2048, (1,), generator=gen))
        patch = (14, 16)[int(torch.randint(0, 2, (1,), generator=gen))]
        assert naflex_target_size(h, w, patch, budget) == get_image_size_for_max_num_patches(
            h, w, patch, budget
        ), (h, w, patch, budget)


def test_naflex_eval_config_errors_name_the_key() -> None:
    with pytest.raises(ValueError, match=r"eval.scales=\[1.0, 1.5\]"):
        check_naflex_eval({"mode": "naflex", "max_num_patches": 64, "scales": [1.0, 1.5]})
    with pytest.raises(ValueError, match="eval.max_num_patches"):
        check_naflex_eval({"mode": "naflex", "max_num_patches": 0, "scales": [1.0]})


def test_train_transform_rescales_around_the_naflex_size() -> None:
    image = np.zeros((300, 500, 3), np.uint8)
    mask = np.zeros((300, 500), np.uint8)
    fixed = NaFlexRescale(16, 256, scale_range=(1.0, 1.0))
    out = A.Compose([fixed])(image=image, mask=mask)
    assert (
        out["image"].shape[:2] == out["mask"].shape == get_image_size_for_max_num_patches(300, 500, 16, 256)
    )
    crops = build_naflex_seg_train_transform((128, 128), 16, 64, seed=0)(image=image, mask=mask)
    assert tuple(crops["image"].shape) == (3, 128, 128) and tuple(crops["mask"].shape) == (128, 128)
