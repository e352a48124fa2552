"""Issue 16 follow-ups: fine-tuned models reused as backbones, birder SigLIP 2 nets, dense options."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from siglip_dense.models import build_backbone
from siglip_dense.models.arch import arch_config_of
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
def _convert_weights_tool() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "convert_weights", Path(__file__).parents[1] / "tools/convert_weights.py"
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_finetuned_task_reused_as_backbone_keeps_its_arch(tmp_path: Path) -> None:
    from siglip_dense.checkpoints import export

    torch.manual_seed(0)
    source = _seg_task(tmp_path, {"arch_config": _naflex_rule_arch()})
    ckpt = _lightning_checkpoint(source, tmp_path / "last.ckpt")
    out_dir = export(ckpt, tmp_path / "export")
    converted = tmp_path / "converted.safetensors"
    assert _convert_weights_tool().main([str(ckpt), str(converted)]) == 0
    x = torch.randn(1, 3, 80, 208)  # a grid (5×13) that is neither the table's nor the input size's
    with torch.no_grad():
        expected = source.backbone.forward_features(x)
        for artefact in (ckpt, out_dir, out_dir / "model.safetensors", converted):
            bb = build_backbone(checkpoint=artefact, verbose=False).eval()
            assert bb.arch_config.pos_resample == "naflex", artefact
            assert bb.arch_config.act_layer == "gelu", artefact
            assert tuple(bb.pos_grid) == (4, 4), artefact
            assert torch.equal(bb.forward_features(x), expected), artefact


# -- F2 / F8: birder's registered network configs (a birder file stores only overrides) ----------------
BIRDER_TINY = {"num_layers": 2, "num_heads": 2, "hidden_dim": 64, "mlp_dim": 128}


def _birder_file(out: Path, network: str, size: tuple[int, int]) -> Path:
    """A tiny ``network`` written by birder's own ``checkpoint_model`` (``<network>_0.pt``)."""
    from birder.common import fs_ops
    from birder.conf import settings
    from birder.model_registry import registry

    torch.manual_seed(0)
    net = registry.net_factory(network, 0, 3, config=dict(BIRDER_TINY), size=size).eval()
    signature = {"inputs": [{"data_shape": [0, 3, *size]}], "outputs": [{"data_shape": [0, 0]}]}
    rgb = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    mp = pytest.MonkeyPatch()
    mp.setattr(settings, "MODELS_DIR", out)  # where birder's checkpoint_model writes
    try:
        fs_ops.checkpoint_model(
            network, 0, net, signature, {}, rgb, None, None, None, None, external_config=BIRDER_TINY
        )
    finally:
        mp.undo()
    return out / f"{network}_0.pt"


def _birder_reference(path: Path, network: str) -> torch.nn.Module:
    from birder.common import fs_ops

    net, _ = fs_ops.load_model(torch.device("cpu"), network, path=path, inference=True)
    net.set_dynamic_size()
    return net.eval()


@pytest.mark.parametrize(
    ("network", "size", "others"),
    [
        ("naflex_i_vit_b16_ap_c1", (64, 64), [(96, 128), (32, 48)]),  # gelu_tanh, bilinear+antialias
        ("vit_so400m_p14_ap_c1", (56, 56), [(84, 112)]),  # MAP head layer norm eps 1e-6
        ("vit_so400m_p14_ap", (56, 84), [(84, 84)]),  # birder's MAP head defaults (eps 1e-5)
    ],
)
def test_birder_registered_network_config(
    tmp_path: Path, network: str, size: tuple[int, int], others: list[tuple[int, int]]
) -> None:
    path = _birder_file(tmp_path, network, size)
    ref = _birder_reference(path, network)
    bb = build_backbone(checkpoint=path, keep_head=True, verbose=False).eval()
    torch.manual_seed(1)
    for hw in [size, *others]:
        x = torch.randn(2, 3, *hw)
        with torch.no_grad():
            feats = ref.forward_features(x)
            assert (bb.forward_features(x) - feats).abs().max() <= 1e-5, hw
            assert (bb.forward_pooled(x) - ref.embedding_from_features(feats)).abs().max() <= 1e-5, hw


def test_birder_siglip_table_matches_birders_registry() -> None:
    """The built-in copy (used without birder installed) says what birder's registry says."""
    from birder.model_registry import registry

    from siglip_dense.models.weights import _BIRDER_NUMERICS, _BIRDER_SIGLIP_NETS

    for name, ours in _BIRDER_SIGLIP_NETS.items():
        theirs = registry.registered_configs[name].config
        assert {k: theirs.get(k) for k in _BIRDER_NUMERICS} == {k: ours.get(k) for k in _BIRDER_NUMERICS}, (
            name
        )


