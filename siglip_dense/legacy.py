"""Configs written before a module moved: old ``_target_`` paths → where the object lives now.

Checkpoints store the resolved data config (``task.data_config``) with the ``_target_`` strings of the
release that wrote them, and ``tools/eval.py`` instantiates that config again. When a class moves,
the old string no longer imports; :func:`upgrade_config` rewrites such a config to the current paths,
so a checkpoint written before the move still evaluates. Only names that no longer import are listed
(``siglip_dense.models.backbone`` still re-exports what moved to ``models/arch.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

TARGET_KEY = "_target_"

# old dotted path -> new dotted path; the layout change of issue 17 (data modules named for their task,
# datasets for their layout, shared loader machinery in base.py / samplers.py, file readers in io.py)
LEGACY_TARGETS: dict[str, str] = {
    # data/datamodule.py held the segmentation data module and what every data module shares
    "siglip_dense.data.datamodule.SegDataModule": "siglip_dense.data.segmentation.SegDataModule",
    "siglip_dense.data.datamodule.collate_train": "siglip_dense.data.segmentation.collate_seg_train",
    "siglip_dense.data.datamodule.collate_eval": "siglip_dense.data.segmentation.collate_seg_eval",
    "siglip_dense.data.datamodule.DenseDataModule": "siglip_dense.data.base.DenseDataModule",
    "siglip_dense.data.datamodule.worker_seed": "siglip_dense.data.samplers.worker_seed",
    "siglip_dense.data.datamodule.augmentation_seed": "siglip_dense.data.samplers.augmentation_seed",
    "siglip_dense.data.datamodule.seed_worker": "siglip_dense.data.samplers.seed_worker",
    "siglip_dense.data.datamodule.SeededIndex": "siglip_dense.data.samplers.SeededIndex",
    "siglip_dense.data.datamodule.PerSampleSeeded": "siglip_dense.data.samplers.PerSampleSeeded",
    "siglip_dense.data.datamodule.ResumableDistributedSampler": (
        "siglip_dense.data.samplers.ResumableDistributedSampler"
    ),
    "siglip_dense.data.datamodule.eval_sampler": "siglip_dense.data.samplers.eval_sampler",
    # data/ade20k.py held the generic segmentation-folder dataset
    "siglip_dense.data.ade20k.SegFolderDataset": "siglip_dense.data.seg_folder.SegFolderDataset",
    "siglip_dense.data.ade20k.load_class_names": "siglip_dense.data.seg_folder.load_class_names",
    "siglip_dense.data.ade20k.reduce_zero_label": "siglip_dense.data.seg_folder.reduce_zero_label",
    "siglip_dense.data.ade20k.orphan_annotations": "siglip_dense.data.io.orphan_annotations",
    "siglip_dense.data.ade20k.report_orphans": "siglip_dense.data.io.report_orphans",
    # data/nyu.py held the depth data module and the generic RGB + depth folder dataset
    "siglip_dense.data.nyu.DepthDataModule": "siglip_dense.data.depth.DepthDataModule",
    "siglip_dense.data.nyu.collate_depth_train": "siglip_dense.data.depth.collate_depth_train",
    "siglip_dense.data.nyu.collate_depth_eval": "siglip_dense.data.depth.collate_depth_eval",
    "siglip_dense.data.nyu.DepthDataset": "siglip_dense.data.depth_folder.DepthDataset",
    "siglip_dense.data.nyu.DepthFolderDataset": "siglip_dense.data.depth_folder.DepthFolderDataset",
    "siglip_dense.data.nyu.DepthSample": "siglip_dense.data.depth_folder.DepthSample",
    "siglip_dense.data.nyu.sanitize_depth": "siglip_dense.data.depth_folder.sanitize_depth",
    "siglip_dense.data.nyu.read_depth": "siglip_dense.data.io.read_depth",
    # data/coco.py held the detection data module
    "siglip_dense.data.coco.DetDataModule": "siglip_dense.data.detection.DetDataModule",
    "siglip_dense.data.coco.collate_det": "siglip_dense.data.detection.collate_det",
}


def upgrade_target(target: str) -> str:
    """The current dotted path of ``target`` (itself when it did not move)."""
    return LEGACY_TARGETS.get(target, target)


def upgrade_config(cfg: Any) -> Any:
    """A copy of ``cfg`` with every ``_target_`` (at any depth) rewritten by :data:`LEGACY_TARGETS`.

    Args:
        cfg: a config as a checkpoint stores it: dicts, lists and scalars (an OmegaConf container is
            read with ``OmegaConf.to_container(resolve=False)``, so interpolations stay strings).

    Returns:
        plain dicts / lists / tuples (the input is not modified); values other than ``_target_`` strings are
        kept as they are, including a ``_target_`` that is not a string.
    """
    if isinstance(cfg, DictConfig | ListConfig):
        cfg = OmegaConf.to_container(cfg, resolve=False)
    if isinstance(cfg, Mapping):
        return {
            key: upgrade_target(value)
            if key == TARGET_KEY and isinstance(value, str)
            else upgrade_config(value)
            for key, value in cfg.items()
        }
    if isinstance(cfg, list | tuple):
        return type(cfg)(upgrade_config(value) for value in cfg)
    return cfg


__all__ = ["LEGACY_TARGETS", "upgrade_config", "upgrade_target"]
