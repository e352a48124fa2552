"""SigLIP 2 vision encoders as dense backbones, on top of timm's ``VisionTransformer``.

The backbone is a thin wrapper: timm owns the transformer (attention kernels, pos-embed
resampling, ``forward_intermediates``); we add what dense heads need — named NCHW maps for
chosen blocks, layer ids for layer-wise lr decay, freezing, and a checkpoint-driven build.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from siglip_dense.models import weights
from siglip_dense.models.arch import (
    DEFAULT_ACT,
    SIGLIP_MEAN,
    SIGLIP_STD,
    VARIANTS,
    ArchConfig,
    arch_config_of,
    arch_config_of_vit,
    create_vit,
    match_timm_arch,
    resolve_arch,
)
from siglip_dense.models.compile_options import compile_kwargs, mark_dynamic
from siglip_dense.models.pos_embed import POS_RESAMPLE, PosResample, resample_pos_embed

PATCH_REMAINDERS = ("pad", "drop")


def _normalize_indices(indices: Sequence[int] | int, depth: int) -> tuple[int, ...]:
    if isinstance(indices, int):
        indices = [indices]
    out = []
    for i in indices:
        j = i + depth if i < 0 else i
        if not 0 <= j < depth:
            raise ValueError(f"out_indices entry {i} is out of range for a {depth}-block backbone")
        out.append(j)
    return tuple(sorted(set(out)))


# ---- ViTDet window attention ------------------------------------------------------------------
# Global-attention blocks when windows are on, by depth (ViTDet / Perception Encoder: the last block
# of each quarter): B/16 12, L/16 24, So400m 27, g-opt 40, tiny 6.
VITDET_GLOBAL_BLOCKS: dict[int, tuple[int, ...]] = {
    6: (2, 5),
    12: (2, 5, 8, 11),
    24: (5, 11, 17, 23),
    27: (2, 10, 18, 26),
    40: (9, 19, 29, 39),
}


class _PatchGrid:
    """The h×w patch grid of the last forward that went through timm's own entry points.

    Registered as a forward hook on ``patch_embed``. :class:`SigLIP2Backbone` passes each forward's
    grid to the windowed blocks as an argument (so gradient checkpointing recomputes every forward
    with its own grid); this record is only the fallback for calls into the timm ViT directly
    (``backbone.vit.forward_features``) or into a block alone. A plain object, not a module: it adds
    no state-dict keys.
    """

    def __init__(self) -> None:
        self.hw: tuple[int, int] | None = None

    def __call__(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        # dynamic_img_size: patch_embed returns B×h×w×C; otherwise B×N×C on its fixed grid
        self.hw = tuple(output.shape[1:3]) if output.ndim == 4 else tuple(module.grid_size)


def _window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """B×H×W×C (H, W multiples of ws) -> (B·nW)×(ws·ws)×C, windows in row-major order."""
    B, H, W, C = x.shape
    x = x.view(B, H // ws, ws, W // ws, ws, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, C)


def _window_unpartition(x: torch.Tensor, ws: int, B: int, H: int, W: int) -> torch.Tensor:
    """Inverse of :func:`_window_partition`: (B·nW)×(ws·ws)×C -> B×H×W×C."""
    x = x.view(B, H // ws, W // ws, ws, ws, -1).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, H, W, -1)


class WindowedBlock(Block):
    """timm's ``Block`` with its attention restricted to non-overlapping ws×ws windows (ViTDet).

    Same modules, parameters and state-dict keys as ``Block`` (the backbone switches a block's class
    in place). The tokens are cut into windows for the attention only: LayerNorm, MLP, residuals and
    LayerScale are per token, and drop path stays per *image* as in ViTDet (running the whole block on
    windows would make stochastic depth drop single windows, and would run the MLP on padding). The
    attention is timm's own module and kernel (``F.scaled_dot_product_attention`` when fused). The grid
    is padded to a multiple of ws; padded tokens are masked out as keys with a boolean key mask, passed
    only when there is padding, so an exact tiling keeps the unmasked (fastest) SDPA path.
    """

    window_size: int
    patch_grid: _PatchGrid

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        grid: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """``grid``: the h×w patch grid of ``x`` (B×h·w×C); None reads the grid timm's patch_embed
        recorded last (only right when no other forward ran since, e.g. not under checkpointing)."""
        if attn_mask is not None or is_causal:
            raise NotImplementedError("window attention does not take an attention mask or is_causal")
        x = x + self.drop_path1(self.ls1(self._window_attn(self.norm1(x), grid)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x

    def _window_attn(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        B, N, C = x.shape
        hw = self.patch_grid.hw if grid is None else tuple(grid)
        if hw is None or hw[0] * hw[1] != N:
            raise RuntimeError(
                f"window attention: {N} tokens do not match the patch grid {hw} (given, or recorded by "
                "patch_embed when not given; no prefix tokens are supported)"
            )
        h, w = hw
        ws = self.window_size
        ph, pw = -h % ws, -w % ws
        x = x.view(B, h, w, C)
        mask = None
        if ph or pw:
            x = F.pad(x, (0, 0, 0, pw, 0, ph))
            valid = x.new_zeros((1, h + ph, w + pw, 1), dtype=torch.bool)
            valid[:, :h, :w] = True
            # (B·nW)×1×1×ws²: True = a real token that queries may attend to (SDPA's bool convention)
            mask = _window_partition(valid, ws).view(1, -1, ws * ws).expand(B, -1, -1)
            mask = mask.reshape(-1, 1, 1, ws * ws)
        x = self.attn(_window_partition(x, ws), attn_mask=mask)
        x = _window_unpartition(x, ws, B, h + ph, w + pw)[:, :h, :w]
        return x.reshape(B, N, C)


def _call_block(
    blk: nn.Module, x: torch.Tensor, grid: tuple[int, int], key_mask: torch.Tensor | None
) -> torch.Tensor:
    """One block with this forward's grid / key mask as arguments (checkpoint-safe: no shared state)."""
    if isinstance(blk, WindowedBlock):
        return blk(x, grid=grid)
    if key_mask is not None:
        return blk(x, attn_mask=key_mask)
    return blk(x)


