"""NaFlex forward of a dense model: one backbone pass over a padded batch, heads per image grid.

The backbone (``SigLIP2Backbone.forward(x, grid_sizes)``) masks each image's padding and returns
maps that are zero outside each image's grid. Necks and heads are convolutional, so a head run on
the whole padded map would let one image's padding (and, after the first conv, non-zero padding
activations) leak into its border pixels. Each image's maps are therefore cropped to its own grid
(rounded up to the neck's divisibility, exactly as a batch of one is padded) and decoded alone:
every image gets the logits it would get evaluated by itself.
"""

from __future__ import annotations

import math

import torch


def check_grid_sizes(grid_sizes: torch.Tensor, batch: int, height: int, width: int, patch: int) -> None:
    """``grid_sizes`` must be B×2 positive patch counts whose pixels fit the H×W input.

    Raises:
        ValueError: wrong shape, non-positive or too large grids (the message names the image).
    """
    if grid_sizes.ndim != 2 or tuple(grid_sizes.shape) != (batch, 2):
        raise ValueError(f"grid_sizes must be {batch}×2 (h, w) patch counts, got {tuple(grid_sizes.shape)}")
    for i, (gh, gw) in enumerate(grid_sizes.tolist()):
        if gh <= 0 or gw <= 0 or gh * patch > height or gw * patch > width:
            raise ValueError(
                f"grid_sizes[{i}] = ({gh}, {gw}) patches of {patch} px does not fit the {height}×{width} input"
            )


def naflex_forward(
    model: torch.nn.Module, images: torch.Tensor, grid_sizes: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Outputs B×K×H×W for a NaFlex batch; image i's are in its top-left ``h_i·p × w_i·p``, 0 elsewhere.

    Args:
        model: a :class:`DenseModel` (segmentor or depth model) whose backbone takes ``grid_sizes``.
        images: B×3×H×W, image i in the top-left ``grid_sizes[i]·p`` pixels (the rest padding).
        grid_sizes: B×2 long, (h_i, w_i) patches per image.
    """
    b, _, height, width = images.shape
    patch = int(model.backbone.patch_size)
    check_grid_sizes(grid_sizes, b, height, width, patch)
    x = model.pad_input(images)
    feats = model.backbone(x, grid_sizes=grid_sizes.to(x.device))
    div = model.size_divisibility
    outputs: dict[str, torch.Tensor] = {}
    # per-image crops have a new shape almost every image: a compiled neck (compile=true) would
    # recompile for each until dynamo's recompile_limit. Necks and heads are small: run them eager.
    with torch.compiler.set_stance("force_eager"):
        for i, (gh, gw) in enumerate(grid_sizes.tolist()):
            h, w = gh * patch, gw * patch
            ph, pw = math.ceil(h / div) * div, math.ceil(w / div) * div  # what a batch of one is padded to
            own = {k: v[i : i + 1, :, : ph // patch, : pw // patch] for k, v in feats.items()}
            for key, value in model.decode(own, (ph, pw), (h, w)).items():
                if key not in outputs:
                    outputs[key] = value.new_zeros((b, value.shape[1], height, width))
                outputs[key][i, :, :h, :w] = value[0]
    return outputs


__all__ = ["check_grid_sizes", "naflex_forward"]
