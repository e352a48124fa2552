"""A CAT-Seg-style open-vocabulary segmentation head (cost aggregation over image-text similarities).

CAT-Seg (Cho et al., CVPR 2024, "CAT-Seg: Cost Aggregation for Open-Vocabulary Semantic
Segmentation") scores every patch against every class-name embedding and learns on that *cost
volume* rather than on class-specific weights, so a trained head segments class sets it never saw.
This head keeps its structure, simplified:

1. cost: patch features projected into the text space (1×1 conv, C -> D), cosine against the class
   embeddings of each prompt template separately -> B×K×P×h×w (P templates as channels);
2. cost embedding: a 7×7 conv P -> E per class;
3. spatial aggregation: residual 3×3 conv blocks per class, guided by the image features (1×1 conv
   C -> G concatenated) — CAT-Seg uses Swin blocks here;
4. class aggregation: a transformer layer across the K classes at every pixel, guided by the class
   embeddings (linear D -> E added); no positional encoding, so the head is equivariant to the order
   and the number of classes;
5. upsampling: one 2× transposed-conv stage per guidance map (earlier backbone blocks, as CAT-Seg
   uses intermediate CLIP layers), each concatenated with the upsampled guidance; a 3×3 conv gives
   one logit per class and pixel.

The text tower (``text_checkpoint``, a SigLIP (2) image-text checkpoint) stays frozen and out of the
state dict. The class embeddings always belong to the head's current ``class_names`` (recomputed when
they change, e.g. after ``init_from`` a checkpoint trained on other names); the training names (UTF-8
JSON bytes, ``class_names_utf8``) and their embeddings (``class_embeddings``) are saved as buffers, adopted on load only when the stored
names are this head's training names, so a trained checkpoint predicts its own classes without the
text tower. :meth:`set_classes` switches to another label set (needs the text tower).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from siglip_dense.models.text import TextEncoder, build_text_encoder, resolve_templates
from siglip_dense.models.weights import CheckpointError

# buffers: the training names' embeddings (K×P×D; the first version stored them without the names)
# and those names
_EMB_KEY, _NAMES_KEY = "class_embeddings", "class_names_utf8"


def _names_tensor(names: Sequence[str]) -> Tensor:
    """Class names as a uint8 tensor (UTF-8 JSON): a state-dict entry like any other."""
    return torch.tensor(list(json.dumps(list(names), ensure_ascii=False).encode()), dtype=torch.uint8)


class _SpatialBlock(nn.Module):
    """Residual 3×3 conv block on one class's cost embedding, with image guidance concatenated."""

    def __init__(self, dim: int, guidance_dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim + guidance_dim, dim, 3, padding=1)
        self.norm = nn.GroupNorm(1, dim)

    def forward(self, x: Tensor, guidance: Tensor) -> Tensor:
        return x + F.gelu(self.norm(self.conv(torch.cat([x, guidance], dim=1))))


