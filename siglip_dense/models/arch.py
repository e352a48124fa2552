"""SigLIP / SigLIP 2 architectures: the variant table, ``ArchConfig`` and the timm model it builds.

One module per concept, as timm does: what decides a ViT's shapes and numerics lives here, apart from
the dense backbone wrapper (:mod:`siglip_dense.models.backbone`) and the checkpoint readers
(:mod:`siglip_dense.models.weights`), which both import it. Importing this module registers our
timm models (``vit_tiny_patch16_siglip_128``).
"""

from __future__ import annotations

import functools
import re
from dataclasses import asdict, dataclass, replace
from typing import Any

import timm
import torch
from timm.layers import LayerNorm, get_act_layer
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, _create_vision_transformer
from timm.models.vision_transformer import _cfg as _vit_cfg
from torch import nn

from siglip_dense.models.pos_embed import POS_RESAMPLE

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


# timm's register_model reads this module-level table for the pretrained_cfg. timm's own ``_cfg``
# fills every field timm's model tests and tools read (first_conv, classifier, fixed_input_size,
# crop_pct, interpolation, pool_size); we set what differs, as timm's SigLIP entries do.
default_cfgs = generate_default_cfgs(
    {
        "vit_tiny_patch16_siglip_128": _vit_cfg(
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
    # how the position table is resampled to another grid: the source's own rule (POS_RESAMPLE)
    pos_resample: str = "timm"
    # the grid of the stored position table when it is kept at the source's original grid (every
    # convention but timm's resamples from the original table); None: the grid of img_size
    pos_grid: tuple[int, int] | None = None
    # the MAP head's own layer-norm eps / MLP activation where the source differs from the blocks
    # (birder's MultiHeadAttentionPool: attn_pool_norm_eps, attn_pool_act_layer_type); None: the same
    head_norm_eps: float | None = None
    head_act_layer: str | None = None

    def table_grid(self) -> tuple[int, int]:
        """The (h, w) grid of the stored position table."""
        if self.pos_grid is not None:
            return (int(self.pos_grid[0]), int(self.pos_grid[1]))
        return (int(self.img_size[0]) // self.patch_size, int(self.img_size[1]) // self.patch_size)

    def timm_kwargs(self) -> dict[str, Any]:
        """kwargs that make any timm SigLIP definition produce exactly these shapes and numerics.

        timm's ``img_size`` is the size of the stored position table's grid (the model's own input
        size is set afterwards with ``set_input_size``).
        """
        gh, gw = self.table_grid()
        return dict(
            embed_dim=self.embed_dim,
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_ratio=mlp_ratio_for(self.embed_dim, self.mlp_dim),
            patch_size=self.patch_size,
            img_size=(gh * self.patch_size, gw * self.patch_size),
            act_layer=self.act_layer,
            norm_layer=functools.partial(LayerNorm, eps=self.norm_eps),
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["img_size"] = list(self.img_size)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        d["pos_grid"] = list(self.pos_grid) if self.pos_grid is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ArchConfig:
        known = {f for f in cls.__dataclass_fields__}
        d = {k: v for k, v in d.items() if k in known}
        d["img_size"] = tuple(d["img_size"]) if "img_size" in d else None
        for k in ("mean", "std"):
            if k in d:
                d[k] = tuple(d[k])
        if d.get("pos_grid") is not None:
            d["pos_grid"] = tuple(int(v) for v in d["pos_grid"])
        if d.get("pos_resample", "timm") not in POS_RESAMPLE:
            raise ValueError(
                f"arch_config pos_resample {d['pos_resample']!r} is not one of {', '.join(POS_RESAMPLE)}"
            )
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
        act_layer=act_name(blk.mlp.act),
        has_head=vit.attn_pool is not None,
    )


def act_name(act: nn.Module) -> str:
    if isinstance(act, nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    name = type(act).__name__.lower()
    return "gelu_tanh" if "tanh" in name else name


# (embed_dim, depth, num_heads, mlp_dim) of each SigLIP family, as the timm names spell them
FAMILIES: dict[str, tuple[int, int, int, int]] = {
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
        if not m or FAMILIES.get(m["family"]) is None:
            continue
        dims = FAMILIES[m["family"]]
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
    vit = timm.create_model(base, pretrained=False, **kwargs)
    if vit.attn_pool is not None and cfg.head_norm_eps is not None:
        vit.attn_pool.norm.eps = float(cfg.head_norm_eps)
    if vit.attn_pool is not None and cfg.head_act_layer is not None:
        vit.attn_pool.mlp.act = get_act_layer(cfg.head_act_layer)()
    return vit


__all__ = [
    "DEFAULT_ACT",
    "FAMILIES",
    "SIGLIP_MEAN",
    "SIGLIP_STD",
    "VARIANTS",
    "ArchConfig",
    "act_name",
    "arch_config_of",
    "arch_config_of_vit",
    "create_vit",
    "match_timm_arch",
    "mlp_ratio_for",
    "resolve_arch",
]
