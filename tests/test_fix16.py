"""Issue 16 follow-ups: fine-tuned models reused as backbones, birder SigLIP 2 nets, dense options."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from siglip_dense.models import build_backbone
from siglip_dense.models.backbone import arch_config_of
from siglip_dense.tasks.base import DenseTask


def _seg_task(tmp_path: Path, backbone: dict[str, Any] | None = None, **extra: Any) -> DenseTask:
    """The toy segmentation task (Hydra-composed as train.py does), backbone entries overridden."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from tests.conftest import compose_train_cfg

    cfg = compose_train_cfg(["experiment=toy_seg"], tmp_path / "run")
    GlobalHydra.instance().clear()
    task_cfg = OmegaConf.to_container(cfg.task, resolve=True)
    task_cfg["backbone"].update(backbone or {})
    task_cfg.update(num_classes=3, class_names=["a", "b", "c"], **extra)
    return instantiate(task_cfg, _recursive_=False, _convert_="all").eval()


def _lightning_checkpoint(task: DenseTask, path: Path) -> Path:
    """What Lightning writes: state_dict + hyper_parameters, then the task's on_save_checkpoint."""
    ckpt = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}
    task.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return path


def _naflex_rule_arch() -> dict[str, Any]:
    """A tiny arch whose numerics differ from every default: NaFlex table rule, its own 4×4 table
    grid (not the 96-px input's 6×6), exact GELU."""
    cfg = replace(
        arch_config_of("tiny"), img_size=(96, 96), pos_grid=(4, 4), pos_resample="naflex", act_layer="gelu"
    )
    return cfg.to_dict()


# -- F1: our own task checkpoints / exports as backbone.checkpoint --------------------------------------
def test_finetuned_task_reused_as_backbone_keeps_its_arch(tmp_path: Path) -> None:
    from siglip_dense.checkpoints import export

    torch.manual_seed(0)
    source = _seg_task(tmp_path, {"arch_config": _naflex_rule_arch()})
    ckpt = _lightning_checkpoint(source, tmp_path / "last.ckpt")
    out_dir = export(ckpt, tmp_path / "export")
    x = torch.randn(1, 3, 80, 208)  # a grid (5×13) that is neither the table's nor the input size's
    with torch.no_grad():
        expected = source.backbone.forward_features(x)
        for artefact in (ckpt, out_dir, out_dir / "model.safetensors"):
            bb = build_backbone(checkpoint=artefact, verbose=False).eval()
            assert bb.arch_config.pos_resample == "naflex", artefact
            assert bb.arch_config.act_layer == "gelu", artefact
            assert tuple(bb.pos_grid) == (4, 4), artefact
            assert torch.equal(bb.forward_features(x), expected), artefact
