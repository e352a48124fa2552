"""Multi-task training (segmentation + depth on one shared backbone): sharing, one backbone pass per
step, loss weights, an end-to-end toy run through train.py, and clear configuration errors."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from torch import nn

from siglip_dense.data.toy import ensure_toy_data
from siglip_dense.evaluate import run_eval
from siglip_dense.tasks.multitask import MultiTask
from siglip_dense.train import build_task, run_train
from tests.conftest import compose_cfg, compose_train_cfg

# toy_multitask without its detection member: the seg + depth multi-task model these tests are about
SMALL = [
    "experiment=toy_multitask",
    "task=multitask_seg_depth",
    "~task.tasks.det",
    "~data.datamodules.det",
    "data.num_workers=0",
    "data.batch_size=2",
    "data.datamodules.depth.toy_num_train=12",
    "data.datamodules.depth.toy_num_val=4",
]


@pytest.fixture(scope="module")
def mt_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Small toy seg (ADE20K layout) and depth (NYUv2 layout) sets side by side, as paths.data_dir."""
    root = tmp_path_factory.mktemp("mtdata")
    ensure_toy_data(root / "toy_seg", num_train=12, num_val=4)
    ensure_toy_data(root / "toy_depth", num_train=12, num_val=4, layout="nyu")
    return root


def build(tmp_path: Path, data_dir: Path, extra: list[str] | None = None) -> tuple[MultiTask, Any]:
    cfg = compose_train_cfg([*SMALL, *(extra or [])], tmp_path / "run", data_dir=data_dir)
    dm = instantiate(cfg.data, _convert_="all")
    task = build_task(cfg, dm)
    dm.mean, dm.std = tuple(task.mean), tuple(task.std)
    return task, dm


