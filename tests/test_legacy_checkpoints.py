"""Checkpoints written before the DenseModule redesign (main at d887177, the per-task LightningModules)
load in the new code and reproduce what the old code computed from them.

The fixtures in tests/data/legacy/ were written by the old code (tests/data/legacy/make_legacy.py):
each old checkpoint, the old model's outputs on a fixed input, its training loss on a fixed batch
and the metrics old tools/eval.py computed on toy data. The reference is the old code itself.

What is compared, and how closely: float results depend on more than the code. The same weights and
inputs give the same bits only with the same torch (version and build), the same SIMD kernels on the
CPU (AVX512 and AVX2 kernels sum in another order) and the same number of threads (reductions are
split per thread). ``environment.json`` records these for the fixtures (an environment checked to
reproduce them bit for bit); the tests run on one thread, and where the rest matches too they compare
bit for bit. Elsewhere (another torch, another CPU) only float rounding may differ: outputs and losses
are compared at ``rtol = atol = 1e-5`` (measured differences: up to 9.5e-7 with
``ATEN_CPU_CAPABILITY=avx2`` on this machine, 3.8e-6 on another machine with a fresh install, on
outputs up to 54 in size), metrics at ``rel = 1e-4, abs = 1e-5`` (a pixel or a detection on a
rounding tie may move). A mismatch beyond that is a change of behaviour, not of rounding.
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


RECORDED = json.loads((LEGACY / MAKE.ENVIRONMENT_FILE).read_text())
OUTPUT_TOL = {"rtol": 1e-5, "atol": 1e-5}  # another torch build / CPU: float rounding only
METRIC_TOL = {"rel": 1e-4, "abs": 1e-5}


def _stored(name: str) -> dict[str, Any]:
    return torch.load(LEGACY / f"{name}_outputs.pt", map_location="cpu", weights_only=True)


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    """The fixtures were computed with one thread (make_legacy.py): CPU float kernels split their
    reductions by thread count, so bit-identity holds only at the same count (1e-7 apart otherwise)."""
    before = torch.get_num_threads()
    torch.set_num_threads(RECORDED["num_threads"])
    yield
    torch.set_num_threads(before)


def bit_identical_here() -> bool:
    """Whether this process runs as the fixtures were written (``environment.json``, thread count set)."""
    return MAKE.environment(torch) == RECORDED


def assert_same_outputs(new: Any, old: Any) -> None:
    """Bit for bit where the environment matches the fixtures', else within :data:`OUTPUT_TOL`."""
    tol = {"rtol": 0, "atol": 0} if bit_identical_here() else OUTPUT_TOL
    torch.testing.assert_close(new, old, **tol)


def _flat(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        out.update(_flat(value, f"{prefix}{key}/") if isinstance(value, dict) else {prefix + key: value})
    return out


def assert_same_metrics(new: dict[str, Any], old: dict[str, Any]) -> None:
    """Equal where the environment matches the fixtures', else within :data:`METRIC_TOL` (nulls equal)."""
    new = json.loads(json.dumps(new, sort_keys=True))
    if bit_identical_here():
        assert new == old
        return
    flat_new, flat_old = _flat(new), _flat(old)
    assert flat_new.keys() == flat_old.keys()
    for key, value in flat_old.items():
        if isinstance(value, float):
            assert flat_new[key] == pytest.approx(value, **METRIC_TOL), key
        else:
            assert flat_new[key] == value, key


def test_environment_record_names_what_bit_identity_needs() -> None:
    """The record holds what the comparison switches on; its keys are what make_legacy.py writes."""
    assert set(RECORDED) == {"torch", "cpu_capability", "num_threads", "numpy"}
    assert RECORDED["num_threads"] == 1 == torch.get_num_threads()


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The toy datasets the fixtures were evaluated on, regenerated (same sizes and seed)."""
    root = tmp_path_factory.mktemp("legacy_data")
    for toy, (layout, num_train, num_val) in MAKE.TOY.items():
        ensure_toy_data(root / toy, num_train=num_train, num_val=num_val, layout=layout)
    return root


@pytest.mark.parametrize("name", NAMES)
def test_old_checkpoint_reproduces_old_outputs_and_loss(name: str) -> None:
    """Same weights → the new DenseModule gives the old per-task module's outputs and training loss
    (eval-mode outputs on a fixed input; train-mode loss on a fixed batch, seeded): bit for bit in
    the fixtures' environment, within float rounding elsewhere (module docstring)."""
    task = load_model(LEGACY / f"{name}.ckpt")
    assert isinstance(task, DenseModule)
    raw = torch.load(LEGACY / f"{name}.ckpt", map_location="cpu", weights_only=True)
    state = task.state_dict()
    assert set(state) == set(raw["state_dict"]), "state-dict layout differs from the old one"
    new = MAKE.outputs_of(name, task, torch)
    old = _stored(name)
    assert_same_outputs(new["output"], old["output"])
    assert_same_outputs(new["loss"], old["loss"])


@pytest.mark.parametrize("name", NAMES)
def test_old_checkpoint_evaluates_as_before(
    name: str, toy_dir: Path, tmp_path: Path, hydra_cleanup: None
) -> None:
    """tools/eval.py on an old checkpoint: the metrics old tools/eval.py wrote on the same data (equal
    in the fixtures' environment, within :data:`METRIC_TOL` elsewhere)."""
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
    assert_same_metrics(_without_protocol(json.loads(json.dumps(metrics, sort_keys=True))), expected)


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
        torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=key)  # a copy: exact anywhere

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
