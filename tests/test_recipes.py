"""Recipes as diffs: every experiment composes to exactly the config it had before the refactor.

The published recipes are a base per protocol (``configs/experiment/_base_/<protocol>.yaml``) plus one
small file per backbone size holding only what differs. ``tests/data/recipes_snapshot.json`` holds the
fully resolved config of every experiment as composed from the full-copy recipe files (main at
aecd310, before the refactor), with the volatile ``paths`` group left out and the run / data
directories fixed (see ``snapshot``). It covers the config groups too (backbone, task, data, ...),
so an intended change to a recipe or to a group's defaults fails here until the snapshot is
regenerated with

    PYTHONPATH=. python tests/test_recipes.py --regenerate

whose JSON diff then shows every setting of every recipe that the change moved (review it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

import siglip_dense  # noqa: F401  (registers the ${two_thirds:} resolver the linear probes use)
from tests.conftest import CONFIG_DIR, compose_train_cfg

SNAPSHOT = Path(__file__).parent / "data" / "recipes_snapshot.json"
EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
BASES = sorted(p.stem for p in (CONFIG_DIR / "experiment" / "_base_").glob("*.yaml"))
# fixed stand-ins for the run and data directories, so the snapshot does not depend on the machine
RUN_DIR = Path("/snapshot/run")
DATA_DIR = Path("/snapshot/data")
# a size variant's whole file (comments included): the issue's "a size variant in <= 10 lines"
SIZE_VARIANT_MAX_LINES = 10


def snapshot(experiment: str) -> dict[str, Any]:
    """The resolved config of ``python train.py experiment=<experiment>``, less the ``paths`` group."""
    cfg = compose_train_cfg([f"experiment={experiment}"], RUN_DIR, data_dir=DATA_DIR)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(resolved, dict)
    del resolved["paths"]  # root_dir follows $PROJECT_ROOT / the checkout
    return resolved


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys where two nested containers differ (readable failure messages)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in a or key not in b:
                out.append(f"{name}: {a.get(key, '<missing>')!r} != {b.get(key, '<missing>')!r}")
            else:
                out.extend(_diff(a[key], b[key], name))
        return out
    return [] if a == b else [f"{prefix}: {a!r} != {b!r}"]


@pytest.fixture(scope="module")
def reference() -> dict[str, dict[str, Any]]:
    return json.loads(SNAPSHOT.read_text())


def test_snapshot_covers_every_experiment(reference: dict[str, dict[str, Any]]) -> None:
    """No experiment name disappeared, and no new one is left without a reference."""
    assert sorted(reference) == EXPERIMENTS


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_recipe_equals_pre_refactor_config(
    experiment: str, reference: dict[str, dict[str, Any]], hydra_cleanup: None
) -> None:
    """The full composed config (backbone, neck, task incl. head / optimizer / layer decay /
    schedule / eval protocol, data, trainer, top-level keys) equals the pre-refactor one."""
    differences = _diff(snapshot(experiment), reference[experiment])
    assert not differences, "\n".join(differences)


def test_bases_are_not_experiments() -> None:
    """A base lives under _base_/, so ``experiment=<protocol>`` is no recipe to be mistaken for one."""
    assert set(BASES) == {
        "ade20k_linear",
        "ade20k_linear_naflex",
        "ade20k_upernet",
        "nyu_dpt",
        "nyu_linear",
        "coco_maskrcnn_vitdet",
        "nyu_normals_linear",
        "voc_linear",
    }
    assert not set(BASES) & set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", [e for e in EXPERIMENTS if not e.startswith("toy_")])
def test_size_variant_is_a_small_diff_over_its_base(experiment: str) -> None:
    """Every published recipe is ``<base>_<size>``: its base first, then the backbone, in at most
    SIZE_VARIANT_MAX_LINES lines (comments included)."""
    path = CONFIG_DIR / "experiment" / f"{experiment}.yaml"
    defaults = OmegaConf.load(path).defaults
    base = defaults[0].removeprefix("/experiment/_base_/")
    assert base in BASES, defaults[0]
    size = experiment.removeprefix(f"{base}_")
    assert "_" not in size, f"{experiment} is not <{base}>_<size>"
    assert defaults[1] == {"override /backbone": f"{size}_naflex" if "naflex" in base else size}
    assert len(path.read_text().splitlines()) <= SIZE_VARIANT_MAX_LINES


def test_command_line_overrides_win_over_size_file(tmp_path: Path, hydra_cleanup: None) -> None:
    """``backbone=`` on the command line beats the size file's backbone; its other settings stay."""
    cfg = compose_train_cfg(["experiment=ade20k_upernet_b16", "backbone=l16"], tmp_path / "run")
    assert cfg.backbone.arch == "vit_large_patch16_siglip_512"
    assert cfg.backbone.drop_path_rate == 0.1 and cfg.task.layer_decay == 0.65
    assert cfg.task_name == "ade20k_upernet_b16"


