"""SigLIP 2 vision encoders as dense backbones, on top of timm's ``VisionTransformer``.

The backbone is a thin wrapper: timm owns the transformer (attention kernels, pos-embed
resampling, ``forward_intermediates``); we add what dense heads need — named NCHW maps for
chosen blocks, layer ids for layer-wise lr decay, freezing, and a checkpoint-driven build.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.layers import LayerNorm
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import Block, VisionTransformer, _create_vision_transformer
from torch import nn

SIGLIP_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
SIGLIP_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)

# Released SigLIP / SigLIP 2 weights were trained with tanh-approximate GELU; timm's older
# definitions (base16, large16, so400m14) declare exact GELU. We default to the weights' truth.
DEFAULT_ACT = "gelu_tanh"

# Short names used by configs and the CLI -> timm architecture names (fixed-resolution towers).
VARIANTS: dict[str, str] = {
    "tiny": "vit_tiny_patch16_siglip_128",
    "b16": "vit_base_patch16_siglip_512",
    "b16_224": "vit_base_patch16_siglip_224",
    "b16_256": "vit_base_patch16_siglip_256",
    "b16_384": "vit_base_patch16_siglip_384",
    "b32": "vit_base_patch32_siglip_256",
    "l16": "vit_large_patch16_siglip_512",
    "l16_256": "vit_large_patch16_siglip_256",
    "l16_384": "vit_large_patch16_siglip_384",
    "so400m14": "vit_so400m_patch14_siglip_378",
    "so400m14_224": "vit_so400m_patch14_siglip_224",
    "so400m16": "vit_so400m_patch16_siglip_512",
    "so400m16_256": "vit_so400m_patch16_siglip_256",
    "so400m16_384": "vit_so400m_patch16_siglip_384",
    "g16": "vit_giantopt_patch16_siglip_384",
    "g16_256": "vit_giantopt_patch16_siglip_256",
    "so400m14_v1": "vit_so400m_patch14_siglip_384",
}


# timm's register_model reads this module-level table for the pretrained_cfg (mean/std, size)
default_cfgs = generate_default_cfgs(
    {
        "vit_tiny_patch16_siglip_128": dict(
            mean=SIGLIP_MEAN, std=SIGLIP_STD, input_size=(3, 128, 128), num_classes=0, license="apache-2.0"
        )
    }
)


@register_model
def vit_tiny_patch16_siglip_128(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """A SigLIP-shaped ViT small enough to train on two CPU cores (tests, the toy default)."""
    model_args = dict(
        patch_size=16,
        embed_dim=192,
        depth=6,
        num_heads=3,
        class_token=False,
        global_pool="map",
        act_layer="gelu_tanh",
        img_size=128,
    )
    return _create_vision_transformer(
        "vit_tiny_patch16_siglip_128", pretrained=pretrained, **dict(model_args, **kwargs)
    )


def resolve_arch(arch: str) -> str:
    """Map a short variant name (``so400m16``) or a timm name with a tag (``.v2_webli``) to a timm name."""
    arch = VARIANTS.get(arch, arch)
    name = arch.split(".")[0]
    if not timm.is_model(name):
        known = ", ".join(sorted(VARIANTS))
        raise ValueError(f"unknown backbone arch {arch!r}: not a timm model nor one of {known}")
    return name


@dataclass
class ArchConfig:
    """The hyper-parameters that decide a ViT's tensor shapes and numerics.

    Always read from the checkpoint's own config (or its tensor shapes), never assumed from a name:
    the same name has shipped with different activations and layer-norm eps.
    """

    embed_dim: int
    depth: int
    num_heads: int
    mlp_dim: int
    patch_size: int
    img_size: tuple[int, int]
    norm_eps: float = 1e-6
    act_layer: str = DEFAULT_ACT
    has_head: bool = True  # the MAP (attention-pool) head is present
    arch: str | None = None  # timm name when one matches the shapes
    mean: tuple[float, ...] = SIGLIP_MEAN
    std: tuple[float, ...] = SIGLIP_STD

    def timm_kwargs(self) -> dict[str, Any]:
        """kwargs that make any timm SigLIP definition produce exactly these shapes and numerics."""
        return dict(
            embed_dim=self.embed_dim,
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_ratio=mlp_ratio_for(self.embed_dim, self.mlp_dim),
            patch_size=self.patch_size,
            img_size=tuple(self.img_size),
            act_layer=self.act_layer,
            norm_layer=functools.partial(LayerNorm, eps=self.norm_eps),
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["img_size"] = list(self.img_size)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ArchConfig:
        known = {f for f in cls.__dataclass_fields__}
        d = {k: v for k, v in d.items() if k in known}
        d["img_size"] = tuple(d["img_size"]) if "img_size" in d else None
        for k in ("mean", "std"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)

    def same_shapes(self, other: ArchConfig) -> bool:
        keys = ("embed_dim", "depth", "num_heads", "mlp_dim", "patch_size")
        return all(getattr(self, k) == getattr(other, k) for k in keys)


def mlp_ratio_for(embed_dim: int, mlp_dim: int) -> float:
    """A ratio that timm's ``int(dim * ratio)`` turns back into exactly ``mlp_dim``."""
    ratio = mlp_dim / embed_dim
    if int(embed_dim * ratio) != mlp_dim:
        ratio = (mlp_dim + 0.5) / embed_dim
    return ratio