def test_birder_file_without_network_name_warns(tmp_path: Path) -> None:
    path = _birder_file(tmp_path, "naflex_i_vit_b16_ap_c1", (64, 64))
    renamed = path.rename(tmp_path / "weights.pt")
    with pytest.warns(UserWarning, match=r"weights\.pt.*naflex_i_vit_b16_ap_c1.*<network>_<epoch>\.pt"):
        build_backbone(checkpoint=renamed, verbose=False)


# -- F3: NaFlex evaluation needs global attention: refused when the task is built -----------------------
def test_naflex_eval_with_window_attention_is_refused_at_construction(tmp_path: Path) -> None:
    with pytest.raises(Exception, match=r"eval\.mode=naflex.*backbone\.window_size=4"):  # hydra wraps it
        _seg_task(tmp_path, {"window_size": 4}, eval={"mode": "naflex", "max_num_patches": 64})


# -- F4: backbone.patch_remainder=drop inside dense models ---------------------------------------------
@pytest.mark.parametrize("remainder", ["pad", "drop"])
def test_dense_model_honours_patch_remainder(remainder: str) -> None:
    """384 px at patch 14: drop -> the 27×27 grid the bare backbone sees (and the sources), pad -> 28×28;
    logits always at the full input size."""
    from siglip_dense.models.heads.segmentation import LinearHead
    from siglip_dense.models.segmentor import Segmentor

    arch = replace(arch_config_of("tiny"), patch_size=14, img_size=(378, 378), depth=2)
    bb = build_backbone(
        arch_config=arch.to_dict(), out_indices=(1,), patch_remainder=remainder, verbose=False
    )
    seg = Segmentor(bb.eval(), None, LinearHead(bb.embed_dim, 5)).eval()
    grids: list[tuple[int, int]] = []
    bb.vit.patch_embed.register_forward_hook(lambda m, a, o: grids.append(tuple(o.shape[1:3])))
    x = torch.randn(1, 3, 384, 390)
    with torch.no_grad():
        logits = seg(x)["logits"]
        maps = bb(x)
    expected = (27, 27) if remainder == "drop" else (28, 28)
    assert grids == [expected, expected]  # the segmentor's backbone pass, then the bare backbone's
    assert logits.shape == (1, 5, 384, 390)
    # the kept part's maps are the bare backbone's own maps (nothing of the cropped pixels leaks in)
    with torch.no_grad():
        kh, kw = seg.kept_size(*x.shape[-2:])
        assert torch.equal(seg.backbone(seg.pad_input(x[..., :kh, :kw]))["blocks.1"], maps["blocks.1"])


