"""Checkpoint formats -> timm ``VisionTransformer`` state dicts.

SigLIP (2) vision towers ship in five layouts: timm, open_clip (timm keys under ``visual.trunk.``),
transformers (``SiglipVisionModel`` / ``SiglipModel`` / ``Siglip2VisionModel``), big_vision ``.npz``,
and our own export (safetensors + JSON config). Everything is mapped onto timm's keys, and the
architecture is read from the checkpoint itself (its config, else tensor shapes), because the same
model name has shipped with different activations and layer-norm eps.

Offline first: hub ids resolve from the local Hugging Face cache only; nothing is downloaded.
Torch pickles load with ``weights_only=True``.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from siglip_dense.models.arch import (
    DEFAULT_ACT,
    FAMILIES,
    SIGLIP_MEAN,
    SIGLIP_STD,
    ArchConfig,
    act_name,
    arch_config_of,
    create_vit,
)
from siglip_dense.models.pos_embed import resample_pos_embed

FORMAT_NAME = "siglip_dense"
# siglip_dense.checkpoints.EXPORT_FORMAT (not imported: checkpoints imports the tasks, which import us)
EXPORT_FORMAT = "siglip_dense.export.v1"
HF_MODEL_TYPES = ("siglip", "siglip_vision_model", "siglip2", "siglip2_vision_model")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".npz")
# preferred weight files inside a directory, best first
_DIR_WEIGHT_NAMES = (
    "model.safetensors",
    "open_clip_model.safetensors",
    "pytorch_model.bin",
    "open_clip_pytorch_model.bin",
)
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TIMM_ANCHOR = "patch_embed.proj.weight"
_HF_ANCHOR = "embeddings.patch_embedding.weight"
_BIRDER_ANCHOR = "encoder.block.0.mlp.0.weight"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit; the message names the file and keys."""


@dataclass
class LoadedCheckpoint:
    """A checkpoint translated to timm ``VisionTransformer`` keys, with the architecture it implies."""

    state_dict: dict[str, Tensor]
    arch: ArchConfig
    source_format: str
    path: Path
    dropped_keys: list[str] = field(default_factory=list)
    # ArchConfig fields that were guessed (no config, not derivable from tensor shapes)
    guessed: set[str] = field(default_factory=set)
    # guessed fields whose guess is doubtful -> why (build_backbone warns unless the caller sets them)
    doubtful: dict[str, str] = field(default_factory=dict)


@dataclass
class LoadReport:
    """What ``load_into_vit`` did, for logs (``print(report)``) and tests."""

    path: Path
    source_format: str
    loaded: list[str]
    missing: list[str]
    unexpected: list[str]
    reshaped: list[str]
    skipped_head: list[str]
    mismatched: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        parts = [f"loaded {len(self.loaded)} tensors from {self.path} ({self.source_format})"]
        for name in ("missing", "unexpected", "mismatched", "reshaped", "skipped_head"):
            keys = getattr(self, name)
            if keys:
                parts.append(f"{name.replace('_', ' ')} {len(keys)}: {_first(keys)}")
        return "; ".join(parts)


def key_groups(keys: Any) -> list[str]:
    """State-dict keys shortened to their block (``blocks.3.attn.qkv.weight`` → ``blocks.3``, up to
    the first numeric part); keys without one stay whole. First-seen order, no repeats."""
    out: dict[str, None] = {}
    for key in keys:
        parts = str(key).split(".")
        cut = next((i + 1 for i, p in enumerate(parts) if p.isdigit()), len(parts))
        out.setdefault(".".join(parts[:cut]), None)
    return list(out)


def _first(keys: Any, n: int = 5) -> str:
    keys = list(keys)
    more = f", ... (+{len(keys) - n})" if len(keys) > n else ""
    return ", ".join(str(k) for k in keys[:n]) + more


# ------------------------------------------------------------------------------------------------
# locating the files
# ------------------------------------------------------------------------------------------------
def hf_cache_dir() -> Path:
    """The hub cache, read from the environment at call time (huggingface_hub reads it at import)."""
    env = os.environ
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    if env.get("HUGGINGFACE_HUB_CACHE"):
        return Path(env["HUGGINGFACE_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def resolve_source(src: str | Path) -> Path:
    """A local file/directory as given, or a hub id (``org/name``) resolved from the local cache only."""
    path = Path(src).expanduser()
    if path.exists():
        return path
    text = str(src)
    repo_id = text.removeprefix("hf-hub:").removeprefix("hf_hub:")
    if not _HUB_ID_RE.match(repo_id) or text.endswith(_WEIGHT_SUFFIXES):
        raise CheckpointError(f"checkpoint {text!r} does not exist (neither a file nor a directory)")
    cache = hf_cache_dir()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True))
    except Exception as e:  # LocalEntryNotFoundError and friends, across hub versions
        raise CheckpointError(
            f"checkpoint {repo_id!r} is not a local path and is not in the local Hugging Face cache "
            f"({cache}); nothing is downloaded at run time. Fix: run `huggingface-cli download {repo_id}` "
            f"on a machine with network access (and copy the cache, or set HF_HUB_CACHE), or pass a local "
            f"file / directory, or convert one with `python tools/convert_weights.py SRC OUT.safetensors`. "
            f"({type(e).__name__})"
        ) from None


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read JSON config ({e})") from None


def _is_hf_config(cfg: dict[str, Any]) -> bool:
    return cfg.get("model_type") in HF_MODEL_TYPES or (
        isinstance(cfg.get("vision_config"), dict) and "architecture" not in cfg
    )


# ------------------------------------------------------------------------------------------------
# raw readers
# ------------------------------------------------------------------------------------------------
def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, meta  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as e:  # SafetensorError, OSError: truncated or not a safetensors file
        raise CheckpointError(
            f"{path}: not a readable safetensors file (truncated or corrupt?): {e}"
        ) from None