def resolve_global_blocks(depth: int, global_blocks: Sequence[int] | None) -> tuple[int, ...]:
    """Global-attention block indices (negative count from the end); ViTDet's by depth when None."""
    if global_blocks is None:
        if depth not in VITDET_GLOBAL_BLOCKS:
            known = ", ".join(str(d) for d in sorted(VITDET_GLOBAL_BLOCKS))
            raise ValueError(
                f"no default global_blocks for a {depth}-block backbone (known depths: {known}): "
                "pass global_blocks explicitly"
            )
        return VITDET_GLOBAL_BLOCKS[depth]
    if isinstance(global_blocks, int):
        global_blocks = [global_blocks]
    out = set()
    for i in global_blocks:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"global_blocks entries must be ints, got {i!r}")
        j = i + depth if i < 0 else i
        if not 0 <= j < depth:
            raise ValueError(f"global_blocks entry {i} is out of range for a {depth}-block backbone")
        out.add(j)
    return tuple(sorted(out))


def _mark_sizes_dynamic(
    grid: torch.Tensor, key_mask: torch.Tensor | None, valid: torch.Tensor | None
) -> None:
    """Batch and grid sizes of the compiled transformer's inputs are dynamic from the first call."""
    mark_dynamic(grid, (0, 1, 2))
    if grid._base is not None:  # a view (in eval mode): dynamo also guards on its base's sizes
        mark_dynamic(grid._base, tuple(range(grid._base.ndim - 1)))
    mark_dynamic(key_mask, (0, 3))  # B×1×1×N
    mark_dynamic(valid, (0, 1))  # B×N×1


