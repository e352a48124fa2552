"""Checkpoints written before the DenseModule redesign (main at d887177, the per-task LightningModules)
load in the new code and reproduce what the old code computed from them.

The fixtures in tests/data/legacy/ were written by the old code (tests/data/legacy/make_legacy.py):
each old checkpoint, the old model's outputs on a fixed input, its training loss on a fixed batch
and the metrics old tools/eval.py computed on toy data. The reference is the old code itself.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from siglip_dense.checkpoints import load_model
from siglip_dense.data.toy import ensure_toy_data
from siglip_dense.evaluate import run_eval
from siglip_dense.tasks.detection import DetectionTask
from siglip_dense.tasks.module import DenseModule
from siglip_dense.tasks.multitask import MultiTask
from siglip_dense.tasks.segmentation import SegmentationTask
from tests.conftest import compose_cfg, compose_train_cfg

LEGACY = Path(__file__).parent / "data" / "legacy"
NAMES = ("seg", "depth", "det", "multitask")


def _make_legacy() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_legacy", LEGACY / "make_legacy.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MAKE = _make_legacy()


def _stored(name: str) -> dict[str, Any]:
    return torch.load(LEGACY / f"{name}_outputs.pt", map_location="cpu", weights_only=True)


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    """The fixtures were computed with one thread (make_legacy.py): CPU float kernels split their
    reductions by thread count, so bit-identity holds only at the same count (1e-7 apart otherwise)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The toy datasets the fixtures were evaluated on, regenerated (same sizes and seed)."""
    root = tmp_path_factory.mktemp("legacy_data")
    for toy, (layout, num_train, num_val) in MAKE.TOY.items():
        ensure_toy_data(root / toy, num_train=num_train, num_val=num_val, layout=layout)
    return root


@pytest.mark.parametrize("name", NAMES)
def test_old_checkpoint_reproduces_old_outputs_and_loss(name: str) -> None:
    """Same weights → the new DenseModule gives the old per-task module's outputs and training loss,
    bit for bit (eval-mode outputs on a fixed input; train-mode loss on a fixed batch, seeded)."""
    task = load_model(LEGACY / f"{name}.ckpt")
    assert isinstance(task, DenseModule)
    raw = torch.load(LEGACY / f"{name}.ckpt", map_location="cpu", weights_only=True)
    state = task.state_dict()
    assert set(state) == set(raw["state_dict"]), "state-dict layout differs from the old one"
    new = MAKE.outputs_of(name, task, torch)
    old = _stored(name)
    torch.testing.assert_close(new["output"], old["output"], rtol=0, atol=0)
    torch.testing.assert_close(new["loss"], old["loss"], rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_old_checkpoint_evaluates_as_before(
    name: str, toy_dir: Path, tmp_path: Path, hydra_cleanup: None
) -> None:
    """tools/eval.py on an old checkpoint: the metrics old tools/eval.py wrote on the same data."""
    ckpt = LEGACY / f"{name}.ckpt"
    over = [f"ckpt_path={ckpt}", f"output_dir={tmp_path / 'eval'}"]
    if name == "multitask":
        over += [f"data.datamodules.seg.root={toy_dir / 'toy_seg'}", "data.datamodules.seg.num_workers=0"]
        over += [
            f"data.datamodules.depth.root={toy_dir / 'toy_depth'}",
            "data.datamodules.depth.num_workers=0",
        ]
    else:
        over += [f"data.root={toy_dir / ('toy_' + name)}", "data.num_workers=0"]
    metrics = run_eval(compose_cfg("eval", over, tmp_path / "hydra"))
    expected = json.loads((LEGACY / f"{name}_eval.json").read_text())
    assert _without_protocol(json.loads(json.dumps(metrics, sort_keys=True))) == expected


def _without_protocol(metrics: dict[str, Any]) -> dict[str, Any]:
    """metrics.json minus ``metric_protocol`` (segmentation names its mIoU rule since the old code
    wrote the fixtures); an old segmentation checkpoint on its old data keeps MMSeg's rule."""
    out = {}
    for key, value in metrics.items():
        if key == "metric_protocol":
            assert value == "mmseg"
        else:
            out[key] = _without_protocol(value) if isinstance(value, dict) else value
    return out


def _hparams(name: str) -> dict[str, Any]:
    raw = torch.load(LEGACY / f"{name}.ckpt", map_location="cpu", weights_only=True)
    return dict(raw["hyper_parameters"]), raw["state_dict"]


def test_init_from_reads_old_checkpoints() -> None:
    """init_from an old checkpoint: all of it into the same task; seg → det (backbone) and
    seg → multi-task (backbone, seg neck and heads) across layouts."""
    hp, state = _hparams("seg")
    seg = SegmentationTask(**{**hp, "init_from": str(LEGACY / "seg.ckpt")})
    assert set(seg.init_report.loaded) == set(state) and not seg.init_report.missing
    for key, value in seg.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=key)

    det_hp, _ = _hparams("det")
    det = DetectionTask(**{**det_hp, "init_from": str(LEGACY / "seg.ckpt"), "init_from_filter": "backbone"})
    backbone = {k for k in state if k.startswith("model.backbone.")}
    assert set(det.init_report.loaded) == {
        k.replace("model.backbone.", "model.backbone.body.") for k in backbone
    }

    mt_hp, _ = _hparams("multitask")
    multi = MultiTask(**{**mt_hp, "init_from": str(LEGACY / "seg.ckpt")})
    loaded = set(multi.init_report.loaded)
    assert {k for k in state if k.startswith(("model.head.", "model.neck.", "model.aux_head."))} == {
        k.replace("model.tasks.seg.model.", "model.") for k in loaded if k.startswith("model.tasks.seg.")
    }
    assert "model.tasks.depth.model.head." in multi.init_report.absent


@pytest.mark.slow
def test_old_checkpoint_resumes_training(toy_dir: Path, tmp_path: Path, hydra_cleanup: None) -> None:
    """Resuming the old seg checkpoint (its optimizer and scheduler state included) trains on."""
    run_dir = tmp_path / "resume"
    over = [*MAKE.RUNS["seg"], *MAKE.COMMON, "trainer.max_epochs=2", f"ckpt_path={LEGACY / 'seg.ckpt'}"]
    cfg = compose_train_cfg(over, run_dir, data_dir=toy_dir)
    run_train_metrics = __import__("siglip_dense.train", fromlist=["run_train"]).run_train(cfg)
    assert 0.0 <= run_train_metrics["mIoU"] <= 1.0
    raw = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert raw["global_step"] == 4  # 2 old steps + 2 resumed
