"""Position-table resampling: each checkpoint source's own rule (timm, transformers, NaFlex, birder).

A SigLIP tower keeps a learned [1, h·w, C] position table for one patch grid; running it on another
grid resamples the table. The sources disagree on mode, antialias and which table they start from,
so the rule travels with the architecture (``ArchConfig.pos_resample``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed


@dataclass(frozen=True)
class PosResample:
    """One source's rule for resampling the position table to another patch grid.

    ``from_original``: the table stays at the source's own grid and every input grid is resampled
    from it (transformers, birder, NaFlex); otherwise ``set_input_size`` resamples the stored table
    once and inputs of other sizes are resampled from that (timm's ``dynamic_img_size``).
    """

    mode: str  # F.interpolate mode, align_corners=False
    antialias: bool
    from_original: bool
    source: str


# The sources' conventions, checked against their code (README "Equal to the source at every size"):
POS_RESAMPLE: dict[str, PosResample] = {
    # timm.layers.resample_abs_pos_embed; open_clip's SigLIP towers are timm trunks
    "timm": PosResample("bicubic", True, False, "timm / open_clip"),
    # SiglipVisionEmbeddings.interpolate_pos_encoding
    "transformers": PosResample("bicubic", False, True, "transformers SiglipVisionModel"),
    # Siglip2VisionEmbeddings.resize_positional_embeddings, per image (big_vision NaFlex the same)
    "naflex": PosResample("bilinear", True, True, "transformers Siglip2VisionModel / big_vision NaFlex"),
    # birder ViT._get_pos_embed -> adjust_position_embedding(antialias=pos_embed_antialias=False)
    "birder": PosResample("bicubic", False, True, "birder ViT"),
}


def resample_pos_embed(
    table: torch.Tensor, old_grid: Sequence[int], new_grid: Sequence[int], convention: str = "timm"
) -> torch.Tensor:
    """Resample a [1, h·w, C] position table (no prefix tokens) from ``old_grid`` to ``new_grid``.

    ``convention`` is a key of :data:`POS_RESAMPLE`. Computed in float32 and cast back (as timm,
    transformers' NaFlex and birder do). The same grid returns the table itself.
    """
    old_grid, new_grid = (int(old_grid[0]), int(old_grid[1])), (int(new_grid[0]), int(new_grid[1]))
    if old_grid == new_grid:
        return table
    spec = POS_RESAMPLE[convention]
    if convention == "timm":
        return resample_abs_pos_embed(
            table, new_size=list(new_grid), old_size=list(old_grid), num_prefix_tokens=0
        )
    x = table.float().reshape(1, *old_grid, -1).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=new_grid, mode=spec.mode, align_corners=False, antialias=spec.antialias)
    return x.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], -1).to(table.dtype)


__all__ = ["POS_RESAMPLE", "PosResample", "resample_pos_embed"]
