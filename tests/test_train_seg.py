"""Segmentation end to end on toy data: fast_dev_run, checkpoint reload, init_from, bad labels."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from siglip_dense.tasks.segmentation import SegmentationTask
from siglip_dense.train import build_task, run_train
from tests.conftest import compose_train_cfg

SHORT = [
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=3",
    "+trainer.limit_val_batches=3",
    "data.num_workers=0",
    "data.batch_size=4",
    "num_vis=2",
]


@pytest.mark.parametrize("experiment", ["toy_seg", "toy_seg_linear"])
def test_fast_dev_run(experiment: str, tmp_path: Path, toy_data_root: Path, hydra_cleanup: None) -> None:
    overrides = [f"experiment={experiment}", "debug=fdr", "data.num_workers=0"]
    cfg = compose_train_cfg(overrides, tmp_path / "run", data_dir=toy_data_root.parent)
    run_train(cfg)
    assert (tmp_path / "run" / "config.yaml").exists()
    assert (tmp_path / "run" / "run_info.json").exists()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory, toy_data_root: Path) -> Path:
    run_dir = tmp_path_factory.mktemp("seg") / "run"
    cfg = compose_train_cfg(["experiment=toy_seg", *SHORT], run_dir, data_dir=toy_data_root.parent)
    metrics = run_train(cfg)
    assert set(metrics) >= {"mIoU", "aAcc", "per_class_IoU"}
    return run_dir


def test_run_writes_contract_files(trained_run: Path) -> None:
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert 0.0 <= metrics["mIoU"] <= 1.0 and 0.0 <= metrics["aAcc"] <= 1.0
    assert isinstance(metrics["per_class_IoU"], dict) and metrics["per_class_IoU"]
    assert (trained_run / "predictions.png").stat().st_size > 0
    assert (trained_run / "checkpoints" / "last.ckpt").exists()
    info = json.loads((trained_run / "run_info.json").read_text())
    assert info["seed"] == 42 and "torch" in info["versions"]


def test_checkpoint_is_self_describing_and_reloads_identically(
    trained_run: Path, toy_data_root: Path
) -> None:
    ckpt_path = trained_run / "checkpoints" / "last.ckpt"
    raw = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    meta = raw["siglip_dense"]
    assert meta["task"] == "segmentation" and meta["arch"] == "vit_tiny_patch16_siglip_128"
    assert meta["class_names"] and meta["mean"] == [0.5, 0.5, 0.5]
    assert raw["hyper_parameters"]["backbone"]["checkpoint"] is None
    task = SegmentationTask.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True).eval()
    # a second, independent rebuild from the same file gives the same numbers
    state = {k.removeprefix("model."): v for k, v in raw["state_dict"].items() if k.startswith("model.")}
    again = SegmentationTask(**raw["hyper_parameters"]).eval()
    again.model.load_state_dict(state)
    x = torch.randn(2, 3, 150, 203)
    with torch.no_grad():
        a, b = task(x), again(x)
    assert a.shape == (2, task.num_classes, 150, 203)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_init_from_with_other_class_count(
    trained_run: Path, tmp_path: Path, toy_data_root: Path, capsys
) -> None:
    ckpt_path = trained_run / "checkpoints" / "last.ckpt"
    hp = torch.load(ckpt_path, map_location="cpu", weights_only=True)["hyper_parameters"]
    k = hp["num_classes"] + 3
    hp.update(num_classes=k, class_names=[f"c{i}" for i in range(k)], init_from=str(ckpt_path))
    task = SegmentationTask(**hp)
    report = task.init_report
    out = capsys.readouterr().out
    assert "re-initialised" in out
    mismatched = [m.split(" ")[0] for m in report.mismatched]
    # only the classifiers (decode + aux) differ in shape
    assert mismatched and all(("conv_seg" in n or "cls" in n or "classifier" in n) for n in mismatched), (
        mismatched
    )
    src = torch.load(ckpt_path, map_location="cpu", weights_only=True)["state_dict"]
    own = task.state_dict()
    loaded = set(report.loaded)
    assert len(loaded) == len(src) - len(mismatched)
    for name in loaded:
        torch.testing.assert_close(own[name], src[name])


def test_label_out_of_range_is_a_clear_error(
    tmp_path: Path, toy_data_root: Path, hydra_cleanup: None
) -> None:
    cfg = compose_train_cfg(["experiment=toy_seg"], tmp_path / "run", data_dir=toy_data_root.parent)
    dm = instantiate(cfg.data, _convert_="all")
    task = build_task(cfg, dm)
    batch = {
        "image": torch.randn(1, 3, 64, 64),
        "mask": torch.full((1, 64, 64), task.num_classes + 4),
        "meta": [{"path": "/x/bad_label.png"}],
    }
    with pytest.raises(ValueError, match=r"bad_label\.png"):
        task.check_batch(batch)  # on the host, before the transfer (on_before_batch_transfer)


def test_toy_experiment_accepts_any_dataset_in_the_layout(
    tmp_path: Path, toy_data_root: Path, hydra_cleanup: None
) -> None:
    """DESIGN: `experiment=toy_seg data.root=DIR` works on a real-layout dataset (no toy marker)."""
    root = tmp_path / "mine"
    for split in ("training", "validation"):
        for kind, pattern in (("images", "*.jpg"), ("annotations", "*.png")):
            (root / kind / split).mkdir(parents=True)
            for f in sorted((toy_data_root / kind / split).glob(pattern))[:3]:
                shutil.copy(f, root / kind / split / f.name)
    names = [f"thing{i}" for i in range(len((toy_data_root / "classes.txt").read_text().split("\n")) - 1)]
    (root / "classes.txt").write_text("\n".join(names) + "\n")
    cfg = compose_train_cfg(["experiment=toy_seg", f"data.root={root}"], tmp_path / "run")
    dm = instantiate(cfg.data, _convert_="all")
    dm.setup("fit")
    assert dm.class_names == names and len(dm.train_dataset) == 3
    assert not any(root.glob(".toy*")), "toy data must not be generated into a user's dataset"


def test_compile_switch_keeps_checkpoint_keys(
    tmp_path: Path, toy_data_root: Path, hydra_cleanup: None
) -> None:
    """compile=true compiles backbone + neck in place: training runs, checkpoint keys stay loadable."""
    overrides = ["experiment=toy_seg", "debug=fdr", "data.num_workers=0", "compile=true"]
    overrides += ["compile_options.backend=eager"]  # wiring only; inductor needs a compiler toolchain
    cfg = compose_train_cfg(overrides, tmp_path / "run", data_dir=toy_data_root.parent)
    dm = instantiate(cfg.data, _convert_="all")
    task = build_task(cfg, dm)
    assert task.compile_backbone(backend="eager") == ["backbone", "neck"]
    assert all("_orig_mod" not in k for k in task.state_dict())
    run_train(cfg)
