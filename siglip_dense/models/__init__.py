"""Backbones, necks and heads."""

from siglip_dense.models.arch import VARIANTS, ArchConfig
from siglip_dense.models.backbone import SigLIP2Backbone, build_backbone
from siglip_dense.models.text import TextEncoder, build_text_encoder

__all__ = ["VARIANTS", "ArchConfig", "SigLIP2Backbone", "TextEncoder", "build_backbone", "build_text_encoder"]
