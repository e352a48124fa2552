"""NaFlex through the dense heads: each image of a padded batch gets the logits it gets alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from siglip_dense.data.naflex import naflex_target_size, pad_to_batch
from siglip_dense.tasks.segmentation import SegmentationTask
from siglip_dense.train import build_task
from tests.conftest import compose_train_cfg


def _naflex_task(tmp_path: Path, overrides: tuple[str, ...] = ()) -> SegmentationTask:
    """The toy_seg_naflex model (tiny backbone, multi-level neck, UPerNet), random weights, eval mode."""
    cfg = compose_train_cfg(
        ["experiment=toy_seg_naflex", "+task.num_classes=5", *overrides], tmp_path / "run"
    )
    torch.manual_seed(0)
    task = build_task(cfg, None).eval()
    for m in task.modules():  # non-trivial BatchNorm statistics, so padding leaks would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return task


@pytest.fixture(scope="module")
def naflex_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random transformers ``Siglip2VisionModel`` (NaFlex) saved with ``save_pretrained``."""
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    torch.manual_seed(0)
    config = Siglip2VisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=2,
        num_patches=64,  # an 8x8 position table, resized per image
        patch_size=16,
        hidden_act="gelu_pytorch_tanh",
    )
    path = tmp_path_factory.mktemp("siglip2_naflex")
    Siglip2VisionModel(config).save_pretrained(path)
    return path


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("source", ["tiny", "transformers_naflex"])
def test_naflex_batch_gives_each_image_its_own_logits(
    source: str, flip: bool, naflex_checkpoint: Path, tmp_path: Path, hydra_cleanup: None
) -> None:
    overrides = [f"task.eval.flip={flip}"]
    if source == "transformers_naflex":  # the NaFlex position-table rule, per image grid
        overrides += ["backbone.arch=null", f"backbone.checkpoint={naflex_checkpoint}"]
    task = _naflex_task(tmp_path, tuple(overrides))
    assert task.eval_cfg["mode"] == "naflex" and task.eval_cfg["max_num_patches"] == 64
    assert task.backbone.pos_resample == ("naflex" if source == "transformers_naflex" else "timm")
    gen = torch.Generator().manual_seed(1)
    wide, tall = torch.randn(3, 90, 250, generator=gen), torch.randn(3, 230, 120, generator=gen)
    batched = task.infer_naflex([wide, tall])
    alone = [task.infer_naflex([wide])[0], task.infer_naflex([tall])[0]]
    for b, a, x in zip(batched, alone, (wide, tall)):
        assert b.shape == (5, *x.shape[-2:])
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    # the two grids differ in both sides, so each image is padded in the batch
    (h0, w0), (h1, w1) = naflex_target_size(90, 250, 16, 64), naflex_target_size(230, 120, 16, 64)
    assert h0 != h1 and w0 != w1


def test_naflex_forward_is_zero_outside_each_grid(tmp_path: Path, hydra_cleanup: None) -> None:
    task = _naflex_task(tmp_path)
    batch, grid = pad_to_batch([torch.randn(3, 64, 160), torch.randn(3, 128, 48)], 16)
    with torch.no_grad():
        logits = task.model(batch, grid_sizes=grid)["logits"]
    assert logits.shape == (2, 5, 128, 160)
    assert logits[0, :, 64:].abs().sum() == 0 and logits[1, :, :, 48:].abs().sum() == 0
    assert logits[0, :, :64, :160].abs().sum() > 0
    with pytest.raises(ValueError, match=r"grid_sizes\[1\] = \(9, 3\)"):
        task.model(batch, grid_sizes=torch.tensor([[4, 10], [9, 3]]))


def test_naflex_single_image_equals_plain_whole_inference(tmp_path: Path, hydra_cleanup: None) -> None:
    """One image whose NaFlex size needs no padding: resize, plain forward, resize back (mmseg whole)."""
    task = _naflex_task(tmp_path)
    image = torch.randn(3, 250, 250, generator=torch.Generator().manual_seed(2))
    size = naflex_target_size(250, 250, 16, 64)
    assert size == (128, 128) and size[0] % task.model.size_divisibility == 0
    x = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        expected = F.interpolate(task(x), size=(250, 250), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(task.infer_naflex([image])[0], expected, rtol=0, atol=1e-5)


def test_naflex_refuses_multi_scale_tta(tmp_path: Path, hydra_cleanup: None) -> None:
    task = _naflex_task(tmp_path)
    task.set_tta("ms_flip")
    with pytest.raises(ValueError, match="eval.scales"):
        task.infer_naflex([torch.randn(3, 64, 64)])
