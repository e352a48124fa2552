"""Optimiser groups (layer-wise lr decay, no decay on norms/biases/pos_embed) and lr schedules."""

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from siglip_dense.models import build_backbone
from siglip_dense.tasks.base import DenseTask, ScaledLambdaLR, lr_lambda, param_groups_layer_decay


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = build_backbone("tiny", verbose=False)
        self.head = nn.Conv2d(192, 5, 1)


def test_layer_decay_scales_follow_depth() -> None:
    model = Tiny()
    groups = param_groups_layer_decay(model, model.backbone, weight_decay=0.05, layer_decay=0.5)
    scale_of = {n: g["lr_scale"] for g in groups for n in g["names"]}
    depth = model.backbone.num_layers  # 6
    assert scale_of["backbone.vit.pos_embed"] == pytest.approx(0.5 ** (depth + 1))
    assert scale_of["backbone.vit.patch_embed.proj.weight"] == pytest.approx(0.5 ** (depth + 1))
    assert scale_of["backbone.vit.blocks.0.attn.qkv.weight"] == pytest.approx(0.5**depth)
    assert scale_of["backbone.vit.blocks.5.mlp.fc1.weight"] == pytest.approx(0.5**1)
    assert scale_of["backbone.vit.norm.weight"] == pytest.approx(1.0)
    assert scale_of["head.weight"] == 1.0
    # every trainable parameter lands in exactly one group
    names = [n for g in groups for n in g["names"]]
    assert sorted(names) == sorted(n for n, p in model.named_parameters() if p.requires_grad)


def test_no_weight_decay_on_norms_biases_pos_embed() -> None:
    model = Tiny()
    groups = param_groups_layer_decay(model, model.backbone, weight_decay=0.05, layer_decay=0.9)
    wd_of = {n: g["weight_decay"] for g in groups for n in g["names"]}
    assert wd_of["backbone.vit.pos_embed"] == 0.0
    assert wd_of["backbone.vit.blocks.2.norm1.weight"] == 0.0
    assert wd_of["backbone.vit.blocks.2.attn.qkv.bias"] == 0.0
    assert wd_of["head.bias"] == 0.0
    assert wd_of["backbone.vit.blocks.2.attn.qkv.weight"] == 0.05
    assert wd_of["head.weight"] == 0.05


def test_frozen_parameters_are_left_out() -> None:
    model = Tiny()
    model.backbone.freeze(None)
    groups = param_groups_layer_decay(model, model.backbone, weight_decay=0.05, layer_decay=0.9)
    names = [n for g in groups for n in g["names"]]
    assert names and all(n.startswith("head.") for n in names)


@pytest.mark.parametrize("schedule", ["cosine", "poly", "step", "constant"])
def test_schedules_closed_form(schedule: str) -> None:
    total, warmup = 1000, 100
    fn = lr_lambda(total, warmup, schedule=schedule, warmup_start_factor=0.0, min_lr_ratio=0.0, power=0.9)
    assert fn(0) == 0.0
    assert fn(50) == pytest.approx(0.5)
    assert fn(warmup) == pytest.approx(1.0)
    t = (550 - warmup) / (total - warmup)
    expected = {
        "cosine": 0.5 * (1 + math.cos(math.pi * t)),
        "poly": (1 - t) ** 0.9,
        "step": 1.0,
        "constant": 1.0,
    }[schedule]
    assert fn(550) == pytest.approx(expected)
    if schedule in ("cosine", "poly"):
        assert fn(total) == pytest.approx(0.0, abs=1e-12)
    if schedule == "step":
        assert fn(int(0.9 * total)) == pytest.approx(0.1)
        assert fn(int(0.97 * total)) == pytest.approx(0.01)


def test_unknown_schedule_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown lr schedule 'linear'"):
        lr_lambda(10, 0, schedule="linear")


def test_scaled_scheduler_applies_group_scales() -> None:
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [a], "lr_scale": 1.0}, {"params": [b], "lr_scale": 0.25}], lr=0.1)
    sched = ScaledLambdaLR(opt, lr_lambda(10, 0, schedule="constant"))
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1, 0.025])
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1, 0.025])