class CATSegHead(nn.Module):
    """Cost-volume head: features ``{key: B×C×h×w}`` -> logits B×K×(h·2^u)×(w·2^u), u = upsampling stages.

    Args:
        in_channels: backbone width C (filled by the task).
        num_classes: K (filled by the task from the data); must equal ``len(class_names)``.
        in_keys: maps to read; the last is the cost-volume input, the earlier ones guide the
            upsampling stages (finest last). Filled with the backbone's ``out_indices`` when None.
        class_names: the training label set (filled by the segmentation task from the data).
        text_checkpoint: the SigLIP (2) image-text checkpoint whose text tower embeds the names.
        templates: prompt templates (a name of :data:`siglip_dense.models.text.TEMPLATES` or a list).
        embed_dim / guidance_dim: E and G above. num_spatial_blocks, num_heads: aggregation sizes.
    """

    needs_class_names = True

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        text_checkpoint: str | Path,
        class_names: Sequence[str] | None = None,
        in_keys: Sequence[str] | None = None,
        templates: str | Sequence[str] = "imagenet7",
        embed_dim: int = 64,
        guidance_dim: int = 32,
        num_spatial_blocks: int = 2,
        num_heads: int = 4,
    ) -> None:
        super().__init__()
        if not class_names or len(class_names) != num_classes:
            raise ValueError(
                f"CATSegHead needs the {num_classes} class names of the data (task class_names), got "
                f"{None if not class_names else len(class_names)}"
            )
        self.in_keys = list(in_keys) if in_keys else None
        self.templates = resolve_templates(templates)
        self.text_checkpoint = str(text_checkpoint)
        self._text: list[TextEncoder] = []  # a list: kept out of the state dict and of .modules()
        self.class_names = list(class_names)
        self.train_class_names = list(class_names)
        self._embeddings: Tensor | None = None  # K×P×D for class_names, computed on first use
        self.register_buffer(_NAMES_KEY, _names_tensor(class_names))
        try:
            emb = self._embed(class_names)
        except CheckpointError:  # a trained head loaded without its text tower: the stored ones
            emb = None
        text_dim = 1 if emb is None else emb.shape[-1]
        self._have_train_embeddings = emb is not None
        self.register_buffer(_EMB_KEY, emb if emb is not None else torch.zeros(len(class_names), 1, 1))
        num_guidance = len(self.in_keys) - 1 if self.in_keys else 0
        self.proj = nn.Conv2d(in_channels, text_dim, 1)
        self.cost_embed = nn.Conv2d(len(self.templates), embed_dim, 7, padding=3)
        self.guidance = nn.Conv2d(in_channels, guidance_dim, 1)
        self.spatial = nn.ModuleList(
            _SpatialBlock(embed_dim, guidance_dim) for _ in range(num_spatial_blocks)
        )
        self.text_guidance = nn.Linear(text_dim, embed_dim)
        self.class_agg = nn.TransformerEncoderLayer(
            embed_dim, num_heads, 2 * embed_dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(embed_dim, embed_dim, 2, stride=2) for _ in range(num_guidance)
        )
        self.up_guidance = nn.ModuleList(
            nn.ConvTranspose2d(in_channels, guidance_dim, 2, stride=2) for _ in range(num_guidance)
        )
        self.up_fuse = nn.ModuleList(
            nn.Conv2d(embed_dim + guidance_dim, embed_dim, 3, padding=1) for _ in range(num_guidance)
        )
        self.out = nn.Conv2d(embed_dim, 1, 3, padding=1)

    @property
    def text_encoder(self) -> TextEncoder:
        """The frozen text tower, loaded on first use (CPU; moved to the head's device).

        Raises CheckpointError saying that the text tower is needed and how to point at it."""
        if not self._text:
            try:
                self._text.append(build_text_encoder(self.text_checkpoint))
            except CheckpointError as err:
                raise CheckpointError(
                    f"CAT-Seg head: the text tower (SigLIP image-text checkpoint {self.text_checkpoint}) is "
                    f"needed to embed class names other than the stored training classes "
                    f"{self.train_class_names}; point at it with task.head.text_checkpoint=DIR (train.py), "
                    f"+open_vocab.text_checkpoint=DIR (tools/predict.py classes=..., tools/eval.py "
                    f"zero_shot=true) or text_checkpoint= (siglip_dense.openvocab.load_model). {err}"
                ) from err
        return self._text[0]

    @torch.no_grad()
    def _embed(self, names: Sequence[str]) -> Tensor:
        """K names -> K×P×D unit embeddings, one per template (CAT-Seg keeps templates apart; a name's
        comma-separated synonyms are averaged per template, as CAT-Seg's ``class_embeddings``)."""
        return self.text_encoder.encode_prompts(list(names), self.templates).clone()

    @property
    def current_embeddings(self) -> Tensor:
        """K×P×D unit embeddings of ``class_names``: the ``class_embeddings`` buffer for the training
        names, else from the text tower (cached until the names change)."""
        if self.class_names == self.train_class_names:
            if not self._have_train_embeddings:
                self.class_embeddings = self._embed(self.train_class_names)
                self._have_train_embeddings = True
            return self.class_embeddings
        if self._embeddings is None:
            self._embeddings = self._embed(self.class_names)
        return self._embeddings

    def set_classes(self, names: Sequence[str]) -> None:
        """Switch to another label set (zero-shot evaluation); the trained weights are unchanged."""
        names = list(names)
        if names != self.class_names:
            self.class_names, self._embeddings = names, None
            self.current_embeddings  # noqa: B018 - embed now: a missing text tower fails here, clearly

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object, **kwargs: object) -> None:
        """Stored training embeddings are adopted only when stored with this head's training names
        (``init_from`` a head trained on other names keeps those of its own names); text-space layers
        take the stored width (a head built without its text tower); the first version's
        ``class_embeddings`` (names not stored) is replaced by this head's own."""
        names_key, emb_key = prefix + _NAMES_KEY, prefix + _EMB_KEY
        stored = state_dict.get(names_key)
        own_names = getattr(self, _NAMES_KEY)
        if stored is not None and torch.equal(stored.cpu(), own_names.cpu()) and emb_key in state_dict:
            emb = state_dict[emb_key]
            self.class_embeddings = torch.empty_like(emb, device=own_names.device)
            self._have_train_embeddings, self._embeddings = True, None
        else:  # other names (or none stored): keep this head's own entries
            state_dict[names_key], state_dict[emb_key] = own_names, getattr(self, _EMB_KEY)
        proj = state_dict.get(prefix + "proj.weight")
        if proj is not None and proj.shape[0] != self.proj.out_channels:
            text_dim, embed_dim = proj.shape[0], self.text_guidance.out_features
            self.proj = nn.Conv2d(self.proj.in_channels, text_dim, 1)
            self.text_guidance = nn.Linear(text_dim, embed_dim)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _maps(self, features: dict[str, Tensor]) -> list[Tensor]:
        keys = self.in_keys or list(features)[-1:]
        missing = [k for k in keys if k not in features]
        if missing:
            raise KeyError(f"CATSegHead reads {missing}, the backbone gives {list(features)}")
        return [features[k] for k in keys]

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        *guides, x = self._maps(features)
        b, _, h, w = x.shape
        text = self.current_embeddings.to(x.device, x.dtype)  # K×P×D
        k, p, _ = text.shape
        img = F.normalize(self.proj(x), dim=1)
        cost = torch.einsum("bdhw,kpd->bkphw", img, text).reshape(b * k, p, h, w)
        e = self.cost_embed(cost)  # (B·K)×E×h×w
        g = self.guidance(x).repeat_interleave(k, dim=0)
        for block in self.spatial:
            e = block(e, g)
        dim = e.shape[1]
        tokens = e.view(b, k, dim, h * w).permute(0, 3, 1, 2).reshape(b * h * w, k, dim)
        tokens = tokens + self.text_guidance(text.mean(1)).unsqueeze(0)
        tokens = self.class_agg(tokens)
        e = tokens.view(b, h, w, k, dim).permute(0, 3, 4, 1, 2).reshape(b * k, dim, h, w)
        for up, up_g, fuse, guide in zip(self.up, self.up_guidance, self.up_fuse, guides, strict=True):
            e = up(e)
            gg = up_g(guide)
            gg = F.interpolate(gg, size=e.shape[-2:], mode="bilinear", align_corners=False)
            e = F.gelu(fuse(torch.cat([e, gg.repeat_interleave(k, dim=0)], dim=1)))
        return self.out(e).view(b, k, *e.shape[-2:])
