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


# -- command-line mistakes: one line naming the argument ---------------------------------------------------
def _run_entry(
    entry: str, args: list[str], monkeypatch: pytest.MonkeyPatch, capsys, stream: str = "err"
) -> tuple[int, str]:
    """Run a console-script entry point in this process; returns (exit status, stderr or stdout)."""
    import siglip_dense.cli as cli

    monkeypatch.setattr(sys, "argv", [f"siglip-dense-{entry}"])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        getattr(cli, entry)(args)
    return exit_info.value.code, getattr(capsys.readouterr(), stream)


@pytest.mark.parametrize(
    ("entry", "args", "meant"),
    [
        ("train", ["trainer.max_epoch=1"], "'trainer.max_epochs'"),
        ("train", ["experiment=toy_det", "data.image_sise=64"], "'data.image_size'"),
        ("train", ["task.optimizer.lrr=1e-3"], "'task.optimizer.lr'"),
        ("evaluate", ["ckpt_path=x.ckpt", "save_prediction=true"], "'save_predictions'"),
        ("predict", ["ckpt_path=x", "input=x", "output=x", "score_treshold=0.3"], "'score_threshold'"),
    ],
)
def test_a_misspelt_key_is_one_line_naming_the_nearest_key(
    entry: str, args: list[str], meant: str, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Hydra's own advice for a key the config lacks is ``+key=...`` (which would only add a key no code
    reads); the command line gets one line with the nearest valid key, and exit status 2."""
    status, err = _run_entry(entry, args, monkeypatch, capsys)
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: unknown config key") and f"did you mean {meant}?" in lines[0]
    assert "+" not in lines[0].split("Valid keys")[0]


def test_a_trainer_argument_the_config_does_not_list_is_offered_with_a_plus(
    monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Nothing close among the listed keys, but lightning.Trainer takes it: then (only then) the ``+``."""
    status, err = _run_entry("train", ["trainer.limit_val_batchs=2"], monkeypatch, capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert "did you mean '+trainer.limit_val_batches'?" in err


@pytest.mark.parametrize(
    "path",
    ["/data/données/ADE", "/data/ADE (copy)", "/data/it's/ADE", "/data/a=b", "/data/ü $HOME"],
)
def test_a_path_hydra_cannot_read_gets_the_quoted_form(
    path: str, monkeypatch: pytest.MonkeyPatch, capsys, hydra_cleanup: None
) -> None:
    """Hydra's lexer refuses non-ASCII letters, parentheses, quotes, '=' in an unquoted value: one line
    that gives the argument to type instead, and what it gives is that path, unchanged."""
    import shlex

    status, err = _run_entry("train", [f"data.root={path}"], monkeypatch, capsys)
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1, err
    typed = lines[0].split("; write ", 1)[1].rsplit(" (the single quotes", 1)[0]
    (arg,) = shlex.split(typed)  # what the shell hands over
    assert compose_config("train", [arg]).data.root == path


def test_a_path_the_shell_split_at_a_space_is_named(
    monkeypatch: pytest.MonkeyPatch, capsys, hydra_cleanup: None
) -> None:
    """``data.root=/my data/ADE`` unquoted arrives as two arguments: the line says to quote the whole."""
    import shlex

    status, err = _run_entry("train", ["data.root=/my", "data/ADE"], monkeypatch, capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    (arg,) = shlex.split(err.split("for the shell: ", 1)[1])
    assert compose_config("train", [arg]).data.root == "/my data/ADE"


def test_open_vocab_predict_without_classes_names_the_option(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """A SigLIP image-text checkpoint segments the names it is given: without ``classes=`` one line
    says so (not a KeyError from reading its config.json as ours)."""
    from PIL import Image

    from tests.test_text import save_full_model

    ckpt = tmp_path / "siglip"
    save_full_model(ckpt, "siglip", vocab_size=64, image_size=32, patch_size=8)
    Image.new("RGB", (40, 32)).save(tmp_path / "room.png")
    args = [f"ckpt_path={ckpt}", f"input={tmp_path / 'room.png'}", f"output={tmp_path / 'out'}"]
    capsys.readouterr()  # transformers' notes while saving the tiny model
    status, err = _run_entry("predict", args, monkeypatch, capsys)
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"error: ckpt_path={ckpt} is a SigLIP image-text checkpoint")
    assert "classes=[" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("entry", "app", "config"),
    [
        ("train", "train", "train"),
        ("evaluate", "eval", "eval"),
        ("predict", "predict", "predict"),
        ("export", "export", "export"),
        ("convert", "convert", "convert"),
    ],
)
def test_help_is_usage_with_examples_that_compose(
    entry: str, app: str, config: str, monkeypatch: pytest.MonkeyPatch, capsys, hydra_cleanup: None
) -> None:
    """``--help``: usage first, then examples, in one screen (the full config is ``--cfg job``); every
    complete example (no ``...``, no placeholder) is a command line that composes."""
    import shlex

    status, out = _run_entry(entry, ["--help"], monkeypatch, capsys, stream="out")
    lines = out.strip().splitlines()
    assert status == 0 and lines[0].startswith(f"usage: siglip-dense-{app} ")
    assert len(lines) <= 40 and "--cfg job" in out
    examples = [line.strip() for line in lines if line.strip().startswith(f"siglip-dense-{app} ")]
    assert examples
    for example in examples:
        args = shlex.split(example.split("#")[0])[1:]
        if "..." in args or any(a.endswith(("=PATH", "=SIGLIP_DIR")) for a in args):
            continue
        compose_config(config, args)