def test_scheduler_config_is_a_partial_of_warmup_schedule() -> None:
    """What configs/task/*.yaml say: warmup then poly, per step, called with the total at fit time."""
    from hydra.utils import instantiate

    cfg = {
        "_target_": "siglip_dense.tasks.base.warmup_schedule",
        "_partial_": True,
        "schedule": "poly",
        "power": 1.0,
        "warmup_steps": 10,
        "warmup_start_factor": 0.0,
    }
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = instantiate(cfg)(opt, total_steps=110)
    lrs = []
    for _ in range(110):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and abs(lrs[5] - 0.5) < 1e-9 and abs(lrs[10] - 1.0) < 1e-9
    assert abs(lrs[60] - 0.5) < 1e-9  # halfway through the poly decay (power 1)


# -- init_from: every artefact the project writes, any task's layout ----------------------------------
def _task(tmp_path: Path, experiment: str, overrides: tuple[str, ...] = (), **extra: Any) -> DenseTask:
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from tests.conftest import compose_train_cfg

    cfg = compose_train_cfg([f"experiment={experiment}", *overrides], tmp_path / "run")
    GlobalHydra.instance().clear()
    task_cfg = OmegaConf.to_container(cfg.task, resolve=True)
    task_cfg.update(num_classes=3, class_names=["a", "b", "c"], **extra)
    return instantiate(task_cfg, _recursive_=False, _convert_="all").eval()


def _lightning_checkpoint(task: DenseTask, path: Path) -> Path:
    """What Lightning writes: state_dict + hyper_parameters, then the task's on_save_checkpoint."""
    ckpt = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}
    task.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return path


def test_init_from_export_dir_and_safetensors_reproduce_outputs(tmp_path: Path) -> None:
    from siglip_dense.checkpoints import export

    torch.manual_seed(0)
    source = _task(tmp_path, "toy_seg")
    ckpt = _lightning_checkpoint(source, tmp_path / "src.ckpt")
    out_dir = export(ckpt, tmp_path / "export")
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = source(x)
        for artefact in (ckpt, out_dir, out_dir / "model.safetensors"):
            torch.manual_seed(1)  # a different random init: only the loaded weights can make it equal
            task = _task(tmp_path, "toy_seg", init_from=str(artefact))
            assert len(task.init_report.loaded) == len(source.state_dict()), artefact
            assert torch.equal(task(x), expected), artefact


def test_init_from_a_file_that_matches_nothing_names_it(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"encoder.layer.0.weight": torch.zeros(3, 3)}, str(path))
    with pytest.raises(Exception, match=r"other\.safetensors.*init_from_filter=backbone.*model\.backbone\."):
        _task(tmp_path, "toy_seg", init_from=str(path), init_from_filter="backbone")


def test_segmentation_backbone_starts_a_detector(tmp_path: Path) -> None:
    """seg (``model.backbone.``) -> detection (``model.backbone.body.``): the backbone, and only it."""
    torch.manual_seed(0)
    seg = _task(tmp_path, "toy_seg")
    ckpt = _lightning_checkpoint(seg, tmp_path / "seg.ckpt")
    det = _task(
        tmp_path,
        "toy_det",
        category_ids=[1, 2, 3],
        init_from=str(ckpt),
        init_from_filter="backbone",
    )
    own = det.backbone.state_dict()
    theirs = seg.backbone.state_dict()
    assert set(det.init_report.loaded) == {f"model.backbone.body.{k}" for k in own}
    assert all(torch.equal(own[k], theirs[k]) for k in own)