class SigLIP2Backbone(nn.Module):
    """A SigLIP (2) ViT that returns NCHW feature maps of chosen blocks.

    ``forward(x)`` -> ``{"blocks.<i>": B×C×h×w}`` for ``out_indices``; ``forward_features(x)`` -> final
    normed tokens B×N×C, equal to transformers' ``last_hidden_state``. timm owns the modules; the
    forward loop is ours so that per-image grids (NaFlex batches), the source's position-table rule
    (``arch_config.pos_resample``) and window attention's grid reach every block as arguments. Inputs
    of any size work: the position table is resampled per forward, and a size that is not a multiple
    of the patch is padded (``patch_remainder="pad"``) or cropped (``"drop"``, as the sources do).
    """

    def __init__(
        self,
        vit: VisionTransformer,
        arch_config: ArchConfig,
        out_indices: Sequence[int] | int = (-1,),
        norm_intermediates: bool = True,
        patch_remainder: str = "pad",
    ) -> None:
        super().__init__()
        if patch_remainder not in PATCH_REMAINDERS:
            raise ValueError(f"patch_remainder must be one of {PATCH_REMAINDERS}, got {patch_remainder!r}")
        if arch_config.pos_resample not in POS_RESAMPLE:
            raise ValueError(
                f"pos_resample {arch_config.pos_resample!r} is not one of {', '.join(POS_RESAMPLE)}"
            )
        if vit.num_prefix_tokens:
            raise ValueError("SigLIP2Backbone needs a ViT without prefix (class/register) tokens")
        self.vit = vit
        self.arch_config = arch_config
        self.arch = arch_config.arch or "custom"
        self.patch_size = int(vit.patch_embed.patch_size[0])
        self.embed_dim = int(vit.embed_dim)
        self.num_layers = len(vit.blocks)
        self.out_indices = _normalize_indices(out_indices, self.num_layers)
        self.norm_intermediates = norm_intermediates
        self.patch_remainder = patch_remainder
        self.mean = tuple(arch_config.mean)
        self.std = tuple(arch_config.std)
        self._frozen_blocks = 0
        self._frozen_all = False
        self.window_size: int | None = None
        self.global_blocks: tuple[int, ...] = ()
        # the grid of the stored position table (vit.pos_embed); the input size may differ
        self.pos_grid: tuple[int, int] = tuple(int(g) for g in vit.patch_embed.grid_size)
        self._resample_pos = resample_pos_embed
        # fallback grid record for calls into timm's own ViT entry points (see _PatchGrid)
        self._patch_grid = _PatchGrid()
        self.vit.patch_embed.register_forward_hook(self._patch_grid)
        own = tuple(int(s) for s in arch_config.img_size)
        if own != tuple(vit.patch_embed.img_size):
            self._set_patch_embed_size(own)

    # ---- introspection heads and necks read -------------------------------------------------
    @property
    def out_keys(self) -> list[str]:
        return [f"blocks.{i}" for i in self.out_indices]

    @property
    def out_channels(self) -> dict[str, int]:
        return {k: self.embed_dim for k in self.out_keys}

    @property
    def out_strides(self) -> dict[str, int]:
        return {k: self.patch_size for k in self.out_keys}

    @property
    def img_size(self) -> tuple[int, int]:
        return tuple(self.vit.patch_embed.img_size)

    @property
    def size_divisibility(self) -> int:
        """Inputs that are a multiple of this give feature maps without padding."""
        return self.patch_size

    @property
    def pos_resample(self) -> str:
        """The source's position-table rule (a key of :data:`POS_RESAMPLE`)."""
        return self.arch_config.pos_resample

    # ---- forward ---------------------------------------------------------------------------
    def feature_grid(self, height: int, width: int) -> tuple[int, int]:
        """The patch grid of an H×W input under ``patch_remainder`` (ceil for pad, floor for drop)."""
        p = self.patch_size
        if self.patch_remainder == "drop":
            return height // p, width // p
        return -(-height // p), -(-width // p)

    def forward(self, x: torch.Tensor, grid_sizes: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Maps of ``out_indices``: ``{"blocks.<i>": B×C×h×w}``, (h, w) = :meth:`feature_grid` of x.

        ``grid_sizes`` (LongTensor B×2, optional): a NaFlex batch, image i's patch grid (h_i, w_i) in
        the top-left h_i·p × w_i·p pixels of x (the rest is padding). Each image gets its own
        position table (resampled from the checkpoint's table by the source's rule), padded tokens
        are masked out as attention keys, so each image's maps equal running it alone; maps are zero
        outside each image's grid. Raises ValueError for grids larger than x, NotImplementedError
        with window attention.
        """
        x, hw, key_mask, valid = self._embed(x, grid_sizes)
        grid = x.unflatten(1, hw)  # B×h×w×C: the grid travels in the shape (dynamic under compile)
        encode = self.__dict__.get("_compiled_encode")
        if encode is None or torch.compiler.is_compiling():
            return self._encode(grid, key_mask, valid)
        if self.__dict__.get("_compile_dynamic") is not False:
            _mark_sizes_dynamic(grid, key_mask, valid)
        return encode(self, grid, key_mask, valid)

    def _encode(
        self, grid: torch.Tensor, key_mask: torch.Tensor | None, valid: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """Blocks → ``{"blocks.<i>": B×C×h×w}`` from embedded tokens on their B×h×w×C grid."""
        B, h, w, C = grid.shape
        _, taken = self._run_blocks(
            grid.flatten(1, 2), (h, w), key_mask, max(self.out_indices), self.out_indices
        )
        maps = {}
        for i in self.out_indices:
            tokens = self.vit.norm(taken[i]) if self.norm_intermediates else taken[i]
            if valid is not None:
                tokens = tokens * valid
            maps[f"blocks.{i}"] = tokens.reshape(B, h, w, C).permute(0, 3, 1, 2)
        return maps

    def forward_features(self, x: torch.Tensor, grid_sizes: torch.Tensor | None = None) -> torch.Tensor:
        """Final normed patch tokens B×N×C (transformers' ``last_hidden_state``), row-major over
        the (padded) grid; with ``grid_sizes`` (see :meth:`forward`) padded tokens are zero."""
        tokens, hw, key_mask, valid = self._embed(x, grid_sizes)
        tokens, _ = self._run_blocks(tokens, hw, key_mask, self.num_layers - 1)
        x = self.vit.norm(tokens)
        return x * valid if valid is not None else x

    def forward_pooled(self, x: torch.Tensor) -> torch.Tensor:
        """The MAP-head embedding (transformers' ``pooler_output``); needs ``keep_head=True``."""
        if self.vit.attn_pool is None:
            raise RuntimeError("this backbone was built without its MAP head: pass keep_head=True")
        return self.vit.forward_head(self.forward_features(x), pre_logits=True)

    def _embed(
        self, x: torch.Tensor, grid_sizes: torch.Tensor | None
    ) -> tuple[torch.Tensor, tuple[int, int], torch.Tensor | None, torch.Tensor | None]:
        """Patch + position embedding: (tokens B×N×C, grid, key mask B×1×1×N or None, valid B×N×1)."""
        if x.ndim != 4:
            raise ValueError(f"SigLIP2Backbone expects B×C×H×W images, got shape {tuple(x.shape)}")
        if self.patch_remainder == "drop":
            gh, gw = self.feature_grid(*x.shape[-2:])
            if gh == 0 or gw == 0:
                raise ValueError(
                    f"input {tuple(x.shape[-2:])} is smaller than one {self.patch_size}-px patch"
                )
            x = x[..., : gh * self.patch_size, : gw * self.patch_size]
        tokens = self.vit.patch_embed(x)
        if tokens.ndim == 3:  # built with dynamic_img_size=False: B×N×C on its fixed grid
            B, _, C = tokens.shape
            tokens = tokens.view(B, *self.vit.patch_embed.grid_size, C)
        B, gh, gw, C = tokens.shape
        key_mask = valid = None
        if grid_sizes is None:
            pos = self._pos_table((gh, gw)).view(1, gh, gw, C)
        else:
            if self.window_size:
                raise NotImplementedError(
                    "window attention with per-image grids (grid_sizes) is not supported: build the "
                    "backbone with window_size=None for NaFlex batches"
                )
            grids = self._check_grid_sizes(grid_sizes, B, (gh, gw))
            pos = tokens.new_zeros(B, gh, gw, C)
            for g in sorted(set(grids)):
                table = self._pos_table(g).view(g[0], g[1], C).to(pos.dtype)
                for i in (i for i, gi in enumerate(grids) if gi == g):
                    pos[i, : g[0], : g[1]] = table
            inside = torch.zeros(B, gh, gw, dtype=torch.bool, device=tokens.device)
            for i, (h, w) in enumerate(grids):
                inside[i, :h, :w] = True
            inside = inside.view(B, gh * gw)
            valid = inside[..., None].to(tokens.dtype)
            key_mask = inside[:, None, None, :]  # SDPA bool convention: True = may be attended to
        x = (tokens + pos).view(B, gh * gw, C)
        x = self.vit.norm_pre(self.vit.patch_drop(self.vit.pos_drop(x)))
        return x, (gh, gw), key_mask, valid

    @staticmethod
    def _check_grid_sizes(
        grid_sizes: torch.Tensor, batch: int, grid: tuple[int, int]
    ) -> list[tuple[int, int]]:
        gs = torch.as_tensor(grid_sizes)
        if gs.shape != (batch, 2):
            raise ValueError(
                f"grid_sizes must be a B×2 tensor of (h, w) patch grids, B={batch}: got {tuple(gs.shape)}"
            )
        grids = [(int(h), int(w)) for h, w in gs.tolist()]
        for h, w in grids:
            if not (0 < h <= grid[0] and 0 < w <= grid[1]):
                raise ValueError(
                    f"grid_sizes entry ({h}, {w}) does not fit the input's {grid[0]}×{grid[1]} patch grid"
                )
        return grids

    def _pos_table(self, grid: tuple[int, int]) -> torch.Tensor:
        """[1, h·w, C] position table for ``grid`` by the source's rule, from the stored table."""
        return self._resample_pos(self.vit.pos_embed, self.pos_grid, grid, self.arch_config.pos_resample)

    def fit_pos_table(self, table: torch.Tensor, source: ArchConfig | None = None) -> torch.Tensor | None:
        """Another model's [1, N, C] position table resampled to this backbone's stored grid, by the
        source's rule (``source.pos_resample``, else this backbone's) from the source's table grid
        (``source.table_grid()``, else a square one). None when it cannot be (other width, unknown grid).

        For ``init_from`` into a model built at another ``img_size``: the fine-tuned table is kept, as
        the source model itself would resample it at that size.
        """
        own = self.vit.pos_embed
        if table.ndim != 3 or table.shape[-1] != own.shape[-1]:
            return None
        n = int(table.shape[1])
        grid = source.table_grid() if source is not None else None
        if grid is None or grid[0] * grid[1] != n:
            side = math.isqrt(n)
            if side * side != n:
                return None
            grid = (side, side)
        rule = source.pos_resample if source is not None else self.arch_config.pos_resample
        with torch.no_grad():
            return self._resample_pos(table.to(own.dtype), grid, self.pos_grid, rule)

    def init_pos_resampler(self, source: str | Path) -> Callable[[str, torch.Tensor], torch.Tensor | None]:
        """For ``init_from_checkpoint(resample=...)``: fits a position table (a key ending in
        ``vit.pos_embed``) from ``source`` to this backbone with :meth:`fit_pos_table`, reading the
        arch ``source`` records (our checkpoints and exports) only when a table needs it."""

        def fit(name: str, table: torch.Tensor) -> torch.Tensor | None:
            if not name.endswith("vit.pos_embed"):
                return None
            return self.fit_pos_table(table, weights.recorded_arch(source))

        return fit

    def _run_blocks(
        self,
        x: torch.Tensor,
        hw: tuple[int, int],
        key_mask: torch.Tensor | None,
        last: int,
        take: Sequence[int] = (),
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Blocks 0..last: (tokens after ``last``, {i: tokens after block i for i in take}).

        Under gradient checkpointing, each block's grid and mask are *arguments* of the checkpointed
        call, so the recompute in backward uses this forward's grid even when other forwards (other
        sizes) ran in between.
        """
        ckpt = self.vit.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting()
        taken = {}
        for i, blk in enumerate(self.vit.blocks[: last + 1]):
            if ckpt:
                x = checkpoint(_call_block, blk, x, hw, key_mask, use_reentrant=False)
            else:
                x = _call_block(blk, x, hw, key_mask)
            if i in take:
                taken[i] = x
        return x, taken

    # ---- sizes -----------------------------------------------------------------------------
    def set_input_size(self, img_size: int | Sequence[int]) -> None:
        """The input size the model is built for.

        timm's rule resamples the stored position table once to it (cheaper per step and
        compile-friendly, as ``timm.create_model(img_size=...)``); the other sources keep their
        original table and resample from it for every input grid.
        """
        if isinstance(img_size, int):
            img_size = (img_size, img_size)
        img_size = tuple(int(s) for s in img_size)
        if POS_RESAMPLE[self.arch_config.pos_resample].from_original:
            self._set_patch_embed_size(img_size)
        else:
            self.vit.set_input_size(img_size=img_size)
            self.pos_grid = tuple(int(g) for g in self.vit.patch_embed.grid_size)
        pos_grid = None if self.pos_grid == self._grid_of(img_size) else self.pos_grid
        self.arch_config = replace(self.arch_config, img_size=img_size, pos_grid=pos_grid)

    def _grid_of(self, img_size: Sequence[int]) -> tuple[int, int]:
        return int(img_size[0]) // self.patch_size, int(img_size[1]) // self.patch_size

    def _set_patch_embed_size(self, img_size: tuple[int, int]) -> None:
        """Set the input size without touching the position table (kept at ``self.pos_grid``)."""
        self.vit.patch_embed.set_input_size(img_size=img_size)

    def compile(self, **options: Any) -> None:
        """``torch.compile`` the transformer (blocks → maps) once for every input size, in place.

        Patch and position embedding stay eager: the position table's resample (bicubic,
        antialiased) has no dynamic-shape backward in torch ("Expected IntList but got
        GenericList"), and a graph break inside the compiled region would leave the blocks in a
        frame whose sizes are static until each of H and W has changed once. Before every call the
        batch, grid height and width (and a NaFlex batch's masks) are marked dynamic, so the first
        call already compiles for all sizes: one graph for training, one under no_grad
        (evaluation), one more for a batch of one (torch specialises sizes 0 and 1).
        ``dynamic=False`` compiles one static graph per size instead. Options are
        ``torch.compile``'s, with :func:`~siglip_dense.models.compile_options.compile_kwargs`'
        inductor fixes. State-dict keys are unchanged; compiling again replaces the compiled graph.
        """
        self.__dict__["_compile_dynamic"] = options.get("dynamic")
        self.__dict__["_compiled_encode"] = torch.compile(type(self)._encode, **compile_kwargs(options))

    # ---- window attention ------------------------------------------------------------------
    def set_window_attention(
        self, window_size: int | None, global_blocks: Sequence[int] | None = None
    ) -> None:
        """ViTDet window attention: blocks not in ``global_blocks`` attend within ws×ws windows.

        ``window_size`` None or 0 restores global attention everywhere (the default). ``global_blocks``
        None takes ViTDet's per-depth default (:data:`VITDET_GLOBAL_BLOCKS`). Parameters and
        state-dict keys are unchanged either way, so any checkpoint loads into either form.
        """
        if window_size is not None and (isinstance(window_size, bool) or not isinstance(window_size, int)):
            raise TypeError(f"window_size must be an int or None, got {window_size!r}")
        if window_size is not None and window_size < 0:
            raise ValueError(f"window_size must be positive (or None/0 = off), got {window_size}")
        blocks = self.vit.blocks
        for blk in blocks:
            if type(blk) not in (Block, WindowedBlock):
                raise TypeError(f"window attention needs timm's Block, this ViT has {type(blk).__name__}")
        if self.vit.num_prefix_tokens and window_size:
            raise ValueError("window attention needs a ViT without prefix (class/register) tokens")
        if not window_size:
            for blk in blocks:
                if isinstance(blk, WindowedBlock):
                    del blk.window_size, blk.patch_grid
                    blk.__class__ = Block
            self.window_size, self.global_blocks = None, ()
            return
        global_set = resolve_global_blocks(len(blocks), global_blocks)
        for i, blk in enumerate(blocks):
            if i in global_set:
                if isinstance(blk, WindowedBlock):
                    del blk.window_size, blk.patch_grid
                    blk.__class__ = Block
                continue
            # same object, same children and parameters: only forward changes (keys unchanged)
            blk.__class__ = WindowedBlock
            blk.window_size = int(window_size)
            blk.patch_grid = self._patch_grid
        self.window_size, self.global_blocks = int(window_size), global_set

    @property
    def windowed_blocks(self) -> tuple[int, ...]:
        return tuple(i for i, b in enumerate(self.vit.blocks) if isinstance(b, WindowedBlock))

    # ---- training utilities ----------------------------------------------------------------
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.vit.set_grad_checkpointing(enable)

    def layer_id(self, name: str) -> int:
        """Depth of a parameter for layer-wise lr decay: 0 = embeddings, i+1 = block i, L+1 = after."""
        n = name.removeprefix("vit.")
        if n.startswith(("pos_embed", "patch_embed", "cls_token", "reg_token", "norm_pre")):
            return 0
        if n.startswith("blocks."):
            return int(n.split(".")[1]) + 1
        return self.num_layers + 1

    def layer_ids(self) -> dict[str, int]:
        return {n: self.layer_id(n) for n, _ in self.named_parameters()}

    def no_weight_decay(self) -> set[str]:
        """Parameter names (relative to this module) that should not be weight-decayed."""
        return {f"vit.{n}" for n in self.vit.no_weight_decay()} | {
            n for n, p in self.named_parameters() if p.ndim <= 1
        }

    def freeze(self, num_blocks: int | None = None) -> None:
        """Freeze embeddings and the first ``num_blocks`` blocks; ``None`` freezes everything."""
        self._frozen_all = num_blocks is None
        self._frozen_blocks = self.num_layers if num_blocks is None else int(num_blocks)
        for module in self._frozen_modules():
            for p in module.parameters(recurse=True):
                p.requires_grad_(False)
        if self.vit.pos_embed is not None:
            self.vit.pos_embed.requires_grad_(False)
        self.train(self.training)

    def _frozen_modules(self) -> Iterator[nn.Module]:
        if not self._frozen_blocks and not self._frozen_all:
            return
        yield self.vit.patch_embed
        yield self.vit.norm_pre
        yield from self.vit.blocks[: self._frozen_blocks]
        if self._frozen_all:
            yield self.vit  # also its weight-less dropout layers
            yield self.vit.norm
            if self.vit.attn_pool is not None:
                yield self.vit.attn_pool

    def train(self, mode: bool = True) -> SigLIP2Backbone:
        """Frozen parts stay in eval mode (no drop path / dropout noise on features we don't train)."""
        super().train(mode)
        for module in self._frozen_modules():
            module.eval()
        return self


def warn_doubtful_heads(
    loaded: weights.LoadedCheckpoint, cfg: ArchConfig, timm_kwargs: dict[str, Any]
) -> None:
    """Say when the head count is an assumption the checkpoint cannot confirm, and how to set it.

    Heads are invisible in tensor shapes; a ``num_heads`` given by the caller (or a requested arch
    that took over a guessed count) settles it.
    """
    why = loaded.doubtful.get("num_heads")
    if why is None or "num_heads" in timm_kwargs or "num_heads" not in loaded.guessed:
        return
    warnings.warn(
        f"{loaded.path}: {why}; building {cfg.num_heads} heads. If the network has another count, set "
        "it with build_backbone(..., num_heads=N) (train.py: +backbone.num_heads=N)",
        stacklevel=3,
    )


def build_backbone(
    arch: str | None = None,
    checkpoint: str | Path | None = None,
    img_size: int | Sequence[int] | None = None,
    out_indices: Sequence[int] | int = (-1,),
    keep_head: bool = False,
    norm_intermediates: bool = True,
    dynamic_img_size: bool = True,
    dynamic_img_pad: bool = True,
    grad_checkpointing: bool = False,
    freeze_blocks: int | None = 0,
    freeze: bool = False,
    drop_path_rate: float = 0.0,
    strict: bool = True,
    verbose: bool = True,
    arch_config: ArchConfig | dict[str, Any] | None = None,
    window_size: int | None = None,
    global_blocks: Sequence[int] | None = None,
    patch_remainder: str = "pad",
    **timm_kwargs: Any,
) -> SigLIP2Backbone:
    """Build a SigLIP (2) backbone, optionally from a checkpoint of any supported format.

    Args:
        arch: a timm name (``vit_so400m_patch16_siglip_512``, tags allowed) or a short variant
            name (``so400m16``). ``None`` infers the architecture from ``checkpoint``.
        checkpoint: a file, a directory (transformers ``save_pretrained``), or a hub id resolved from
            the local Hugging Face cache. See :mod:`siglip_dense.models.weights`.
        img_size: fixed input size; the position table is resampled once to it.
        out_indices: blocks whose outputs ``forward`` returns (negative indices count from the end).
        keep_head: keep SigLIP's MAP head (only needed for ``forward_pooled``).
        freeze_blocks / freeze: freeze the first N blocks, or everything (linear probing).
        strict: shape mismatches and missing backbone keys raise (they always name the file).
        arch_config: an exact, already resolved architecture (as stored in our checkpoints); when
            given, ``arch`` only names it and no weights are read.
        window_size: ViTDet window attention: blocks other than ``global_blocks`` attend within
            non-overlapping windows of this many patches a side (the grid is padded, padding masked).
            None or 0: global attention everywhere (default). Same parameters and state-dict keys.
        global_blocks: blocks that keep global attention when ``window_size`` is set (negative count
            from the end); None takes ViTDet's default for the depth (``VITDET_GLOBAL_BLOCKS``).
        patch_remainder: an input side that is not a multiple of the patch is zero-padded up
            (``"pad"``, the default for dense tasks: every pixel is seen) or its last pixels are
            dropped (``"drop"``, what transformers, timm, open_clip and birder do: 384 px at patch 14
            -> 27 patches).

    The position table is resampled the way the checkpoint's source does it (``pos_resample`` in
    the architecture config, kept in our checkpoints): see :data:`POS_RESAMPLE`.
    """
    if arch_config is not None:
        cfg = arch_config if isinstance(arch_config, ArchConfig) else ArchConfig.from_dict(arch_config)
        arch, checkpoint = None, None
    elif arch is None and checkpoint is None:
        raise ValueError("build_backbone needs an arch, a checkpoint, or both")
    loaded = None
    if checkpoint is not None:
        loaded = weights.read_checkpoint(checkpoint, img_size=img_size)
    if arch_config is not None:
        pass
    elif arch is not None:
        cfg = arch_config_of(arch)
        if loaded is None:
            cfg.act_layer = DEFAULT_ACT
        else:
            weights.check_arch_matches(cfg, loaded)
            cfg = replace(loaded.arch, arch=cfg.arch)
    else:
        cfg = loaded.arch
        cfg.arch = cfg.arch or match_timm_arch(cfg)
    vit = create_vit(
        cfg,
        keep_head=keep_head,
        dynamic_img_size=dynamic_img_size,
        dynamic_img_pad=dynamic_img_pad,
        drop_path_rate=drop_path_rate,
        **timm_kwargs,
    )
    if loaded is not None:
        warn_doubtful_heads(loaded, cfg, timm_kwargs)
        report = weights.load_into_vit(vit, loaded, strict=strict)
        if verbose:
            print(report)
    # what was built is the truth (timm_kwargs such as patch_size may override the arch)
    built = arch_config_of_vit(vit)
    keep = dict(arch=cfg.arch, mean=cfg.mean, std=cfg.std, pos_resample=cfg.pos_resample)
    keep.update(head_norm_eps=cfg.head_norm_eps, head_act_layer=cfg.head_act_layer)
    if cfg.pos_grid is not None and built.patch_size == cfg.patch_size:
        keep.update(img_size=tuple(cfg.img_size), pos_grid=tuple(cfg.pos_grid))
    cfg = replace(built, **keep)
    backbone = SigLIP2Backbone(
        vit,
        cfg,
        out_indices=out_indices,
        norm_intermediates=norm_intermediates,
        patch_remainder=patch_remainder,
    )
    if img_size is not None:
        backbone.set_input_size(img_size)
    if window_size:
        backbone.set_window_attention(window_size, global_blocks)
    if grad_checkpointing:
        backbone.set_grad_checkpointing(True)
    if freeze:
        backbone.freeze(None)
    elif freeze_blocks:
        backbone.freeze(freeze_blocks)
    return backbone


__all__ = [
    "PATCH_REMAINDERS",
    "POS_RESAMPLE",
    "SIGLIP_MEAN",
    "SIGLIP_STD",
    "PosResample",
    "VARIANTS",
    "ArchConfig",
    "VITDET_GLOBAL_BLOCKS",
    "SigLIP2Backbone",
    "WindowedBlock",
    "arch_config_of",
    "arch_config_of_vit",
    "build_backbone",
    "create_vit",
    "match_timm_arch",
    "resample_pos_embed",
    "resolve_arch",
    "resolve_global_blocks",
]
