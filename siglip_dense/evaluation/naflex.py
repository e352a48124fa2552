"""NaFlex inference: whole images at native aspect ratio, several per batch, no sliding window.

Each image is resized to its NaFlex size (at most ``max_num_patches`` patches, transformers'
``Siglip2ImageProcessor`` rule, see :mod:`siglip_dense.data.naflex`), the images are padded into one
batch with per-image grids, the model predicts each image on its own grid, and each image's logits
are cropped to its valid region and resized (bilinear) to its original size — mmseg's "whole"
inference, with the resize step replaced by NaFlex's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from siglip_dense.data.naflex import naflex_resize, pad_to_batch

# (padded batch B×3×H×W, grid_sizes B×2) -> logits B×K×H×W
NaFlexModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _views(
    model_fn: NaFlexModelFn, resized: list[torch.Tensor], patch_size: int, flip: bool
) -> list[list[torch.Tensor]]:
    """Per view (plain, flipped): each image's logits cropped to its own h'×w' region."""
    views = []
    for flipped in (False, True) if flip else (False,):
        inputs = [x.flip(-1) for x in resized] if flipped else resized
        batch, grid = pad_to_batch(inputs, patch_size)
        logits = model_fn(batch, grid).float()
        crops = [logits[i, :, : x.shape[-2], : x.shape[-1]] for i, x in enumerate(inputs)]
        views.append([c.flip(-1) for c in crops] if flipped else crops)
    return views


@torch.no_grad()
def naflex_inference(
    model_fn: NaFlexModelFn,
    images: Sequence[torch.Tensor],
    patch_size: int,
    max_num_patches: int,
    flip: bool = False,
) -> list[torch.Tensor]:
    """Scores K×H_i×W_i at each image's ORIGINAL size for normalised C×H_i×W_i images.

    One view returns logits; with ``flip`` the mean softmax of the plain and the horizontally flipped
    view (mmseg ``aug_test``). Resizing the normalised image equals resizing the uint8 one the
    processor sees up to rounding (normalisation is affine per channel).
    """
    if not images:
        return []
    resized = [naflex_resize(x, patch_size, max_num_patches) for x in images]
    views = _views(model_fn, resized, patch_size, flip)
    out = []
    for i, image in enumerate(images):
        size = tuple(image.shape[-2:])
        scores = [
            F.interpolate(v[i][None], size=size, mode="bilinear", align_corners=False)[0] for v in views
        ]
        out.append(scores[0] if len(scores) == 1 else torch.stack([s.softmax(0) for s in scores]).mean(0))
    return out


def check_naflex_eval(cfg: dict, window_size: int | None = None) -> None:
    """A segmentation ``eval`` config with ``mode: naflex`` must have a positive budget and one scale,
    and a backbone with global attention (``window_size``: the backbone's; windows do not take the
    per-image grids of a NaFlex batch).

    Raises:
        ValueError: naming the ``eval.*`` / ``backbone.*`` key that is wrong.
    """
    if cfg.get("mode") != "naflex":
        return
    if window_size:
        raise ValueError(
            f"eval.mode=naflex does not work with window attention (backbone.window_size={window_size}): "
            "NaFlex batches hold per-image grids; use eval.mode=whole or slide, or backbone.window_size=null"
        )
    budget = cfg.get("max_num_patches")
    if not isinstance(budget, int) or budget <= 0:
        raise ValueError(f"eval.max_num_patches must be a positive int for eval.mode=naflex, got {budget!r}")
    if [float(s) for s in cfg.get("scales", [1.0])] != [1.0]:
        raise ValueError(
            f"eval.scales={list(cfg['scales'])} is not supported with eval.mode=naflex (the patch budget "
            "sets the scale): use scales=[1.0], or change eval.max_num_patches"
        )


__all__ = ["NaFlexModelFn", "check_naflex_eval", "naflex_inference"]