@pytest.mark.parametrize("experiment", ["toy_seg", "toy_det"])
def test_init_from_without_a_backbone_block_is_an_error_unless_allowed(
    tmp_path: Path, experiment: str
) -> None:
    """A backbone block the file lacks would stay random: an error naming the file, the block and
    ``+backbone.strict=false``; with that, a warning, and the rest of the backbone is loaded."""
    torch.manual_seed(0)
    seg = _task(tmp_path, "toy_seg")
    ckpt = _lightning_checkpoint(seg, tmp_path / "seg.ckpt")
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    raw["state_dict"] = {k: v for k, v in raw["state_dict"].items() if ".vit.blocks.3." not in k}
    torch.save(raw, tmp_path / "no_block3.ckpt")
    extra: dict[str, Any] = {"category_ids": [1, 2, 3]} if experiment == "toy_det" else {}
    for filter_name in ("backbone", "all"):
        with pytest.raises(
            Exception,  # IncompleteInitError, wrapped by hydra's instantiate
            match=r"no_block3\.ckpt.* 12 tensors .*\(vit\.blocks\.3\).*\+backbone\.strict=false",
        ):
            _task(
                tmp_path,
                experiment,
                init_from=str(tmp_path / "no_block3.ckpt"),
                init_from_filter=filter_name,
                **extra,
            )
    with pytest.warns(UserWarning, match=r"no_block3\.ckpt.*vit\.blocks\.3.*kept random"):
        task = _task(
            tmp_path,
            experiment,
            ("+backbone.strict=false",),
            init_from=str(tmp_path / "no_block3.ckpt"),
            init_from_filter="backbone",
            **extra,
        )
    own, theirs = task.backbone.state_dict(), seg.backbone.state_dict()
    assert all(torch.equal(own[k], theirs[k]) for k in own if not k.startswith("vit.blocks.3."))
    assert not torch.equal(own["vit.blocks.3.attn.qkv.weight"], theirs["vit.blocks.3.attn.qkv.weight"])


# -- weight decay groups: the same under FSDP as in one process -----------------------------------------
def _groups_by_name(task: DenseTask, optimizer: torch.optim.Optimizer) -> dict[str, tuple[float, float]]:
    from siglip_dense.tasks.base import original_name

    names = {id(p): original_name(n) for n, p in task.model.named_parameters()}
    return {
        names[id(p)]: (g["weight_decay"], g["lr_scale"]) for g in optimizer.param_groups for p in g["params"]
    }


def _fsdp_worker(rank: int, world_size: int, port: int, run_dir: str, out: str) -> None:
    """One rank: wrap as Lightning's FSDPStrategy does (use_orig_params, a unit per timm Block), then
    call configure_optimizers on the wrapped model, as the strategy does after wrapping."""
    import json

    import torch.distributed as dist
    from timm.models.vision_transformer import Block
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        task = _task(Path(run_dir), "toy_seg")
        task.scheduler_cfg["total_steps"] = 10
        FullyShardedDataParallel(
            task,
            use_orig_params=True,
            auto_wrap_policy=ModuleWrapPolicy({Block}),
            sharding_strategy=ShardingStrategy.FULL_SHARD,
            device_id=torch.device("cpu"),
        )
        flat = sum(p.ndim == 1 for p in task.model.parameters())
        groups = _groups_by_name(task, task.configure_optimizers()["optimizer"])
        if rank == 0:
            Path(out).write_text(json.dumps({"groups": groups, "flat": flat}))
    finally:
        dist.destroy_process_group()


def test_fsdp_weight_decay_groups_equal_single_process(tmp_path: Path) -> None:
    import json
    import socket

    import torch.multiprocessing as mp

    torch.manual_seed(0)
    task = _task(tmp_path, "toy_seg")
    task.scheduler_cfg["total_steps"] = 10
    single = _groups_by_name(task, task.configure_optimizers()["optimizer"])
    assert {wd for wd, _ in single.values()} == {0.0, 0.01}  # both kinds present

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "fsdp.json"
    mp.spawn(_fsdp_worker, args=(2, port, str(tmp_path), str(out)), nprocs=2, join=True)
    result = json.loads(out.read_text())
    assert result["flat"] == len(single)  # every parameter really is a flattened 1-D view under FSDP
    assert {k: tuple(v) for k, v in result["groups"].items()} == single


def _multitask(tmp_path: Path, **extra: Any) -> DenseTask:
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from tests.conftest import compose_train_cfg

    # the seg + depth model (toy_multitask without its detection member)
    seg_depth = ["task=multitask_seg_depth", "~task.tasks.det", "~data.datamodules.det"]
    cfg = compose_train_cfg(["experiment=toy_multitask", *seg_depth], tmp_path / "run")
    GlobalHydra.instance().clear()
    task_cfg = OmegaConf.to_container(cfg.task, resolve=True)
    task_cfg["tasks_kwargs"] = {"seg": {"num_classes": 3, "class_names": ["a", "b", "c"]}, "depth": {}}
    task_cfg.update(extra)
    return instantiate(task_cfg, _recursive_=False, _convert_="all")