@functools.cache
def _arch_config_cached(name: str) -> ArchConfig:
    with torch.device("meta"):
        vit = timm.create_model(name, pretrained=False, num_classes=0)
    cfg = arch_config_of_vit(vit)
    cfg.arch = name
    return cfg


def arch_config_of(arch: str) -> ArchConfig:
    """Read a timm architecture's shapes by building it on the meta device (no memory, no init)."""
    return replace(_arch_config_cached(resolve_arch(arch)))


def arch_config_of_vit(vit: VisionTransformer) -> ArchConfig:
    blk = vit.blocks[0]
    norm = vit.norm if isinstance(vit.norm, nn.LayerNorm) else blk.norm1
    return ArchConfig(
        embed_dim=vit.embed_dim,
        depth=len(vit.blocks),
        num_heads=blk.attn.num_heads,
        mlp_dim=blk.mlp.fc1.out_features,
        patch_size=vit.patch_embed.patch_size[0],
        img_size=tuple(vit.patch_embed.img_size),
        norm_eps=float(norm.eps),
        act_layer=_act_name(blk.mlp.act),
        has_head=vit.attn_pool is not None,
    )


def _act_name(act: nn.Module) -> str:
    if isinstance(act, nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    name = type(act).__name__.lower()
    return "gelu_tanh" if "tanh" in name else name


# (embed_dim, depth, num_heads, mlp_dim) of each SigLIP family, as the timm names spell them
_FAMILIES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (192, 6, 3, 768),
    "base": (768, 12, 12, 3072),
    "large": (1024, 24, 16, 4096),
    "so400m": (1152, 27, 16, 4304),
    "giantopt": (1536, 40, 16, 6144),
}
_NAME_RE = re.compile(r"^vit_(?P<family>[a-z0-9]+)_patch(?P<patch>\d+)_siglip_(?P<res>\d+)$")


def match_timm_arch(cfg: ArchConfig) -> str | None:
    """The timm SigLIP name whose shapes match ``cfg`` (for naming and pretrained_cfg), if any.

    Parsed from the registered names (building ~40 models to compare would take seconds).
    """
    best = None
    for name in timm.list_models("vit_*_siglip_*"):
        m = _NAME_RE.match(name)
        if not m or _FAMILIES.get(m["family"]) is None:
            continue
        dims = _FAMILIES[m["family"]]
        if (
            dims != (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_dim)
            or int(m["patch"]) != cfg.patch_size
        ):
            continue
        if int(m["res"]) == cfg.img_size[0] == cfg.img_size[1]:
            return name
        best = best or name
    return best