def test_own_size_variant_builds_on_a_base(tmp_path: Path, hydra_cleanup: None) -> None:
    """A user's file in their own config dir (what ``--config-dir`` adds to the search path) can
    name a shipped base, as the README's one-liner shows."""
    (tmp_path / "experiment").mkdir()
    body = "# @package _global_\ndefaults: [/experiment/_base_/nyu_dpt, override /backbone: l16]\n"
    (tmp_path / "experiment" / "mine.yaml").write_text(body + "task_name: mine\n")
    overrides = ["experiment=mine", f"hydra.searchpath=[file://{tmp_path}]"]
    cfg = compose_train_cfg(overrides, tmp_path / "run", data_dir=DATA_DIR)
    reference = json.loads(SNAPSHOT.read_text())["nyu_dpt_l16"]
    assert cfg.task_name == "mine" and cfg.backbone.arch == reference["backbone"]["arch"]
    for key in ("monitor", "data", "trainer"):
        assert OmegaConf.to_container(cfg, resolve=True)[key] == reference[key], key
    assert cfg.task.optimizer.lr == 1.0e-4 and cfg.task.layer_decay == 0.9


@pytest.mark.slow
def test_train_py_resolves_a_size_variant(tmp_path: Path) -> None:
    """``python train.py experiment=<size> --cfg job --resolve`` (Hydra's own app, not compose())
    prints the size file's top-level keys and the base's settings."""
    overrides = ["experiment=nyu_dpt_so400m14", f"paths.data_dir={DATA_DIR}"]
    cmd = [sys.executable, str(CONFIG_DIR.parent / "train.py"), *overrides, "--cfg", "job", "--resolve"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    printed = OmegaConf.to_container(OmegaConf.create(proc.stdout))
    expected = json.loads(SNAPSHOT.read_text())["nyu_dpt_so400m14"]
    for key in ("task_name", "monitor", "monitor_mode", "backbone", "data", "task", "trainer"):
        assert printed[key] == expected[key], key


def main() -> None:
    """``--regenerate``: rewrite the snapshot from the recipes as they are now."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regenerate", action="store_true", help=f"rewrite {SNAPSHOT}")
    args = parser.parse_args()
    if not args.regenerate:
        parser.error("nothing to do: pass --regenerate")
    data = {e: snapshot(e) for e in EXPERIMENTS}
    SNAPSHOT.parent.mkdir(parents=True, exist_ok=True)
    SNAPSHOT.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(data)} experiments to {SNAPSHOT}")


if __name__ == "__main__":
    main()


def readme_recipe_rows() -> dict[str, list[str]]:
    """README's recipe table: the first cell's recipe name (``{...}`` sizes kept) -> the row's cells."""
    text = (Path(__file__).parents[1] / "README.md").read_text()
    head = "| experiment | task | backbone | protocol | reference |"
    assert head in text
    rows: dict[str, list[str]] = {}
    for line in text[text.index(head) :].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].split("`")[1] if "`" in cells[0] else cells[0]] = cells
    return rows


@pytest.mark.parametrize(
    ("recipe", "metric", "numbers"),
    [
        ("ade20k_linear", "mIoU", ("41.8", "45.4")),
        ("voc_linear", "mIoU", ("77.1", "78.1")),
        ("nyu_normals_linear", "rmse", ("angular RMSE", "24.9°", "23.0°")),
    ],
)
def test_readme_quotes_the_paper_in_the_metric_the_recipe_monitors(
    reference: dict[str, dict[str, Any]], recipe: str, metric: str, numbers: tuple[str, ...]
) -> None:
    """The SigLIP 2 paper's Tab. 2 number sits beside its recipe, named as the recipe monitors it."""
    row = next(cells for name, cells in readme_recipe_rows().items() if name.startswith(f"{recipe}_{{"))
    quoted = row[-1]
    assert "SigLIP 2 paper" in quoted and all(n in quoted for n in numbers), quoted
    assert reference[f"{recipe}_so400m14"]["monitor"] == f"val/{metric}"
    assert metric in " ".join(row[-2:]) or metric.upper() in quoted, row