def test_multitask_backbone_starts_a_detector_and_back(tmp_path: Path) -> None:
    """multi-task (``model.backbone.``) <-> detection (``model.backbone.body.``)."""
    torch.manual_seed(0)
    mt = _multitask(tmp_path)
    det = _task(
        tmp_path,
        "toy_det",
        category_ids=[1, 2, 3],
        init_from=str(_lightning_checkpoint(mt, tmp_path / "mt.ckpt")),
        init_from_filter="backbone",
    )
    theirs, own = mt.backbone.state_dict(), det.backbone.state_dict()
    assert own.keys() == theirs.keys() and all(torch.equal(own[k], theirs[k]) for k in own)
    torch.manual_seed(1)
    back = _multitask(
        tmp_path,
        init_from=str(_lightning_checkpoint(det, tmp_path / "det.ckpt")),
        init_from_filter="backbone",
    )
    own = back.backbone.state_dict()
    assert all(torch.equal(own[k], theirs[k]) for k in own)


def _same_shape_counterparts(
    own: dict[str, torch.Tensor], src: dict[str, torch.Tensor], own_prefix: str, src_prefix: str
) -> dict[str, str]:
    """``{own key: source key}`` for the non-backbone tensors both hold (same relative name and shape)."""
    return {
        k: src_prefix + k[len(own_prefix) :]
        for k in own
        if k.startswith(own_prefix)
        and not k.startswith(f"{own_prefix}backbone.")
        and src_prefix + k[len(own_prefix) :] in src
        and src[src_prefix + k[len(own_prefix) :]].shape == own[k].shape
    }


def test_init_from_all_between_multitask_and_single_task_loads_necks_and_heads(tmp_path: Path) -> None:
    """``all`` finds each component under its own prefix: a multi-task file holds the seg task's neck and
    heads under ``model.tasks.seg.model.*`` (and the reverse); they used to be kept fresh silently."""
    torch.manual_seed(0)
    mt = _multitask(tmp_path)
    mt_ckpt = _lightning_checkpoint(mt, tmp_path / "mt.ckpt")
    torch.manual_seed(1)
    seg = _task(tmp_path, "toy_seg", init_from=str(mt_ckpt))
    src, own = mt.state_dict(), seg.state_dict()
    pairs = _same_shape_counterparts(own, src, "model.", "model.tasks.seg.model.")
    assert any(k.startswith("model.neck.") for k in pairs) and any(k.startswith("model.head.") for k in pairs)
    assert set(pairs) <= set(seg.init_report.loaded)
    assert all(torch.equal(own[k], src[s]) for k, s in pairs.items())

    torch.manual_seed(2)
    seg_src = _task(tmp_path, "toy_seg")
    torch.manual_seed(3)
    back = _multitask(tmp_path, init_from=str(_lightning_checkpoint(seg_src, tmp_path / "seg.ckpt")))
    src, own = seg_src.state_dict(), back.state_dict()
    pairs = _same_shape_counterparts(own, src, "model.tasks.seg.model.", "model.")
    assert any(".neck." in k for k in pairs) and set(pairs) <= set(back.init_report.loaded)
    assert all(torch.equal(own[k], src[s]) for k, s in pairs.items())
    assert "model.tasks.depth.model.head." in back.init_report.absent  # the seg file has no depth head


def test_init_from_all_from_another_task_loads_what_it_holds(tmp_path: Path) -> None:
    """det -> seg with ``all``: the backbone is there (under ``model.backbone.body.``), the heads are not."""
    torch.manual_seed(0)
    det = _task(tmp_path, "toy_det", category_ids=[1, 2, 3])
    torch.manual_seed(1)
    seg = _task(tmp_path, "toy_seg", init_from=str(_lightning_checkpoint(det, tmp_path / "det.ckpt")))
    own, theirs = seg.backbone.state_dict(), det.backbone.state_dict()
    assert {f"model.backbone.{k}" for k in own} <= set(seg.init_report.loaded)
    assert all(torch.equal(own[k], theirs[k]) for k in own)
    assert {"model.neck.", "model.head."} <= set(seg.init_report.absent)