def _unwrap(obj: Any, path: Path) -> dict[str, Tensor]:
    """Find the tensor dict inside common training containers (``state_dict``, ``model``, ``ema``)."""
    for _ in range(4):
        if not isinstance(obj, dict):
            break
        if obj and all(isinstance(v, Tensor) for v in obj.values()):
            return obj
        for key in ("state_dict", "state", "model", "module", "model_ema", "state_dict_ema", "params"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        else:
            tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
            if tensors:
                return tensors
            break
    keys = list(obj.keys()) if isinstance(obj, dict) else [type(obj).__name__]
    raise CheckpointError(f"{path}: no tensor state dict found; top-level keys: {_first(keys)}")


def _read_torch(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """A torch pickle's tensors, and birder's container metadata (as its safetensors stores it)."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        globals_ = re.findall(r"Unsupported global: GLOBAL (\S+)", str(e))
        if globals_:
            raise CheckpointError(
                f"{path}: refused to unpickle {', '.join(sorted(set(globals_)))}: checkpoints are loaded with "
                f"torch.load(weights_only=True), which allows only tensors and plain containers. Re-save the "
                f"state dict alone (or as safetensors) from code you trust."
            ) from None
        raise CheckpointError(f"{path}: not a readable torch checkpoint (truncated or corrupt?)") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise CheckpointError(
            f"{path}: not a readable torch checkpoint (truncated or corrupt?): {e}"
        ) from None
    meta: dict[str, str] = {}
    ours = obj.get("siglip_dense") if isinstance(obj, dict) else None
    if isinstance(ours, dict) and ours.get("arch_config"):  # our Lightning task checkpoint
        meta = {"format": FORMAT_NAME, "arch_config": json.dumps(ours["arch_config"])}
    if isinstance(obj, dict) and "birder_version" in obj:  # birder's checkpoint_model container
        for key in ("birder_version", "task", "signature", "config", "rgb_stats"):
            if key in obj:
                meta[key] = obj[key] if isinstance(obj[key], str) else json.dumps(obj[key])
    return _unwrap(obj, path), meta


def _read_tensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    return _read_torch(path)


def _read_hf_weights(directory: Path) -> tuple[dict[str, Tensor], Path]:
    """transformers weights in a save_pretrained dir: single file, or shards listed in an index."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return _read_tensors(directory / name)[0], directory / name
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / index_name
        if index.is_file():
            shards = sorted(set(_json(index).get("weight_map", {}).values()))
            sd: dict[str, Tensor] = {}
            for shard in shards:
                if not (directory / shard).is_file():
                    raise CheckpointError(f"{index}: shard {shard} is missing")
                sd.update(_read_tensors(directory / shard)[0])
            return sd, index
    shards = sorted(directory.glob("*.safetensors"))
    if shards:
        sd = {}
        for shard in shards:
            sd.update(_read_safetensors(shard)[0])
        return sd, directory
    raise CheckpointError(
        f"{directory}: has a transformers config.json but no weights "
        f"(model.safetensors, sharded *.safetensors with index, or pytorch_model.bin)"
    )


# ------------------------------------------------------------------------------------------------
# architecture inference
# ------------------------------------------------------------------------------------------------
def _guess_heads(embed_dim: int, depth: int, mlp_dim: int) -> int:
    """Heads are invisible in tensor shapes: use the SigLIP family table, else 64-wide heads."""
    for dims in FAMILIES.values():
        if dims[0] == embed_dim and dims[1] == depth and dims[3] == mlp_dim:
            return dims[2]
    for dims in FAMILIES.values():
        if dims[0] == embed_dim:
            return dims[2]
    for head_dim in (64, 72, 96, 32):
        if embed_dim % head_dim == 0:
            return embed_dim // head_dim
    return 1


def _act(name: str | None) -> str:
    if not name:
        return DEFAULT_ACT
    name = name.lower()
    if "tanh" in name or name in ("gelu_new", "gelu_fast", "gelu_approximate"):
        return "gelu_tanh"
    if name in ("gelu", "gelu_exact", "gelu_python"):
        return "gelu"
    return name


def _grid_of(num_tokens: int, path: Path) -> int:
    grid = math.isqrt(num_tokens)
    if grid * grid != num_tokens:
        raise CheckpointError(f"{path}: position table of {num_tokens} tokens is not a square grid")
    return grid


def _count_blocks(keys: Any, pattern: str) -> int:
    rx = re.compile(pattern)
    ids = {int(m.group(1)) for k in keys if (m := rx.match(k))}
    return max(ids) + 1 if ids else 0


def _timm_arch(sd: dict[str, Tensor], path: Path, hints: dict[str, Any]) -> tuple[ArchConfig, set[str]]:
    """Shapes from a timm-keyed state dict; heads / eps / act from ``hints`` (a config) when known."""
    w = sd[_TIMM_ANCHOR]
    embed_dim, patch = int(w.shape[0]), int(w.shape[-1])
    depth = _count_blocks(sd, r"^blocks\.(\d+)\.")
    if depth == 0 or "blocks.0.mlp.fc1.weight" not in sd:
        raise CheckpointError(f"{path}: timm-style keys without transformer blocks: {_first(sd)}")
    mlp_dim = int(sd["blocks.0.mlp.fc1.weight"].shape[0])
    given = tuple(int(v) for v in hints["img_size"]) if hints.get("img_size") else None
    if "pos_embed" in sd and given and (given[0] // patch) * (given[1] // patch) == sd["pos_embed"].shape[1]:
        img_size = given  # a non-square table whose size the checkpoint states (birder's signature)
    elif "pos_embed" in sd:
        grid = _grid_of(int(sd["pos_embed"].shape[1]), path)
        img_size = (grid * patch, grid * patch)
    else:
        img_size = tuple(hints.get("img_size") or (224, 224))
    guessed: set[str] = set()
    heads = hints.get("num_heads")
    if heads is None:
        heads = _guess_heads(embed_dim, depth, mlp_dim)
        guessed.add("num_heads")
    cfg = ArchConfig(
        embed_dim=embed_dim,
        depth=depth,
        num_heads=int(heads),
        mlp_dim=mlp_dim,
        patch_size=patch,
        img_size=img_size,
        norm_eps=float(hints.get("norm_eps", 1e-6)),
        act_layer=_act(hints.get("act_layer")),
        has_head=any(k.startswith("attn_pool.") for k in sd),
        arch=hints.get("arch"),
        head_norm_eps=hints.get("head_norm_eps"),
        head_act_layer=hints.get("head_act_layer"),
        mean=tuple(hints.get("mean") or SIGLIP_MEAN),
        std=tuple(hints.get("std") or SIGLIP_STD),
    )
    return cfg, guessed


def _timm_hints(config: dict[str, Any] | None) -> dict[str, Any]:
    """What a timm hub ``config.json`` (architecture + pretrained_cfg + model_args) tells beyond shapes."""
    if not config:
        return {}
    hints: dict[str, Any] = {}
    name = config.get("architecture") or config.get("timm_model_name")
    if name:
        try:
            ref = arch_config_of(name)
            # not the activation: timm's older SigLIP definitions (base16, large16, so400m14) build exact
            # GELU, but every SigLIP / SigLIP 2 checkpoint was trained with tanh-GELU (big_vision;
            # transformers' gelu_pytorch_tanh), so DEFAULT_ACT applies unless model_args says otherwise
            hints.update(num_heads=ref.num_heads, norm_eps=ref.norm_eps, arch=ref.arch)
        except ValueError:
            pass
    args = config.get("model_args") or {}
    if "num_heads" in args:
        hints["num_heads"] = args["num_heads"]
    if isinstance(args.get("act_layer"), str):
        hints["act_layer"] = args["act_layer"]
    pcfg = config.get("pretrained_cfg") or {}
    for k in ("mean", "std"):
        if pcfg.get(k):
            hints[k] = tuple(pcfg[k])
    return hints


# ------------------------------------------------------------------------------------------------
# format converters
# ------------------------------------------------------------------------------------------------
def _strip_prefix(sd: dict[str, Tensor], anchor: str, exclude: str | None = None) -> tuple[str, dict, list]:
    """Keys under the shortest prefix that holds ``anchor``: (prefix, stripped dict, dropped keys)."""
    hits = [k for k in sd if k.endswith(anchor) and (exclude is None or exclude not in k)]
    prefix = min((k[: -len(anchor)] for k in hits), key=len)
    kept = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    dropped = [k for k in sd if not k.startswith(prefix)]
    return prefix, kept, dropped


def _from_timm_keys(sd: dict[str, Tensor], path: Path, hints: dict[str, Any], fmt: str) -> LoadedCheckpoint:
    prefix, kept, dropped = _strip_prefix(sd, _TIMM_ANCHOR)
    if fmt == "timm" and prefix.endswith("visual.trunk."):
        fmt = "open_clip"
    # classifier heads (head.weight, a projection) are not part of a dense backbone
    for k in [k for k in kept if k.startswith("head.")]:
        dropped.append(prefix + k)
        del kept[k]
    cfg, guessed = _timm_arch(kept, path, hints)
    return LoadedCheckpoint(kept, cfg, fmt, path, dropped, guessed)


_TIMM_NAFLEX_ANCHOR = "embeds.proj.weight"


def _timm_naflex_model(path: Path, config: dict[str, Any] | None) -> Any:
    """The timm NaFlexVit a hub ``config.json`` names, built on the meta device (no memory, no init):
    its settings decide heads, activation and the position-table rule."""
    import timm

    name = (config or {}).get("architecture")
    if not name or not timm.is_model(name):
        raise CheckpointError(
            f"{path}: timm NaFlexVit keys (embeds.proj, embeds.pos_embed) without a config.json naming the "
            f"timm architecture: pass the hub directory (timm/naflexvit_*_siglip.*), or the same weights as a "
            f"transformers Siglip2 NaFlex directory or a big_vision .npz"
        )
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, **(config.get("model_args") or {}))


def _from_timm_naflex(sd: dict[str, Tensor], path: Path, config: dict[str, Any] | None) -> LoadedCheckpoint:
    """timm ``NaFlexVit`` (``naflexvit_*_siglip``; timm/models/naflexvit.py) -> timm ViT keys.

    Its patch embedding is ``nn.Linear`` over patches flattened (p, p, C) (``batch_patchify``,
    channels-last), its table a (1, h, w, C) grid resampled per input grid by ``F.interpolate``
    (``pos_embed_interp_mode``, ``pos_embed_antialias``, from the stored table): SigLIP's
    bilinear + antialias is our ``naflex`` rule. Other settings are refused, naming them.
    """
    prefix, kept, dropped = _strip_prefix(sd, _TIMM_NAFLEX_ANCHOR)
    model = _timm_naflex_model(path, config)
    emb = model.embeds
    settings = {
        "pos_embed_interp_mode": emb.pos_embed_interp_mode,
        "pos_embed_antialias": emb.pos_embed_antialias,
        "pos_embed_align_corners": emb.pos_embed_align_corners,
        "pos_embed_ar_preserving": emb.pos_embed_ar_preserving,
        "channels_last": emb.channels_last,
        "linear patch embedding": emb.is_linear,
    }
    want = ("bilinear", True, False, False, True, True)
    odd = {k: v for (k, v), w in zip(settings.items(), want, strict=True) if v != w}
    extra = [
        k
        for k in kept
        if k.startswith("embeds.") and k not in ("embeds.proj.weight", "embeds.proj.bias", "embeds.pos_embed")
    ]
    if odd or extra or "embeds.pos_embed" not in kept or kept["embeds.pos_embed"].ndim != 4:
        raise CheckpointError(
            f"{path}: timm NaFlexVit with {odd or ''} {extra or ''} is not the SigLIP 2 NaFlex layout this "
            f"backbone reproduces (learned (1, h, w, C) table, bilinear + antialias, linear (p, p, C) patches)"
        )
    pos = kept.pop("embeds.pos_embed")
    channels = 3
    kept["patch_embed.proj.weight"] = _patch_linear_to_conv(kept.pop("embeds.proj.weight"), channels)
    if "embeds.proj.bias" in kept:
        kept["patch_embed.proj.bias"] = kept.pop("embeds.proj.bias")
    grid = (int(pos.shape[1]), int(pos.shape[2]))
    kept["pos_embed"] = pos.reshape(1, grid[0] * grid[1], pos.shape[-1])
    for k in [k for k in kept if k.startswith("head.")]:
        dropped.append(prefix + k)
        del kept[k]
    blk = model.blocks[0]
    hints = {
        "num_heads": blk.attn.num_heads,
        "norm_eps": float(model.norm.eps),
        "act_layer": act_name(blk.mlp.act),
        "img_size": (grid[0] * int(emb.patch_size[0]), grid[1] * int(emb.patch_size[1])),
    }
    pcfg = config.get("pretrained_cfg") or {}
    for k in ("mean", "std"):
        if pcfg.get(k):
            hints[k] = tuple(pcfg[k])
    cfg, guessed = _timm_arch(kept, path, hints)
    cfg.pos_resample = "naflex"
    return LoadedCheckpoint(kept, cfg, "timm_naflex", path, dropped, guessed)


def _patch_linear_to_conv(w: Tensor, channels: int = 3) -> Tensor:
    """NaFlex ``nn.Linear`` over patches flattened (p, p, C) -> conv weight [C_out, C, p, p]."""
    out, numel = w.shape
    patch = math.isqrt(numel // channels)
    return w.reshape(out, patch, patch, channels).permute(0, 3, 1, 2).contiguous()


def resize_naflex_pos_embed(table: Tensor, grid: tuple[int, int]) -> Tensor:
    """[N, C] NaFlex position table -> [1, h*w, C], as transformers' ``Siglip2VisionEmbeddings`` does.

    Bilinear, antialias, align_corners=False, computed in float32 (cast back to the table's dtype).
    """
    size = math.isqrt(table.shape[0])
    x = table.reshape(size, size, -1).permute(2, 0, 1)[None].float()
    if tuple(grid) != (size, size):
        x = F.interpolate(x, size=tuple(grid), mode="bilinear", align_corners=False, antialias=True)
    return x[0].permute(1, 2, 0).reshape(1, grid[0] * grid[1], -1).to(table.dtype)


def _grid_for(img_size: int | tuple[int, ...] | list[int] | None, patch: int) -> tuple[int, int] | None:
    if img_size is None:
        return None
    hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    return hw[0] // patch, hw[1] // patch


def _from_transformers(
    sd: dict[str, Tensor],
    path: Path,
    config: dict[str, Any] | None,
    img_size: int | tuple[int, ...] | None,
) -> LoadedCheckpoint:
    """transformers Siglip / Siglip2 vision tower (any of its key prefixes) -> timm keys."""
    prefix, hf, dropped = _strip_prefix(sd, _HF_ANCHOR, exclude="text_model")
    vcfg: dict[str, Any] = {}
    if config:
        vcfg = config["vision_config"] if isinstance(config.get("vision_config"), dict) else config
    model_type = (config or {}).get("model_type")
    if (model_type and model_type not in HF_MODEL_TYPES) or "embeddings.class_embedding" in hf:
        # CLIP-like towers share key names but not the architecture (class token, pre-norm)
        raise CheckpointError(
            f"{path}: transformers model_type {model_type or 'with a class token'} is not SigLIP; "
            f"supported: {', '.join(HF_MODEL_TYPES)}"
        )
    consumed: set[str] = set()

    def take(key: str) -> Tensor:
        if key not in hf:
            raise CheckpointError(f"{path}: transformers checkpoint lacks {prefix + key!r}")
        consumed.add(key)
        return hf[key]

    pw = take("embeddings.patch_embedding.weight")
    naflex = pw.ndim == 2
    channels = int(vcfg.get("num_channels", 3))
    conv_w = _patch_linear_to_conv(pw, channels) if naflex else pw
    embed_dim, patch = int(conv_w.shape[0]), int(conv_w.shape[-1])
    if vcfg.get("patch_size") and int(vcfg["patch_size"]) != patch:
        raise CheckpointError(f"{path}: config patch_size {vcfg['patch_size']} != weights' patch {patch}")
    depth = _count_blocks(hf, r"^encoder\.layers\.(\d+)\.")
    out: dict[str, Tensor] = {
        "patch_embed.proj.weight": conv_w,
        "patch_embed.proj.bias": take("embeddings.patch_embedding.bias"),
    }
    table = take("embeddings.position_embedding.weight")
    own_grid = _grid_of(int(table.shape[0]), path)
    # the table stays at its own grid: every input grid is resampled from it, as transformers does
    out["pos_embed"] = table[None]
    if naflex:
        grid = _grid_for(img_size, patch) or (own_grid, own_grid)
    else:
        grid = (own_grid, own_grid)
    for i in range(depth):
        s, t = f"encoder.layers.{i}.", f"blocks.{i}."
        for n in ("weight", "bias"):
            out[f"{t}norm1.{n}"] = take(f"{s}layer_norm1.{n}")
            out[f"{t}norm2.{n}"] = take(f"{s}layer_norm2.{n}")
            out[f"{t}attn.qkv.{n}"] = torch.cat([take(f"{s}self_attn.{p}_proj.{n}") for p in "qkv"])
            out[f"{t}attn.proj.{n}"] = take(f"{s}self_attn.out_proj.{n}")
            out[f"{t}mlp.fc1.{n}"] = take(f"{s}mlp.fc1.{n}")
            out[f"{t}mlp.fc2.{n}"] = take(f"{s}mlp.fc2.{n}")
    for n in ("weight", "bias"):
        out[f"norm.{n}"] = take(f"post_layernorm.{n}")
    has_head = "head.probe" in hf
    if has_head:
        out["attn_pool.latent"] = take("head.probe")
        in_w, in_b = take("head.attention.in_proj_weight"), take("head.attention.in_proj_bias")
        out["attn_pool.q.weight"], out["attn_pool.kv.weight"] = in_w[:embed_dim], in_w[embed_dim:]
        out["attn_pool.q.bias"], out["attn_pool.kv.bias"] = in_b[:embed_dim], in_b[embed_dim:]
        for n in ("weight", "bias"):
            out[f"attn_pool.proj.{n}"] = take(f"head.attention.out_proj.{n}")
            out[f"attn_pool.norm.{n}"] = take(f"head.layernorm.{n}")
            out[f"attn_pool.mlp.fc1.{n}"] = take(f"head.mlp.fc1.{n}")
            out[f"attn_pool.mlp.fc2.{n}"] = take(f"head.mlp.fc2.{n}")
    dropped += [prefix + k for k in hf if k not in consumed]
    mlp_dim = int(out["blocks.0.mlp.fc1.weight"].shape[0])
    guessed: set[str] = set()
    if "num_attention_heads" in vcfg:
        heads = int(vcfg["num_attention_heads"])
    else:
        heads = _guess_heads(embed_dim, depth, mlp_dim)
        guessed.add("num_heads")
    if (
        int(vcfg.get("hidden_size", embed_dim)) != embed_dim
        or int(vcfg.get("num_hidden_layers", depth)) != depth
    ):
        raise CheckpointError(
            f"{path}: config.json (hidden_size={vcfg.get('hidden_size')}, "
            f"num_hidden_layers={vcfg.get('num_hidden_layers')}) disagrees with the weights "
            f"(embed_dim={embed_dim}, depth={depth})"
        )
    cfg = ArchConfig(
        embed_dim=embed_dim,
        depth=depth,
        num_heads=heads,
        mlp_dim=mlp_dim,
        patch_size=patch,
        img_size=(grid[0] * patch, grid[1] * patch),
        norm_eps=float(vcfg.get("layer_norm_eps", 1e-6)),
        act_layer=_act(vcfg.get("hidden_act")),
        has_head=has_head,
        pos_resample="naflex" if naflex else "transformers",
        pos_grid=(own_grid, own_grid) if grid != (own_grid, own_grid) else None,
    )
    return LoadedCheckpoint(out, cfg, "transformers", path, dropped, guessed)


# birder ViT -> timm: encoder.block.N -> blocks.N; its FFN is nn.Sequential(fc1, act, drop, fc2, drop)
_BIRDER_RENAMES = (
    (re.compile(r"^conv_proj\."), "patch_embed.proj."),
    (re.compile(r"^pos_embedding$"), "pos_embed"),
    (re.compile(r"^encoder\.block\.(\d+)\."), r"blocks.\1."),
    (re.compile(r"\.mlp\.0\."), ".mlp.fc1."),
    (re.compile(r"\.mlp\.3\."), ".mlp.fc2."),
)
# birder config keys whose non-default values SigLIP2Backbone cannot reproduce
_BIRDER_DEFAULTS: dict[str, Any] = {
    "pre_norm": False,
    "post_norm": True,
    "norm_layer_type": "LayerNorm",
    "mlp_layer_type": "FFN",
    "qk_norm": False,
    "attn_norm": False,
    "layer_scale_init_value": None,
    "num_reg_tokens": 0,
    "class_token": False,
    "stem_type": "patchify",
}
# birder's table rule (pos_embed_interpolation_mode, pos_embed_antialias) -> our POS_RESAMPLE entry
_BIRDER_POS_RULES = {("bicubic", False): "birder", ("bilinear", True): "naflex"}
# birder's registered configs (net/_vit_configs.py, net/naflex_vit.py, birder 0.8.4) of the networks it
# ships SigLIP weights for, as far as they change numerics; used when birder itself is not installed
# (tests/test_fix16.py checks them against birder's registry). A birder file stores only overrides.
_BIRDER_SIGLIP_NETS: dict[str, dict[str, Any]] = {
    **{n: {"attn_pool_norm_eps": 1e-6} for n in ("vit_b16_ap_c1", "vit_l16_ap_c1", "vit_so400m_p14_ap_c1")},
    **{
        n: {
            "attn_pool_norm_eps": 1e-6,
            "attn_pool_act_layer_type": "gelu_tanh",
            "act_layer_type": "gelu_tanh",
            "pos_embed_interpolation_mode": "bilinear",
            "pos_embed_antialias": True,
            "naflex_pos_embed_resize_mode": "interpolate",
        }
        for n in ("naflex_i_vit_b16_ap_c1", "naflex_i_vit_so400m_p16_ap_c1")
    },
}
_BIRDER_NUMERICS = (
    "act_layer_type",
    "attn_pool_act_layer_type",
    "attn_pool_norm_eps",
    "norm_layer_eps",
    "pos_embed_interpolation_mode",
    "pos_embed_antialias",
)


def _meta_json(meta: dict[str, str], key: str, path: Path) -> Any:
    if not meta.get(key):
        return None
    try:
        return json.loads(meta[key])
    except ValueError:
        raise CheckpointError(f"{path}: birder metadata {key!r} is not JSON") from None


def _birder_registry() -> dict[str, dict[str, Any]] | None:
    """birder's registered network configs by name (None: birder is not installed)."""
    try:
        from birder.model_registry import registry
    except ImportError:
        return None
    return {name: dict(t.config or {}) for name, t in registry.registered_configs.items()}


def _birder_network(path: Path, names: Any) -> str | None:
    """The registered network a birder file was saved from: birder names files ``<network>_<epoch>.pt``
    and its hub weights ``<network>_<tag>.pt``; the file itself does not store the name."""
    stem = path.stem.lower()
    hits = [n for n in names if stem == n or stem.startswith(n + "_")]
    return max(hits, key=len) if hits else None


def _birder_config(meta: dict[str, str], path: Path) -> tuple[dict[str, Any], str | None]:
    """The network's registered config updated by the file's overrides (what birder itself builds),
    and the registered network's name (None: the file name names none)."""
    own = _meta_json(meta, "config", path) or {}
    registered = _birder_registry()
    network = _birder_network(path, registered if registered is not None else _BIRDER_SIGLIP_NETS)
    if network is None:
        if own.get("act_layer_type") is None:
            warnings.warn(
                f"{path}: birder file without a registered network name, read with birder's ViT class "
                f"defaults (exact GELU, bicubic table); birder's SigLIP 2 networks "
                f"({', '.join(sorted(_BIRDER_SIGLIP_NETS))}) register other numerics: keep birder's file "
                f"name <network>_<epoch>.pt (or <network>_<tag>.pt) so the loader can read them",
                stacklevel=3,
            )
        return own, None
    base = registered[network] if registered is not None else _BIRDER_SIGLIP_NETS[network]
    return {**base, **own}, network


def _birder_heads_doubt(
    config: dict[str, Any], own: dict[str, Any], network: str | None, cfg: ArchConfig
) -> str | None:
    """Why the head count of a birder file is only assumed, or None when the file fixes it.

    birder's ``.pt`` stores only the overrides of its registered network config (often none), so
    the heads come from the registered network its file name names. Widths read from the tensors
    that differ from that network's say the file holds another network: its heads are unknown.
    """
    if "num_heads" in own or network is None or "num_heads" not in config:
        return None
    widths = {"hidden_dim": cfg.embed_dim, "mlp_dim": cfg.mlp_dim, "num_layers": cfg.depth}
    differ = {k: (v, config[k]) for k, v in widths.items() if k in config and int(config[k]) != v}
    if not differ:
        return None
    shown = ", ".join(f"{k} {mine} (registered {theirs})" for k, (mine, theirs) in differ.items())
    return (
        f"its tensors are not birder's registered {network} ({shown}) and the file stores no "
        f"network config: its head count {int(config['num_heads'])} (the registered network's) is assumed"
    )


def _from_birder(sd: dict[str, Tensor], meta: dict[str, str], path: Path) -> LoadedCheckpoint:
    """birder ``vit_*`` (e.g. ``vit_so400m_p14_ap``): ``.pt`` ``{"state": ...}`` or ``.safetensors``.

    Keys from birder's ``ViT`` (net/vit.py); exact GELU unless its config names another activation;
    the position table is resampled as birder's ``_get_pos_embed`` does (bicubic, no antialias).
    """
    config, network = _birder_config(meta, path)
    odd = {k: config[k] for k, v in _BIRDER_DEFAULTS.items() if k in config and config[k] != v}
    rule = (
        config.get("pos_embed_interpolation_mode", "bicubic"),
        bool(config.get("pos_embed_antialias", False)),
    )
    if rule not in _BIRDER_POS_RULES:
        odd["pos_embed_interpolation_mode, pos_embed_antialias"] = rule
    if odd:
        raise CheckpointError(
            f"{path}: birder config {odd} is not a SigLIP-shaped ViT this backbone reproduces"
        )
    if any(k in sd for k in ("class_token", "reg_tokens")):
        raise CheckpointError(f"{path}: birder ViT with class/register tokens is not SigLIP-shaped")
    out: dict[str, Tensor] = {}
    dropped: list[str] = []
    for key, value in sd.items():
        if key.startswith(("classifier.", "embedding_norm.")):
            dropped.append(key)
            continue
        new = key
        for rx, repl in _BIRDER_RENAMES:
            new = rx.sub(repl, new)
        out[new] = value
    signature = _meta_json(meta, "signature", path) or {}
    try:
        h, w = (int(v) for v in signature["inputs"][0]["data_shape"][2:4])
    except (KeyError, IndexError, TypeError, ValueError):
        h = w = None
    hints: dict[str, Any] = {
        "act_layer": config.get("act_layer_type") or "gelu",  # birder's FFN default: nn.GELU (exact)
        "norm_eps": float(config.get("norm_layer_eps", 1e-6)),
    }
    if any(k.startswith("attn_pool.") for k in out):  # birder's MultiHeadAttentionPool defaults
        hints["head_norm_eps"] = float(config.get("attn_pool_norm_eps", 1e-5))
        hints["head_act_layer"] = _act(config.get("attn_pool_act_layer_type") or "gelu")
    if "num_heads" in config:
        hints["num_heads"] = int(config["num_heads"])
    stats = _meta_json(meta, "rgb_stats", path) or {}
    if stats.get("mean") and stats.get("std"):
        hints["mean"], hints["std"] = tuple(stats["mean"]), tuple(stats["std"])
    if "pos_embed" in out and h and w:
        patch = int(out[_TIMM_ANCHOR].shape[-1])
        if (h // patch) * (w // patch) != out["pos_embed"].shape[1]:
            raise CheckpointError(
                f"{path}: birder signature size {h}×{w} does not match its {out['pos_embed'].shape[1]}-token table"
            )
        hints["img_size"] = (h, w)
    if _TIMM_ANCHOR not in out:
        raise CheckpointError(f"{path}: birder checkpoint without conv_proj.weight: {_first(sd)}")
    cfg, guessed = _timm_arch(out, path, hints)
    cfg.pos_resample = _BIRDER_POS_RULES[rule]
    loaded = LoadedCheckpoint(out, cfg, "birder", path, dropped, guessed)
    doubt = _birder_heads_doubt(config, _meta_json(meta, "config", path) or {}, network, cfg)
    if doubt is not None:
        loaded.guessed.add("num_heads")
        loaded.doubtful["num_heads"] = doubt
    return loaded


def _naflex_npz_as_fixed(path: Path, prefix: str, patch: int, channels: int) -> io.BytesIO:
    """A big_vision NaFlex archive rewritten in the fixed-resolution layout timm's loader reads.

    NaFlex embeds patches with a Dense layer over (p, p, C)-flattened pixels, kernel (p·p·C, D), and
    stores its position table as an (n, n, D) grid; the conv layout is kernel (p, p, C, D) and
    table (1, n·n, D). Same numbers, other shapes (an in-memory copy of the archive).
    """
    import numpy as np

    with np.load(str(path), allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    kernel = arrays[f"{prefix}embedding/kernel"]
    arrays[f"{prefix}embedding/kernel"] = kernel.reshape(patch, patch, channels, kernel.shape[-1])
    pos = arrays[f"{prefix}pos_embedding"]
    if pos.ndim == 3:
        arrays[f"{prefix}pos_embedding"] = pos.reshape(1, pos.shape[0] * pos.shape[1], pos.shape[2])
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    buf.seek(0)
    return buf


def _read_big_vision(path: Path) -> LoadedCheckpoint:
    """big_vision ``.npz`` (fixed-resolution or NaFlex): infer the arch from array shapes, then let
    timm's own loader map it. NaFlex keeps its original table and big_vision's per-grid rule
    (bilinear + antialias, as transformers' Siglip2)."""
    import numpy as np
    from timm.models.vision_transformer import _load_weights

    try:
        with np.load(str(path), allow_pickle=False) as npz:
            shapes = {k: npz[k].shape for k in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: not a readable .npz archive (truncated or corrupt?): {e}") from None
    hits = [k for k in shapes if k.endswith("embedding/kernel") and k.count("/") <= 3]
    hits = [k for k in hits if len(shapes[k]) in (2, 4) and "Transformer/" not in k and "MAPHead" not in k]
    if not hits:
        raise CheckpointError(
            f"{path}: no big_vision image tower (…embedding/kernel) in keys: {_first(shapes)}"
        )
    prefix = min((k[: -len("embedding/kernel")] for k in hits), key=len)
    kernel = shapes[f"{prefix}embedding/kernel"]
    naflex = len(kernel) == 2
    if naflex:  # Dense over (p, p, C)-flattened patches: (p·p·C, D)
        channels = 3
        patch = math.isqrt(kernel[0] // channels)
        if patch * patch * channels != kernel[0]:
            raise CheckpointError(
                f"{path}: NaFlex {prefix}embedding/kernel of shape {kernel} is not (p·p·3, D) for a square patch"
            )
        embed_dim = kernel[1]
    else:
        patch, _, channels, embed_dim = kernel
    stacked = f"{prefix}Transformer/encoderblock/LayerNorm_0/scale"
    if stacked in shapes:
        depth = shapes[stacked][0]
        blk, lead = f"{prefix}Transformer/encoderblock/", 1
    else:
        depth = _count_blocks(shapes, rf"^{re.escape(prefix)}Transformer/encoderblock_(\d+)/")
        blk, lead = f"{prefix}Transformer/encoderblock_0/", 0
    try:
        heads = shapes[f"{blk}MultiHeadDotProductAttention_0/query/kernel"][lead + 1]
        mlp_dim = shapes[f"{blk}MlpBlock_0/Dense_0/kernel"][lead + 1]
        pos_shape = shapes[f"{prefix}pos_embedding"]
    except KeyError as e:
        raise CheckpointError(f"{path}: big_vision layout without {e.args[0]!r}") from None
    if naflex and len(pos_shape) == 3 and pos_shape[0] != 1:
        grid = (int(pos_shape[0]), int(pos_shape[1]))  # NaFlex stores the (n, n, D) grid
    else:
        side = _grid_of(int(pos_shape[-2]), path)
        grid = (side, side)
    has_head = f"{prefix}MAPHead_0/probe" in shapes
    cfg = ArchConfig(
        embed_dim=int(embed_dim),
        depth=int(depth),
        num_heads=int(heads),
        mlp_dim=int(mlp_dim),
        patch_size=int(patch),
        img_size=(grid[0] * int(patch), grid[1] * int(patch)),
        has_head=has_head,
        pos_resample="naflex" if naflex else "timm",
    )
    vit = create_vit(cfg, keep_head=has_head, dynamic_img_size=False, dynamic_img_pad=False)
    source = _naflex_npz_as_fixed(path, prefix, int(patch), channels) if naflex else str(path)
    try:
        with torch.no_grad():
            _load_weights(vit, source, prefix=prefix)
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: timm's big_vision loader failed (prefix {prefix!r}): {e}") from None
    sd = {k: v.detach().clone() for k, v in vit.state_dict().items()}
    dropped = [k for k in shapes if not k.startswith(prefix)]
    return LoadedCheckpoint(sd, cfg, "big_vision", path, dropped)


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def _from_tensors(
    sd: dict[str, Tensor],
    meta: dict[str, str],
    path: Path,
    img_size: int | tuple[int, ...] | None,
    config: dict[str, Any] | None = None,
) -> LoadedCheckpoint:
    """Detect the layout of a flat tensor dict and translate it."""
    ours = None
    if meta.get("format") == FORMAT_NAME and meta.get("arch_config"):
        ours = json.loads(meta["arch_config"])
    elif path.suffix == ".safetensors" and _sidecar(path).is_file():
        side = _json(_sidecar(path))
        if side.get("format") == FORMAT_NAME:
            ours = side.get("arch_config")
    if ours is not None and any(k.endswith(_TIMM_ANCHOR) for k in sd):
        # our export states its arch exactly (its grid may be non-square): no shape inference
        _, kept, dropped = _strip_prefix(sd, _TIMM_ANCHOR)
        return LoadedCheckpoint(kept, ArchConfig.from_dict(ours), FORMAT_NAME, path, dropped)
    if "birder_version" in meta or any(k.endswith(_BIRDER_ANCHOR) for k in sd):
        return _from_birder(sd, meta, path)
    if any(k.endswith(_HF_ANCHOR) and "text_model" not in k for k in sd):
        return _from_transformers(sd, path, config, img_size)
    if any(k.endswith(_TIMM_ANCHOR) for k in sd):
        return _from_timm_keys(sd, path, _timm_hints(config), "timm")
    if any(k.endswith(_TIMM_NAFLEX_ANCHOR) for k in sd):
        return _from_timm_naflex(sd, path, config)
    raise CheckpointError(
        f"{path}: no SigLIP vision tower found (expected timm '{_TIMM_ANCHOR}', open_clip "
        f"'visual.trunk.{_TIMM_ANCHOR}', transformers '...{_HF_ANCHOR}' or birder '{_BIRDER_ANCHOR}'); "
        f"first keys: {_first(sd)}"
    )


def _export_arch(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """The backbone arch config an export's ``config.json`` records (None: not an export)."""
    if not config or config.get("format") != EXPORT_FORMAT:
        return None
    return (config.get("siglip_dense") or {}).get("arch_config") or None


def _read_file(path: Path, img_size: Any, config: dict[str, Any] | None = None) -> LoadedCheckpoint:
    if path.suffix == ".npz":
        return _read_big_vision(path)
    if path.suffix == ".json":
        raise CheckpointError(f"{path}: a JSON config, not weights: pass the weights file or its directory")
    sd, meta = _read_tensors(path)
    cfg_path = path.parent / "config.json"
    sibling_ours = _export_arch(_json(cfg_path)) if cfg_path.is_file() else None
    if sibling_ours is not None and meta.get("format") == EXPORT_FORMAT:
        # an export's model.safetensors: its arch (source rule, table grid, act) is in config.json
        meta = {"format": FORMAT_NAME, "arch_config": json.dumps(sibling_ours)}
    if config is None and cfg_path.is_file():
        # a weight file inside a save_pretrained / timm hub directory: use the config beside it
        sibling = _json(cfg_path)
        if _is_hf_config(sibling) or "architecture" in sibling:
            config = sibling
    return _from_tensors(sd, meta, path, img_size, config)


def _read_dir(directory: Path, img_size: Any) -> LoadedCheckpoint:
    cfg_path = directory / "config.json"
    config = _json(cfg_path) if cfg_path.is_file() else None
    if config is not None and _is_hf_config(config):
        sd, wpath = _read_hf_weights(directory)
        loaded = _from_tensors(sd, {}, wpath, img_size, config)
        loaded.path = directory
        pre = directory / "preprocessor_config.json"
        if pre.is_file():  # the processor's normalisation, when the repo ships one
            pcfg = _json(pre)
            if pcfg.get("image_mean") and pcfg.get("image_std"):
                loaded.arch.mean, loaded.arch.std = tuple(pcfg["image_mean"]), tuple(pcfg["image_std"])
        return loaded
    if config is None and (directory / "open_clip_config.json").is_file():
        oc = _json(directory / "open_clip_config.json")
        vision = (oc.get("model_cfg") or {}).get("vision_cfg") or {}
        config = {"architecture": vision.get("timm_model_name")}
    for name in _DIR_WEIGHT_NAMES:
        if (directory / name).is_file():
            return _read_file(directory / name, img_size, config)
    files = sorted(p for p in directory.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
    if len(files) == 1:
        return _read_file(files[0], img_size, config)
    raise CheckpointError(
        f"{directory}: cannot tell which weights to load; found {_first(p.name for p in directory.iterdir())}"
    )


# ------------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------------
def read_checkpoint(src: str | Path, img_size: int | tuple[int, int] | None = None) -> LoadedCheckpoint:
    """Read any supported checkpoint (file, directory or cached hub id) into timm keys + its ArchConfig.

    ``img_size`` only matters for NaFlex (Siglip2) checkpoints, whose position table is resized to
    ``img_size // patch`` here exactly as transformers does it; other formats are resampled on load.
    """
    path = resolve_source(src)
    loaded = _read_dir(path, img_size) if path.is_dir() else _read_file(path, img_size)
    if not loaded.state_dict:
        raise CheckpointError(f"{path}: no vision weights found")
    return loaded


def recorded_arch(path: str | Path) -> ArchConfig | None:
    """The backbone arch our task checkpoint (``.ckpt``), export (dir or its ``model.safetensors``) or
    ``save_checkpoint`` file records; None for files that record none (other sources' formats)."""
    path = Path(path)
    if path.is_dir():
        ours = _export_arch(_json(path / "config.json")) if (path / "config.json").is_file() else None
    elif path.suffix == ".safetensors":
        meta = _safetensors_metadata(path)
        ours = json.loads(meta["arch_config"]) if meta.get("format") == FORMAT_NAME else None
        if ours is None and (path.parent / "config.json").is_file():
            ours = _export_arch(_json(path.parent / "config.json"))
        if ours is None and _sidecar(path).is_file():
            ours = _json(_sidecar(path)).get("arch_config")
    else:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 - not a zip-format torch file: records nothing readable
            return None
        ours = (obj.get("siglip_dense") or {}).get("arch_config") if isinstance(obj, dict) else None
    return ArchConfig.from_dict(ours) if ours else None


def _safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:  # SafetensorError, OSError
        raise CheckpointError(f"{path}: not a readable safetensors file: {e}") from None


def check_arch_matches(cfg: ArchConfig, loaded: LoadedCheckpoint) -> None:
    """Raise when an explicitly requested arch does not have the checkpoint's shapes.

    Fields the checkpoint could not tell (``loaded.guessed``, e.g. heads of a config-less state dict)
    are taken from ``cfg`` instead of compared.
    """
    if "num_heads" in loaded.guessed:
        loaded.arch.num_heads = cfg.num_heads
        loaded.guessed.discard("num_heads")
    if cfg.same_shapes(loaded.arch):
        return
    keys = ("embed_dim", "depth", "num_heads", "mlp_dim", "patch_size")

    def shapes(c: ArchConfig) -> str:
        return ", ".join(f"{k}={getattr(c, k)}" for k in keys)

    raise CheckpointError(
        f"requested arch {cfg.arch or 'custom'} ({shapes(cfg)}) does not match checkpoint {loaded.path} "
        f"({loaded.source_format}: {shapes(loaded.arch)}); pass arch=None to build what the checkpoint holds"
    )


def _pos_grid(pos: Tensor, arch: ArchConfig) -> list[int] | None:
    """The (h, w) grid of a [1, N, C] position table: the arch's own grid, else a square one."""
    if pos.ndim != 3:
        return None
    n = int(pos.shape[1])
    gh, gw = arch.table_grid()
    if gh * gw == n:
        return [gh, gw]
    side = math.isqrt(n)
    return [side, side] if side * side == n else None


def load_into_vit(vit: torch.nn.Module, loaded: LoadedCheckpoint, strict: bool = True) -> LoadReport:
    """Copy a translated checkpoint into a timm ViT, resampling the position table to its grid
    by the source's rule (``loaded.arch.pos_resample``)."""
    target = vit.state_dict()
    has_pool = getattr(vit, "attn_pool", None) is not None
    new_sd: dict[str, Tensor] = {}
    report = LoadReport(loaded.path, loaded.source_format, [], [], [], [], [])
    for k, v in loaded.state_dict.items():
        if k.startswith("attn_pool.") and not has_pool:
            report.skipped_head.append(k)
            continue
        if k not in target:
            report.unexpected.append(k)
            continue
        if v.shape != target[k].shape:
            old_grid = _pos_grid(v, loaded.arch) if k == "pos_embed" else None
            if old_grid is not None and v.shape[-1] == target[k].shape[-1]:
                new_grid = list(vit.patch_embed.grid_size)
                v = resample_pos_embed(v, old_grid, new_grid, loaded.arch.pos_resample)
                report.reshaped.append(f"{k} {tuple(loaded.state_dict[k].shape)}->{tuple(v.shape)}")
            else:
                report.mismatched.append(f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}")
                continue
        new_sd[k] = v
        report.loaded.append(k)
    report.missing = [k for k in target if k not in new_sd]
    if report.missing or report.mismatched:
        left = key_groups([*report.missing, *(m.split(" ")[0] for m in report.mismatched)])
        what = (
            f"{loaded.path} ({loaded.source_format}) does not fit the model: {_first(left, 8)} would stay "
            f"random (missing {len(report.missing)} tensors, shape mismatches {len(report.mismatched)} "
            f"[{_first(report.mismatched)}])"
        )
        if strict:
            raise CheckpointError(
                f"{what}. Use a checkpoint with the whole backbone, or allow a partly random backbone "
                "with strict=False (train.py: +backbone.strict=false)"
            )
        warnings.warn(f"{what} (strict=False: kept random)", stacklevel=2)
    vit.load_state_dict(new_sd, strict=False)
    return report


def save_checkpoint(path: str | Path, state_dict: dict[str, Tensor], arch: ArchConfig) -> None:
    """Our format: safetensors (timm keys, arch in metadata) plus a ``<stem>.json`` sidecar config."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: our checkpoints are .safetensors files")
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = dict(state_dict)
    if sd and all(k.startswith("vit.") for k in sd):  # a SigLIP2Backbone's own state dict
        sd = {k.removeprefix("vit."): v for k, v in sd.items()}
    sd = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
    arch_dict = arch.to_dict()
    save_file(sd, str(path), metadata={"format": FORMAT_NAME, "arch_config": json.dumps(arch_dict)})
    sidecar = {
        "format": FORMAT_NAME,
        "arch": arch.arch,
        "patch_size": arch.patch_size,
        "img_size": list(arch.img_size),
        "mean": list(arch.mean),
        "std": list(arch.std),
        "weights": path.name,
        "arch_config": arch_dict,
    }
    _sidecar(path).write_text(json.dumps(sidecar, indent=2) + "\n")


__all__ = [
    "CheckpointError",
    "LoadReport",
    "LoadedCheckpoint",
    "check_arch_matches",
    "hf_cache_dir",
    "key_groups",
    "load_into_vit",
    "read_checkpoint",
    "recorded_arch",
    "resize_naflex_pos_embed",
    "save_checkpoint",
]
