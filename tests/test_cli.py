"""Entry points: console scripts from a non-editable install, the shims' argument forms, the sweep value."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from siglip_dense.cli import CONFIG_PATH, compose_config, monitored_metric, require, train_app
from tests.conftest import compose_train_cfg

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {"train", "eval", "predict", "export", "convert"}


def test_checkout_reads_its_own_configs() -> None:
    """In a checkout (PYTHONPATH / editable) edits to configs/ count without reinstalling."""
    assert Path(CONFIG_PATH) == REPO / "configs"


@pytest.mark.parametrize("name", ["eval", "predict", "export", "convert"])
def test_missing_arguments_exit_2_naming_them(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``siglip-dense-export ckpt_path=X``: a usage error naming ``out``, not a traceback."""
    required = {"eval": ["ckpt_path"], "predict": ["ckpt_path", "input", "output"]}
    *given, last = required.get(name) or {"export": ["ckpt_path", "out"], "convert": ["src", "out"]}[name]
    cfg = compose_config(name, [f"{k}=x" for k in given])
    with pytest.raises(SystemExit) as exit_info:
        require(cfg, f"siglip-dense-{name} ...")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"{last}=..." in err and not any(f"{k}=..." in err for k in given)
    cfg = compose_config(name, [f"{k}=x" for k in [*given, last]])
    require(cfg, "")  # all given: nothing to report


@pytest.mark.parametrize(
    "src", ["org/name", "dir with space/w.pt", "a=b,c[1]/w.npz", "it's/w.safetensors", "C:\\w\\", "x\\'y"]
)
def test_convert_positional_form_keeps_the_path(src: str) -> None:
    """``tools/convert_weights.py SRC OUT`` reaches the Hydra config with SRC unchanged, whatever it holds."""
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import convert_weights
    finally:
        sys.path.remove(str(REPO / "tools"))
    cfg = compose_config(
        "convert", convert_weights.overrides_of([src, "out dir/o.safetensors", "--img-size", "64"])
    )
    assert (cfg.src, cfg.out, cfg.img_size) == (src, "out dir/o.safetensors", 64)
    given = ["src=a/b.pt", "out=o.safetensors"]
    assert convert_weights.overrides_of(given) == given


def test_monitored_metric_follows_monitor() -> None:
    flat = {"mIoU": 0.5, "aAcc": 0.9}
    assert monitored_metric(OmegaConf.create({"monitor": "val/mIoU"}), flat) == 0.5
    nested = {"seg": {"mIoU": 0.25}, "depth": {"abs_rel": 0.1}}
    assert monitored_metric(OmegaConf.create({"monitor": "val/depth/abs_rel"}), nested) == 0.1
    assert monitored_metric(OmegaConf.create({"monitor": "val/mIoU"}), {}) is None
    with pytest.warns(UserWarning, match="val/bbox_AP.*bbox_AP.*aAcc"):
        assert math.isnan(monitored_metric(OmegaConf.create({"monitor": "val/bbox_AP"}), flat))


def test_train_app_returns_the_monitored_metric(tmp_path: Path) -> None:
    """What a Hydra sweeper reads: the train app's return value == the run's metrics.json value."""
    from siglip_dense.data.toy import ensure_toy_data

    ensure_toy_data(tmp_path / "data" / "toy_seg", num_train=2, num_val=2)
    overrides = ["trainer.max_epochs=1", "+trainer.limit_train_batches=1", "num_vis=0", "data.num_workers=0"]
    cfg = compose_train_cfg([*overrides, "data.batch_size=2"], tmp_path / "run", tmp_path / "data")
    value = train_app(cfg)
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert isinstance(value, float) and value == written["mIoU"]


# -- a non-editable install, used from another directory ----------------------------------------------
def _install_wheel(tmp_path: Path) -> Path:
    """Build the wheel from a copy of the sources and install it with ``--target``; returns that dir."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("siglip_dense", "configs"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    wheels = tmp_path / "wheels"
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)]
    proc = subprocess.run(build, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    target = tmp_path / "site"
    (wheel,) = wheels.glob("siglip_dense-*.whl")
    install = [*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)]
    proc = subprocess.run(install, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return target


@pytest.mark.slow
def test_installed_console_scripts_train_and_eval_from_another_directory(tmp_path: Path) -> None:
    """pip install (not editable) -> siglip-dense-train's default toy run -> siglip-dense-eval of its checkpoint."""
    from siglip_dense.data.toy import ensure_toy_data

    target = _install_wheel(tmp_path)
    shipped = {
        p.relative_to(target / "siglip_dense" / "configs")
        for p in target.glob("siglip_dense/configs/**/*.yaml")
    }
    assert shipped == {p.relative_to(REPO / "configs") for p in (REPO / "configs").glob("**/*.yaml")}

    work = tmp_path / "work"  # the user's directory: paths.root_dir=. puts data/ and outputs/ here
    ensure_toy_data(work / "data" / "toy_seg", num_train=4, num_val=3)  # fewer scenes than the default
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    env.pop("PROJECT_ROOT", None)

    def run(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [sys.executable, *args], cwd=work, env=env, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        return proc

    scripts = {p.name for p in (target / "bin").iterdir()}
    assert scripts == {f"siglip-dense-{name}" for name in SCRIPTS}
    where = run("-c", "import siglip_dense.cli as c; print(c.__file__); print(c.CONFIG_PATH)").stdout.split()
    assert Path(where[0]).is_relative_to(target) and where[1] == "pkg://siglip_dense.configs"

    small = [
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=2",
        "data.batch_size=2",
        "data.num_workers=0",
    ]
    run(str(target / "bin" / "siglip-dense-train"), *small, "num_vis=1")
    (run_dir,) = (work / "outputs" / "toy_seg" / "runs").iterdir()
    assert {"metrics.json", "predictions.png", "train.log", "config.yaml"} <= {
        p.name for p in run_dir.iterdir()
    }
    trained = json.loads((run_dir / "metrics.json").read_text())

    ckpt = run_dir / "checkpoints" / "last.ckpt"
    run(
        str(target / "bin" / "siglip-dense-eval"),
        f"ckpt_path={ckpt}",
        "output_dir=eval",
        "data.num_workers=0",
    )
    evaluated = json.loads((work / "eval" / "metrics.json").read_text())
    # convert: a Hydra app too; an unreadable source is a one-line error naming it
    bad = subprocess.run(
        [sys.executable, str(target / "bin" / "siglip-dense-convert"), "src=missing.pt", "out=o.safetensors"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 1 and "missing.pt" in bad.stderr and "Traceback" not in bad.stderr
    # one epoch: the best checkpoint train.py validated holds the same weights as last.ckpt
    assert evaluated["mIoU"] == pytest.approx(trained["mIoU"], abs=1e-6)
    assert evaluated["aAcc"] == pytest.approx(trained["aAcc"], abs=1e-6)