def create_vit(
    cfg: ArchConfig,
    keep_head: bool = False,
    dynamic_img_size: bool = True,
    dynamic_img_pad: bool = True,
    **timm_kwargs: Any,
) -> VisionTransformer:
    """Build the timm ViT for ``cfg`` (random weights). The MAP head is dropped unless ``keep_head``."""
    base = cfg.arch or match_timm_arch(cfg) or "vit_base_patch16_siglip_224"
    kwargs = cfg.timm_kwargs()
    kwargs.update(
        num_classes=0,
        global_pool="map" if keep_head else "",
        dynamic_img_size=dynamic_img_size,
        dynamic_img_pad=dynamic_img_pad,
    )
    kwargs.update(timm_kwargs)
    return timm.create_model(base, pretrained=False, **kwargs)


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
    """The h×w patch grid of the current forward, shared by the windowed blocks of one ViT.

    Registered as a forward hook on ``patch_embed``, so every entry point (``forward_intermediates``,
    ``forward_features``, the ViT's own ``forward``) records the grid of its input before the blocks
    run. A plain object, not a module: it adds no state-dict keys. Under gradient checkpointing the
    blocks re-read it when recomputing in backward, so run backward before a forward at another size
    (as every training step does); a token count that doesn't match the grid raises.
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
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("window attention does not take an attention mask or is_causal")
        x = x + self.drop_path1(self.ls1(self._window_attn(self.norm1(x))))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x

    def _window_attn(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        hw = self.patch_grid.hw
        if hw is None or hw[0] * hw[1] != N:
            raise RuntimeError(
                f"window attention: {N} tokens do not match the recorded patch grid {hw}; the grid is "
                "recorded by patch_embed in the same forward (no prefix tokens are supported)"
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


class SigLIP2Backbone(nn.Module):
    """A SigLIP (2) ViT that returns NCHW feature maps of chosen blocks.

    ``forward(x)`` -> ``{"blocks.<i>": B×C×h×w}`` for ``out_indices`` (through timm's
    ``forward_intermediates``); ``forward_features(x)`` -> final normed tokens B×N×C, equal to
    transformers' ``last_hidden_state``. Inputs of any size work: the position table is resampled per
    forward (``dynamic_img_size``) unless ``set_input_size`` fixed it, and inputs are padded to the
    patch size (``dynamic_img_pad``).
    """

    def __init__(
        self,
        vit: VisionTransformer,
        arch_config: ArchConfig,
        out_indices: Sequence[int] | int = (-1,),
        norm_intermediates: bool = True,
    ) -> None:
        super().__init__()
        self.vit = vit
        self.arch_config = arch_config
        self.arch = arch_config.arch or "custom"
        self.patch_size = int(vit.patch_embed.patch_size[0])
        self.embed_dim = int(vit.embed_dim)
        self.num_layers = len(vit.blocks)
        self.out_indices = _normalize_indices(out_indices, self.num_layers)
        self.norm_intermediates = norm_intermediates
        self.mean = tuple(arch_config.mean)
        self.std = tuple(arch_config.std)
        self._frozen_blocks = 0
        self._frozen_all = False
        self.window_size: int | None = None
        self.global_blocks: tuple[int, ...] = ()
        # recorded by every forward, windows or not: a compiled graph reused across two backbones of
        # one shape (torch does not guard on module hooks) then still records the grid
        self._patch_grid = _PatchGrid()
        self.vit.patch_embed.register_forward_hook(self._patch_grid)

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

    # ---- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.vit.forward_intermediates(
            x,
            indices=list(self.out_indices),
            norm=self.norm_intermediates,
            output_fmt="NCHW",
            intermediates_only=True,
            stop_early=True,
        )
        return dict(zip(self.out_keys, feats))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Final normed patch tokens B×N×C (transformers' ``last_hidden_state``)."""
        return self.vit.forward_features(x)

    def forward_pooled(self, x: torch.Tensor) -> torch.Tensor:
        """The MAP-head embedding (transformers' ``pooler_output``); needs ``keep_head=True``."""
        if self.vit.attn_pool is None:
            raise RuntimeError("this backbone was built without its MAP head: pass keep_head=True")
        return self.vit.forward_head(self.forward_features(x), pre_logits=True)

    # ---- sizes -----------------------------------------------------------------------------
    def set_input_size(self, img_size: int | Sequence[int]) -> None:
        """Resample the position table once for a fixed fine-tuning size (cheaper, compile-friendly)."""
        if isinstance(img_size, int):
            img_size = (img_size, img_size)
        self.vit.set_input_size(img_size=tuple(img_size))
        self.arch_config = replace(self.arch_config, img_size=tuple(img_size))

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """``nn.Module.compile`` with timm's position-table resampling left eager (a graph break).

        Its bicubic antialiased backward has no dynamic-shape kernel in torch ("Expected IntList but
        got GenericList"): training a compiled model at a second input size, or with
        ``dynamic=True``, would fail inside torch. The resample is one small op before the blocks.
        """
        vit = self.vit
        if "_pos_embed" not in vars(vit):  # once: compiling again keeps the eager wrapper
            vit._pos_embed = torch.compiler.disable(vit._pos_embed)
        super().compile(*args, **kwargs)

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
    """
    if arch_config is not None:
        cfg = arch_config if isinstance(arch_config, ArchConfig) else ArchConfig.from_dict(arch_config)
        arch, checkpoint = None, None
    elif arch is None and checkpoint is None:
        raise ValueError("build_backbone needs an arch, a checkpoint, or both")
    loaded = None
    if checkpoint is not None:
        from siglip_dense.models import weights  # local: weights imports this module

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
        report = weights.load_into_vit(vit, loaded, strict=strict)
        if verbose:
            print(report)
    # what was built is the truth (timm_kwargs such as patch_size may override the arch)
    cfg = replace(arch_config_of_vit(vit), arch=cfg.arch, mean=cfg.mean, std=cfg.std)
    backbone = SigLIP2Backbone(vit, cfg, out_indices=out_indices, norm_intermediates=norm_intermediates)
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
    "SIGLIP_MEAN",
    "SIGLIP_STD",
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
    "resolve_arch",
    "resolve_global_blocks",
]
