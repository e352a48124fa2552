"""README's "Your own data in three commands", read as a new user reads it: each layout tree of
"Bring your own data" is built file by file under the folder name it shows, and each block of commands
(``<!-- first-day: name -->``) runs as written, in that order, from the folder that holds the data, with
only a few steps and small crops added to the training command. The commands' outputs land where the
next command looks for them, and no INFO line is printed twice (stdout and stderr).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.test_data_layouts import (
    build_coco,
    build_depth_folder,
    build_seg_folder,
    readme_tree,
    written_files,
)

ENV = {
    **os.environ,
    "PYTHONPATH": str(REPO),
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "HF_HUB_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
}
SHORT = ["data.num_workers=0", "data.batch_size=2", "trainer.max_steps=2", "num_vis=0", "validate=false"]
SEG_SIZE = ["data.crop_size=[64,64]", "data.base_size=[160,64]"]  # the README tree's images are 64×80
BUILDERS = {"seg_folder": build_seg_folder, "coco": build_coco, "depth_folder": build_depth_folder}
TOY_SIZE = {"seg_folder": SEG_SIZE, "coco": ["data.image_size=64"], "depth_folder": [], "init_from": SEG_SIZE}


def readme_commands(name: str) -> list[list[str]]:
    """The ``python ...`` lines of README's ``<!-- first-day: name -->`` block, split as the shell does."""
    text = (REPO / "README.md").read_text()
    marker = f"<!-- first-day: {name} -->"
    assert marker in text, f"README.md has no {marker}"
    block = text.split(marker, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line) for line in block.splitlines() if line.startswith("python ")]


def readme_root(layout: str) -> str:
    """The root folder name of README's layout tree (``my_seg`` for ``<!-- layout: seg_folder -->``)."""
    text = (REPO / "README.md").read_text()
    block = text.split(f"<!-- layout: {layout} -->", 1)[1].split("```text\n", 1)[1]
    return block.splitlines()[0].rstrip("/")


def run_as_written(argv: list[str], cwd: Path, extra: list[str]) -> subprocess.CompletedProcess:
    """``python <script> args`` from ``cwd`` with the repository's scripts; ``extra`` appended."""
    assert argv[0] == "python"
    cmd = [sys.executable, str(REPO / argv[1]), *argv[2:], *extra]
    proc = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{shlex.join(argv)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    info_on_stderr = [line for line in proc.stderr.splitlines() if "INFO" in line]
    assert not info_on_stderr, f"INFO lines on stderr too: {info_on_stderr[:3]}"
    return proc


def run_block(name: str, cwd: Path) -> list[tuple[list[str], str]]:
    """Run README's block ``name`` (the training command with a few steps, the others as written);
    returns each command with its stdout."""
    commands = readme_commands(name)
    assert commands
    return [
        (argv, run_as_written(argv, cwd, [*SHORT, *TOY_SIZE[name]] if argv[1] == "train.py" else []).stdout)
        for argv in commands
    ]


def _value(argv: list[str], key: str) -> str:
    return next(a.split("=", 1)[1] for a in argv if a.startswith(f"{key}="))


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(BUILDERS))
def test_first_day_block_runs_as_written(layout: str, tmp_path: Path) -> None:
    root = tmp_path / readme_root(layout)
    BUILDERS[layout](root)
    assert written_files(root) == readme_tree(layout)
    (train, _), (evaluate, printed), (predict, _) = run_block(layout, tmp_path)
    assert [a[1] for a in (train, evaluate, predict)] == ["train.py", "tools/eval.py", "tools/predict.py"]
    assert _value(train, "data.root") == root.name

    run_dir = tmp_path / _value(train, "hydra.run.dir")
    assert Path(_value(evaluate, "ckpt_path")) == (run_dir / "checkpoints" / "last.ckpt").relative_to(
        tmp_path
    )
    trained = {p.name for p in (tmp_path / "outputs").iterdir()} if (tmp_path / "outputs").exists() else set()
    assert trained <= {
        "eval"
    }  # the run went where the command named, not outputs/toy_* (eval.log: outputs/eval)
    metrics = json.loads((tmp_path / _value(evaluate, "output_dir") / "metrics.json").read_text())
    assert "metrics -> " in printed
    if layout == "seg_folder":  # the names of classes.txt, not class_0..
        assert list(metrics["per_class_IoU"]) == (root / "classes.txt").read_text().split()
    images = sorted(p.name for p in (tmp_path / _value(predict, "input")).iterdir())
    pictures = sorted(p.name for p in (tmp_path / _value(predict, "output")).glob("*_vis.png"))
    assert pictures == [f"{name}_vis.png" for name in images]

    if layout == "seg_folder":  # then the reuse block, from this run's checkpoint
        ((more, report),) = run_block("init_from", tmp_path)
        assert Path(_value(more, "init_from")) == Path(_value(evaluate, "ckpt_path"))
        assert f"init_from {_value(more, 'init_from')}: loaded " in report
        assert (tmp_path / _value(more, "hydra.run.dir") / "checkpoints" / "last.ckpt").is_file()