# -- F5: init_from into another img_size keeps the fine-tuned position table -------------------------------
def test_init_from_other_img_size_resamples_the_table(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = _seg_task(tmp_path, {"img_size": 64})
    with torch.no_grad():
        source.model.backbone.vit.pos_embed.normal_()  # a "fine-tuned" table, unlike any fresh init
    ckpt = _lightning_checkpoint(source, tmp_path / "src.ckpt")
    torch.manual_seed(1)
    task = _seg_task(tmp_path, {"img_size": 96}, init_from=str(ckpt))
    assert [r.split()[0] for r in task.init_report.resampled] == ["model.backbone.vit.pos_embed"]
    assert not task.init_report.mismatched and "resampled" in str(task.init_report)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():  # the source model run at the new size resamples its table the same way
        torch.testing.assert_close(task(x), source(x), rtol=0, atol=1e-5)


# -- F6: a timm hub config.json without act_layer: timm builds its registered definition's activation ------
def test_timm_hub_dir_without_act_layer_loads_the_trained_tanh_gelu(tmp_path: Path) -> None:
    """Issue 16: tanh-GELU for SigLIP checkpoints, as transformers (and big_vision's training) compute,
    although timm's older definition (here base16) builds exact GELU; ``model_args.act_layer`` wins."""
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(0)
    kw = dict(embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0, img_size=64)  # no act_layer: timm's exact
    exact = timm.create_model(
        "vit_base_patch16_siglip_224", num_classes=0, dynamic_img_size=True, **kw
    ).eval()
    assert (
        isinstance(exact.blocks[0].mlp.act, torch.nn.GELU) and exact.blocks[0].mlp.act.approximate == "none"
    )
    with torch.no_grad():  # MLP inputs of a trained model's size, where exact and tanh GELU differ
        for blk in exact.blocks:
            blk.mlp.fc1.weight.mul_(30.0)
    save_for_hf(exact, str(tmp_path), model_args=kw, safe_serialization=True)
    tanh = timm.create_model(
        "vit_base_patch16_siglip_224", num_classes=0, dynamic_img_size=True, act_layer="gelu_tanh", **kw
    ).eval()
    tanh.load_state_dict(exact.state_dict())
    bb = build_backbone(checkpoint=tmp_path, verbose=False).eval()
    assert bb.arch_config.act_layer == "gelu_tanh"
    for hw in [(64, 64), (96, 80)]:
        x = torch.randn(1, 3, *hw)
        with torch.no_grad():
            ours = bb.forward_features(x)
            torch.testing.assert_close(ours, tanh.forward_features(x), rtol=0, atol=1e-5)
            assert (ours - exact.forward_features(x)).abs().max() > 1e-4  # the choice is visible
    # a config that names its activation is followed
    explicit = tmp_path / "explicit"
    save_for_hf(exact, str(explicit), model_args={**kw, "act_layer": "gelu"}, safe_serialization=True)
    bb = build_backbone(checkpoint=explicit, verbose=False).eval()
    assert bb.arch_config.act_layer == "gelu"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(bb.forward_features(x), exact.forward_features(x), rtol=0, atol=1e-5)


# -- F7: timm's NaFlexVit SigLIP 2 (naflexvit_*_siglip) hub directories ----------------------------------
def test_timm_naflexvit_hub_dir_equals_timm(tmp_path: Path) -> None:
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(0)
    kw = dict(embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0)
    ref = timm.create_model("naflexvit_base_patch16_siglip", num_classes=0, **kw).eval()
    with torch.no_grad():
        ref.embeds.pos_embed.normal_()  # a table whose resampling shows
    save_for_hf(ref, str(tmp_path), model_args=kw, safe_serialization=True)
    bb = build_backbone(checkpoint=tmp_path, verbose=False).eval()
    assert bb.pos_resample == "naflex" and bb.arch_config.act_layer == "gelu_tanh" and bb.pos_grid == (16, 16)
    for hw in [(256, 256), (64, 96), (160, 48)]:
        x = torch.randn(1, 3, *hw)
        with torch.no_grad():
            torch.testing.assert_close(bb.forward_features(x), ref.forward_features(x), rtol=0, atol=1e-5)


def test_timm_naflexvit_state_dict_without_config_names_the_alternatives(tmp_path: Path) -> None:
    import timm
    from safetensors.torch import save_file

    ref = timm.create_model(
        "naflexvit_base_patch16_siglip", num_classes=0, embed_dim=64, depth=2, num_heads=2
    )
    save_file(ref.state_dict(), str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match=r"w\.safetensors.*NaFlexVit.*config\.json.*Siglip2.*big_vision"):
        build_backbone(checkpoint=tmp_path / "w.safetensors", verbose=False)


# -- F9: compile=true with NaFlex evaluation: the per-image neck calls are not compiled -------------------
def test_naflex_forward_runs_a_compiled_neck_eager() -> None:
    from torch._dynamo.testing import CompileCounter

    from siglip_dense.models.heads.segmentation import LinearHead
    from siglip_dense.models.necks import MultiLevelNeck
    from siglip_dense.models.segmentor import Segmentor

    torch.manual_seed(0)
    bb = build_backbone("tiny", out_indices=(1, 3), verbose=False).eval()
    neck = MultiLevelNeck(bb.embed_dim, bb.patch_size, ["blocks.1", "blocks.3"], 32, scale_factors=(2.0, 0.5))
    seg = Segmentor(bb, neck, LinearHead(32, 3, in_keys=["p3", "p5"])).eval()
    x = torch.randn(3, 3, 96, 128)
    grids = torch.tensor([[6, 8], [3, 5], [5, 2]])
    with torch.no_grad():
        eager = seg(x, grid_sizes=grids)["logits"]
        counter = CompileCounter()
        torch._dynamo.reset()
        neck.compile(backend=counter)
        compiled = seg(x, grid_sizes=grids)["logits"]
        torch._dynamo.reset()
    assert counter.frame_count == 0  # not one (re)compilation for the three crop shapes
    assert torch.equal(compiled, eager)
