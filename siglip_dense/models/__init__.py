"""Backbones, necks and heads."""

from siglip_dense.models.arch import VARIANTS, ArchConfig
from siglip_dense.models.backbone import SigLIP2Backbone, build_backbone

__all__ = ["VARIANTS", "ArchConfig", "SigLIP2Backbone", "build_backbone"]
