"""Detection as a multi-task member (experiment=toy_multitask: seg + depth + det on one backbone):
the detector uses the shared backbone module, its loss is in the weighted total, its metrics are
logged as val/det/bbox_*, and a short toy run writes all three tasks' metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image
from torch import nn

from siglip_dense.data.toy import ensure_toy_data
from siglip_dense.evaluate import run_eval
from siglip_dense.predict import run_predict
from siglip_dense.tasks.multitask import MultiTask
from siglip_dense.train import build_task, run_train
from tests.conftest import compose_cfg, compose_train_cfg

SMALL = [
    "experiment=toy_multitask",
    "data.num_workers=0",
    "data.batch_size=2",
    "data.datamodules.depth.toy_num_train=8",
    "data.datamodules.depth.toy_num_val=2",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Small toy seg (ADE20K), depth (NYUv2) and detection (COCO) sets side by side, as paths.data_dir."""
    root = tmp_path_factory.mktemp("mtdet")
    ensure_toy_data(root / "toy_seg", num_train=8, num_val=2)
    ensure_toy_data(root / "toy_depth", num_train=8, num_val=2, layout="nyu")
    ensure_toy_data(root / "toy_det", num_train=8, num_val=2, layout="coco")
    return root


def build(tmp_path: Path, data_dir: Path, extra: list[str] | None = None) -> tuple[MultiTask, Any]:
    cfg = compose_train_cfg([*SMALL, *(extra or [])], tmp_path / "run", data_dir=data_dir)
    dm = instantiate(cfg.data, _convert_="all")
    task = build_task(cfg, dm)
    dm.mean, dm.std = tuple(task.mean), tuple(task.std)
    return task, dm


def test_detection_member_uses_the_shared_backbone_and_its_loss_is_in_the_total(
    tmp_path: Path, data_dir: Path, hydra_cleanup: None
) -> None:
    torch.manual_seed(0)
    task, dm = build(tmp_path, data_dir)
    assert task.task_names == ["seg", "depth", "det"]
    det = task.model.tasks["det"]
    assert det.model.backbone.body is task.backbone, "the detector must run the shared backbone module"
    # one LightningModule: the task components are plain modules (no nested Lightning, nothing patched)
    assert not [n for n, m in task.named_modules() if n and isinstance(m, L.LightningModule)]
    assert "log" not in vars(det) and "trainer" not in vars(det)
    for m in task.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = 0.0
    task.train()
    dm.setup("fit")
    batch = {name: next(iter(member.train_dataloader())) for name, member in dm.datamodules.items()}

    # one shared pass for seg + depth (128 px crops), one for detection's own (256 px) images
    calls: list[tuple[int, ...]] = []
    handle = task.backbone.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    torch.manual_seed(1)
    total = task.training_step(batch, 0)
    handle.remove()
    n_shared = len(batch["seg"]["image"]) + len(batch["depth"]["image"])
    assert [c[0] for c in calls] == [n_shared, len(batch["det"]["image"])], calls

    # the total is the weighted sum of each task's own loss (the detector's samplers reseeded alike)
    w = task.loss_weights
    assert w == {"seg": 1.0, "depth": 0.5, "det": 1.0}
    torch.manual_seed(1)
    parts = {n: task.model.tasks[n].training_losses(batch[n])["loss"] for n in ("seg", "depth", "det")}
    torch.testing.assert_close(total, sum(w[n] * parts[n] for n in parts), rtol=1e-6, atol=1e-5)

    # detection's loss reaches the backbone: with the other weights 0, backbone grads = det-only grads
    task.loss_weights.update(seg=0.0, depth=0.0)
    torch.manual_seed(1)
    task.zero_grad(set_to_none=True)
    task.training_step(batch, 0).backward()
    multi = {n: p.grad.clone() for n, p in task.backbone.named_parameters() if p.grad is not None}
    torch.manual_seed(1)
    task.zero_grad(set_to_none=True)
    task.model.tasks["det"].training_losses(batch["det"])["loss"].backward()
    alone = {n: p.grad.clone() for n, p in task.backbone.named_parameters() if p.grad is not None}
    assert multi.keys() == alone.keys() and len(alone) > 0
    for name in alone:
        torch.testing.assert_close(multi[name], alone[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_toy_multitask_with_detection_trains_and_writes_per_task_metrics(
    tmp_path: Path, data_dir: Path, hydra_cleanup: None
) -> None:
    run_dir = tmp_path / "run"
    short = ["trainer.max_epochs=1", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=2"]
    short += ["trainer.log_every_n_steps=1", "num_vis=1"]
    cfg = compose_train_cfg([*SMALL, *short], run_dir, data_dir=data_dir)
    metrics = run_train(cfg)
    written = json.loads((run_dir / "metrics.json").read_text())
    assert written == json.loads(json.dumps(metrics))
    assert set(written) == {"seg", "depth", "det"}
    assert 0.0 <= written["seg"]["mIoU"] <= 1.0 and written["depth"]["abs_rel"] > 0
    assert {f"{t}_{k}" for t in ("bbox", "segm") for k in ("AP", "AP50", "AP75")} <= set(written["det"])
    assert (run_dir / "det" / "coco_results.json").exists()
    assert (run_dir / "predictions_det.png").exists()
    logged = (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val/det/bbox_AP", "val/det/segm_AP", "train/det/loss", "train/det/loss_classifier"} <= set(
        logged
    )
    assert {"val/seg/mIoU", "val/depth/abs_rel", "train/loss"} <= set(logged)

    # the checkpoint describes the detection member and rebuilds it exactly
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    meta = raw["siglip_dense"]["tasks"]["det"]
    assert meta["task"] == "detection" and meta["category_ids"] == [1, 3, 5, 7, 9]
    assert not [k for k in raw["state_dict"] if k.startswith("model.tasks.det.model.backbone.body.")]
    task = MultiTask.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).eval()
    x = torch.randn(1, 3, 96, 128)
    again = MultiTask(**raw["hyper_parameters"]).eval()
    again.load_state_dict(raw["state_dict"])
    a, b = task.model.tasks["det"](list(x)), again.model.tasks["det"](list(x))
    torch.testing.assert_close(a, b, rtol=0, atol=0)

    # tools/eval.py: the same numbers again, detection's results in its own folder
    out = tmp_path / "eval"
    over = [f"ckpt_path={ckpt}", f"output_dir={out}", "+trainer.limit_val_batches=2", "save_predictions=true"]
    over += [f"data.datamodules.{n}.num_workers=0" for n in ("seg", "depth", "det")]
    evaluated = run_eval(compose_cfg("eval", over, tmp_path / "hydra"))
    assert json.loads(json.dumps(evaluated)) == written
    assert (out / "det" / "coco_results.json").exists()

    # tools/predict.py: each task's raw output and picture in its own folder
    image = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (72, 100, 3), dtype=np.uint8)).save(image)
    files = run_predict(ckpt, image, tmp_path / "pred")
    assert {p.relative_to(tmp_path / "pred").as_posix() for p in files} == {
        "seg/in.png.png",
        "seg/in.png_vis.png",
        "depth/in.png.npy",
        "depth/in.png_vis.png",
        "det/in.png.json",
        "det/in.png_vis.png",
    }