def no_dropout(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = 0.0


def first_batches(dm: Any) -> dict[str, dict[str, Any]]:
    dm.setup("fit")
    return {name: next(iter(member.train_dataloader())) for name, member in dm.datamodules.items()}


@pytest.fixture()
def seeded() -> None:
    torch.manual_seed(0)


def test_backbone_is_shared_and_optimized_once(
    tmp_path: Path, mt_data_dir: Path, seeded: None, hydra_cleanup: None
) -> None:
    task, _ = build(tmp_path, mt_data_dir)
    seg, depth = task.model.tasks["seg"], task.model.tasks["depth"]
    assert seg.model.backbone is task.backbone and depth.model.backbone is task.backbone
    assert id(seg.backbone) == id(depth.backbone) == id(task.backbone)
    assert task.backbone.out_indices == (1, 2, 3, 5)

    task.scheduler_cfg = {**task.scheduler_cfg, "total_steps": 10}  # no trainer: fix the schedule length
    optimizer = task.configure_optimizers()["optimizer"]
    in_groups = [p for g in optimizer.param_groups for p in g["params"]]
    assert len({id(p) for p in in_groups}) == len(in_groups), "a parameter is in two groups"
    backbone_ids = {id(p) for p in task.backbone.parameters()}
    assert sum(id(p) in backbone_ids for p in in_groups) == len(backbone_ids)

    def numel(params: Any) -> int:
        return sum(p.numel() for p in params)

    heads = sum(numel(p for p in t.parameters() if id(p) not in backbone_ids) for t in (seg, depth))
    assert numel(in_groups) == numel(task.backbone.parameters()) + heads

    # checkpoints hold the shared backbone once, and load back (aliases filled in)
    state = task.state_dict()
    assert not [k for k in state if k.startswith("model.tasks.") and ".model.backbone." in k]
    assert any(k.startswith("model.backbone.") for k in state)
    again, _ = build(tmp_path, mt_data_dir)
    again.load_state_dict(state, strict=True)
    for k, v in again.model.tasks["depth"].backbone.state_dict().items():
        torch.testing.assert_close(v, state[f"model.backbone.{k}"], rtol=0, atol=0)


def test_one_backbone_pass_gives_the_weighted_sum_of_task_losses(
    tmp_path: Path, mt_data_dir: Path, seeded: None, hydra_cleanup: None
) -> None:
    task, dm = build(tmp_path, mt_data_dir)
    no_dropout(task)
    task.train()
    batch = first_batches(dm)
    assert batch["seg"]["image"].shape[-2:] == batch["depth"]["image"].shape[-2:] == (128, 128)
    calls = []
    handle = task.backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    total = task.training_step(batch, 0)
    handle.remove()
    assert calls == [len(batch["seg"]["image"]) + len(batch["depth"]["image"])], calls

    # each task's own training step (its own backbone pass), weighted as configured
    w = task.loss_weights
    assert w == {"seg": 1.0, "depth": 0.5}
    separate = sum(w[n] * task.model.tasks[n].training_losses(batch[n])["loss"] for n in ("seg", "depth"))
    torch.testing.assert_close(total, separate, rtol=0, atol=1e-5)

    # different image sizes: one pass per task (warned), same losses
    small = dict(batch)
    small["depth"] = {**batch["depth"], "image": batch["depth"]["image"][..., :112, :112]}
    small["depth"]["depth"] = batch["depth"]["depth"][..., :112, :112]
    calls.clear()
    handle = task.backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    with pytest.warns(UserWarning, match="one backbone pass per task"):
        total_small = task.training_step(small, 0)
    handle.remove()
    assert len(calls) == 2
    separate = sum(w[n] * task.model.tasks[n].training_losses(small[n])["loss"] for n in ("seg", "depth"))
    torch.testing.assert_close(total_small, separate, rtol=0, atol=1e-5)


def test_zero_depth_weight_gives_the_segmentation_gradients(
    tmp_path: Path, mt_data_dir: Path, seeded: None, hydra_cleanup: None
) -> None:
    task, dm = build(tmp_path, mt_data_dir, ["task.loss_weights.depth=0.0"])
    assert task.loss_weights == {"seg": 1.0, "depth": 0.0}
    no_dropout(task)
    task.train()
    batch = first_batches(dm)

    def backbone_grads(loss: torch.Tensor) -> dict[str, torch.Tensor]:
        task.zero_grad(set_to_none=True)
        loss.backward()
        return {n: p.grad.clone() for n, p in task.backbone.named_parameters() if p.grad is not None}

    multi = backbone_grads(task.training_step(batch, 0))
    depth_head = [p.grad for p in task.model.tasks["depth"].model.head.parameters()]
    assert all(g is not None for g in depth_head), "every depth-head parameter is in the graph"
    assert not any(g.any() for g in depth_head), "weight 0: zero depth-head gradients"
    seg_only = backbone_grads(task.model.tasks["seg"].training_losses(batch["seg"])["loss"])
    assert multi.keys() == seg_only.keys() and len(multi) > 0
    for name in multi:
        torch.testing.assert_close(multi[name], seg_only[name], rtol=1e-4, atol=1e-6, msg=name)
    # and the depth loss does move the backbone when weighted
    task.loss_weights["depth"] = 0.5
    both = backbone_grads(task.training_step(batch, 0))
    assert any(not torch.allclose(both[n], seg_only[n], rtol=1e-4, atol=1e-6) for n in both)


def test_toy_run_writes_both_tasks_metrics(tmp_path: Path, mt_data_dir: Path, hydra_cleanup: None) -> None:
    run_dir = tmp_path / "run"
    short = ["trainer.max_epochs=1", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=2"]
    short += ["trainer.log_every_n_steps=1"]
    cfg = compose_train_cfg([*SMALL, *short, "num_vis=1"], run_dir, data_dir=mt_data_dir)
    assert cfg.monitor == "val/seg/mIoU"
    metrics = run_train(cfg)
    written = json.loads((run_dir / "metrics.json").read_text())
    assert written == json.loads(json.dumps(metrics))
    assert 0.0 <= written["seg"]["mIoU"] <= 1.0 and written["seg"]["per_class_IoU"]
    assert written["depth"]["abs_rel"] > 0 and written["depth"]["num_images"] == 2
    assert (run_dir / "predictions_seg.png").exists() and (run_dir / "predictions_depth.png").exists()
    logged = (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val/seg/mIoU", "val/depth/abs_rel", "train/seg/loss", "train/depth/loss", "train/loss"} <= set(
        logged
    )

    ckpt = run_dir / "checkpoints" / "last.ckpt"
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    meta = raw["siglip_dense"]
    assert meta["task"] == "multitask" and set(meta["tasks"]) == {"seg", "depth"}
    assert meta["tasks"]["seg"]["task"] == "segmentation" and meta["tasks"]["seg"]["class_names"]
    assert meta["tasks"]["depth"]["max_depth"] == 10.0
    task = MultiTask.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).eval()
    again = MultiTask(**raw["hyper_parameters"]).eval()
    again.load_state_dict(raw["state_dict"])
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        for name in ("seg", "depth"):
            a, b = task.model.tasks[name](x), again.model.tasks[name](x)
            torch.testing.assert_close(a, b, rtol=0, atol=0)

    # tools/eval.py on the checkpoint: its own data config, the final validation's numbers again
    out = tmp_path / "eval"
    eval_overrides = [f"ckpt_path={ckpt}", f"output_dir={out}", "data.num_workers=0"]
    eval_overrides += ["+trainer.limit_val_batches=2", "save_predictions=true"]
    evaluated = run_eval(compose_cfg("eval", eval_overrides, tmp_path / "hydra"))
    assert json.loads((out / "metrics.json").read_text()) == written
    assert evaluated["depth"]["num_images"] == 2
    assert sorted(p.name for p in (out / "predictions").iterdir()) == ["depth", "seg"]


def test_configuration_errors_are_clear(tmp_path: Path, mt_data_dir: Path, hydra_cleanup: None) -> None:
    # (through Hydra's instantiate: the ValueError arrives wrapped, its message intact)
    with pytest.raises(
        (ValueError, InstantiationException), match=r"loss_weights names \['normals'\].*no such task"
    ):
        build(tmp_path, mt_data_dir, ["+task.loss_weights.normals=1.0"])
    with pytest.raises((ValueError, InstantiationException), match=r"task\(s\) \['depth'\] have no data"):
        build(tmp_path, mt_data_dir, ["~data.datamodules.depth"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        task, _ = build(tmp_path, mt_data_dir)
    with pytest.raises(ValueError, match=r"no data for task\(s\) \['depth'\]"):
        task.training_step({"seg": {"image": torch.zeros(1, 3, 32, 32)}}, 0)
