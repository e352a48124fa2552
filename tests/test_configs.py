"""Every config composes, resolves and instantiates (lightning-hydra-template style).

The published recipes name multi-GB backbones and hub checkpoints that a CI machine doesn't have:
their models are built on the meta device (shapes only, no memory) with the checkpoint left out.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from siglip_dense.config_check import ConfigKeyError, check_train_config
from siglip_dense.train import build_callbacks, build_task
from tests.conftest import CONFIG_DIR, compose_train_cfg

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
BACKBONES = sorted(p.stem for p in (CONFIG_DIR / "backbone").glob("*.yaml"))
TRAINERS = sorted(p.stem for p in (CONFIG_DIR / "trainer").glob("*.yaml"))


def test_there_are_recipes() -> None:
    assert "toy_seg" in EXPERIMENTS
    for variant in ("b16", "l16", "so400m14", "so400m16", "g16"):
        assert f"ade20k_linear_{variant}" in EXPERIMENTS
        assert f"ade20k_upernet_{variant}" in EXPERIMENTS


def test_default_is_toy_seg(tmp_path: Path, hydra_cleanup: None) -> None:
    default = compose_train_cfg([], tmp_path / "a")
    explicit = compose_train_cfg(["experiment=toy_seg"], tmp_path / "a")
    strip = ("hydra",)
    a = {k: v for k, v in OmegaConf.to_container(default).items() if k not in strip}
    b = {k: v for k, v in OmegaConf.to_container(explicit).items() if k not in strip}
    assert a == b


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_resolves(experiment: str, tmp_path: Path, hydra_cleanup: None) -> None:
    cfg = compose_train_cfg([f"experiment={experiment}"], tmp_path / "run")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for key in ("backbone", "task", "data", "trainer", "callbacks", "paths"):
        assert key in resolved, key
    assert resolved["task"]["backbone"]["arch"] == resolved["backbone"]["arch"]
    assert "_target_" in resolved["task"] and "_target_" in resolved["data"]


@pytest.mark.parametrize("experiment", [e for e in EXPERIMENTS if e.startswith("ade20k")])
def test_recipe_instantiates_on_meta(
    experiment: str, tmp_path: Path, toy_data_root: Path, hydra_cleanup: None
) -> None:
    """Model built at full size on the meta device; data module (on toy data in the layout) and
    callbacks for real."""
    overrides = [f"experiment={experiment}", "backbone.checkpoint=null", f"data.root={toy_data_root}"]
    cfg = compose_train_cfg(overrides, tmp_path / "run")
    dm = instantiate(cfg.data, _convert_="all")
    assert isinstance(dm, L.LightningDataModule)
    with open_dict(cfg):
        cfg.task.num_classes = 150
    with torch.device("meta"):
        task = build_task(cfg, dm)
    assert task.backbone.arch == cfg.backbone.arch
    assert task.num_classes == 150
    patch = task.backbone.patch_size
    assert task.eval_cfg["crop_size"][0] % patch == 0
    if cfg.task.get("freeze_backbone"):
        assert not any(p.requires_grad for p in task.backbone.parameters())
    assert len(build_callbacks(cfg, tmp_path)) == len(cfg.callbacks)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_backbone_configs_build_on_meta(backbone: str, tmp_path: Path, hydra_cleanup: None) -> None:
    cfg = compose_train_cfg([f"backbone={backbone}", "backbone.checkpoint=null"], tmp_path / "run")
    with torch.device("meta"):
        bb = instantiate(cfg.backbone, _convert_="all", verbose=False)
    assert len(bb.out_indices) >= 1 and bb.embed_dim > 0


@pytest.mark.parametrize("trainer", TRAINERS)
def test_trainer_configs_compose(trainer: str, tmp_path: Path, hydra_cleanup: None) -> None:
    cfg = compose_train_cfg([f"trainer={trainer}"], tmp_path / "run")
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"
    if trainer in ("cpu", "ddp_sim"):
        trainer_obj = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
        assert trainer_obj.num_devices == (2 if trainer == "ddp_sim" else 1)


def test_toy_seg_instantiates_fully(tmp_path: Path, toy_data_root: Path, hydra_cleanup: None) -> None:
    cfg = compose_train_cfg(["experiment=toy_seg"], tmp_path / "run", data_dir=toy_data_root.parent)
    dm = instantiate(cfg.data, _convert_="all")
    task = build_task(cfg, dm)
    assert task.num_classes == len(dm.class_names)
    assert task.class_names == list(dm.class_names)


def test_backbone_freeze_switch(tmp_path: Path, hydra_cleanup: None) -> None:
    """``backbone.freeze=true`` (the issue's spelling) freezes every backbone weight."""
    cfg = compose_train_cfg(["backbone.freeze=true"], tmp_path / "run")
    bb = instantiate(cfg.backbone, _convert_="all", verbose=False)
    assert not any(p.requires_grad for p in bb.parameters())
    cfg = compose_train_cfg(["backbone.freeze_blocks=2"], tmp_path / "run")
    bb = instantiate(cfg.backbone, _convert_="all", verbose=False)
    frozen = {
        n.split(".")[2]
        for n, p in bb.named_parameters()
        if n.startswith("vit.blocks") and not p.requires_grad
    }
    assert frozen == {"0", "1"}


# -- strict keys: a key no code reads is an error naming it ------------------------------------------
def _train(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "train.py", *args, f"hydra.run.dir={tmp_path / 'run'}"]
    cmd.append(f"paths.data_dir={tmp_path / 'data'}")
    return subprocess.run(cmd, cwd=CONFIG_DIR.parent, capture_output=True, text=True, timeout=300)


def _user_experiment(tmp_path: Path, body: str) -> Path:
    """A user's own recipe, added as Hydra documents it: ``--config-dir DIR`` with DIR/experiment/."""
    config_dir = tmp_path / "my_configs"
    (config_dir / "experiment").mkdir(parents=True)
    header = "# @package _global_\ndefaults:\n  - toy_seg\n"
    (config_dir / "experiment" / "mine.yaml").write_text(header + body)
    return config_dir


@pytest.mark.slow
@pytest.mark.parametrize(
    ("body", "named", "suggested"),
    [
        ("task:\n  layer_dacay: 0.5\n", "task.layer_dacay", "task.layer_decay"),
        ("data:\n  batchsize: 2\n", "data.batchsize", "data.batch_size"),
        ("task:\n  eval:\n    strid: [9, 9]\n", "task.eval.strid", "task.eval.stride"),
    ],
)
def test_misspelt_key_in_an_experiment_file_exits_naming_it(
    body: str, named: str, suggested: str, tmp_path: Path
) -> None:
    config_dir = _user_experiment(tmp_path, body)
    proc = _train(["--config-dir", str(config_dir), "experiment=mine"], tmp_path)
    assert proc.returncode != 0
    err = proc.stdout + proc.stderr
    assert f"'{named}'" in err and f"did you mean '{suggested}'" in err, err[-2000:]
    assert not (tmp_path / "data").exists()  # stopped before any data was generated


@pytest.mark.slow
@pytest.mark.parametrize("override", ["task.layer_dacay=0.5", "data.batchsize=2"])
def test_misspelt_key_on_the_command_line_exits_naming_it(override: str, tmp_path: Path) -> None:
    proc = _train([override], tmp_path)
    assert proc.returncode != 0
    assert override.split("=")[0].split(".")[-1] in proc.stdout + proc.stderr


def test_every_recipe_passes_the_key_check(tmp_path: Path, hydra_cleanup: None) -> None:
    for experiment in EXPERIMENTS:
        check_train_config(compose_train_cfg([f"experiment={experiment}"], tmp_path / "run"))


def test_top_level_typo_is_refused_but_recipe_variables_pass(tmp_path: Path, hydra_cleanup: None) -> None:
    cfg = compose_train_cfg(["experiment=ade20k_linear_b16", "+seeed=1"], tmp_path / "run")
    with pytest.raises(ConfigKeyError, match=r"'seeed'.*did you mean 'seed'"):
        check_train_config(cfg)
    # `res` is not in train.yaml, but the recipe interpolates it (${res}): a variable, not a typo
    check_train_config(compose_train_cfg(["experiment=ade20k_linear_b16"], tmp_path / "run"))


def test_task_constructors_take_no_unknown_keyword(tmp_path: Path, hydra_cleanup: None) -> None:
    cfg = compose_train_cfg(["experiment=toy_seg", "+task.num_classes=3"], tmp_path / "run")
    task_cfg = OmegaConf.to_container(cfg.task, resolve=True)
    with pytest.raises(Exception, match="unexpected keyword argument .layer_dacay."):
        instantiate({**task_cfg, "layer_dacay": 0.5}, _recursive_=False, _convert_="all")


@pytest.mark.parametrize(
    ("experiment", "override", "suggested"),
    [
        ("toy_seg", "+task.eval.strid=[9,9]", "task.eval.stride"),
        ("toy_depth", "+task.eval.short_sid=64", "task.eval.short_side"),
        ("toy_depth", "+task.loss.grad_weigth=1.0", "task.loss.grad_weight"),
        ("toy_multitask", "+task.tasks.seg.eval.strid=[9,9]", "task.tasks.seg.eval.stride"),
        ("toy_multitask", "+task.tasks.depth.loss.grad_weigth=1.0", "task.tasks.depth.loss.grad_weight"),
        ("toy_det", "+task.detector.anchor_scal=4.0", "task.detector.anchor_scale"),
        ("toy_det", "+task.detector.representation_siz=64", "task.detector.representation_size"),
        ("toy_seg", "+paths.data_dri=/nowhere", "paths.data_dir"),
        ("toy_seg", "+compile_options.modee=max-autotune", "compile_options.mode"),
    ],
)
def test_unknown_key_in_a_dict_option_is_refused_with_the_nearest(
    experiment: str, override: str, suggested: str, tmp_path: Path, hydra_cleanup: None
) -> None:
    """Dict options without ``_target_`` (eval, loss, detector, paths, compile_options) are checked too:
    a misspelt key used to be merged over the defaults (or passed into torchvision's ``**kwargs``)."""
    named = override.removeprefix("+").split("=")[0]
    cfg = compose_train_cfg([f"experiment={experiment}", override], tmp_path / "run")
    with pytest.raises(ConfigKeyError, match=rf"'{re.escape(named)}'.*did you mean '{re.escape(suggested)}'"):
        check_train_config(cfg)


@pytest.mark.parametrize(
    ("experiment", "option", "value", "named"),
    [
        ("toy_seg", "eval", {"strid": [9, 9]}, "eval.strid"),
        ("toy_depth", "loss", {"grad_weigth": 1.0}, "loss.grad_weigth"),
        ("toy_det", "detector", {"kind": "mask_rcnn", "anchor_scal": 4.0}, "detector.anchor_scal"),
    ],
)
def test_task_constructors_refuse_unknown_dict_option_keys(
    experiment: str, option: str, value: dict, named: str, tmp_path: Path, hydra_cleanup: None
) -> None:
    """Built from Python (not train.py's config check), the task itself refuses the key."""
    classes = [] if experiment == "toy_depth" else ["+task.num_classes=3"]
    cfg = compose_train_cfg([f"experiment={experiment}", *classes], tmp_path / "run")
    task_cfg = OmegaConf.to_container(cfg.task, resolve=True)
    with pytest.raises(Exception, match=rf"ConfigKeyError.*'{re.escape(named)}'"):  # Hydra wraps it
        instantiate({**task_cfg, option: value}, _recursive_=False, _convert_="all")


@pytest.mark.parametrize(
    "override",
    [
        "task.tasks.seg.layer_decay=0.5",
        "task.tasks.depth.freeze_backbone=true",
        "task.tasks.seg.optimizer={_target_:torch.optim.SGD,_partial_:true,lr:0.1}",
    ],
)
def test_multitask_member_refuses_settings_made_once_at_the_top(
    override: str, tmp_path: Path, hydra_cleanup: None
) -> None:
    """Optimiser, schedule, layer decay, freezing and init_from belong to the whole multi-task model."""
    cfg = compose_train_cfg(["experiment=toy_multitask", override], tmp_path / "run")
    task_cfg = OmegaConf.to_container(cfg.task, resolve=True)
    key = override.split("=")[0].split(".")[3]
    with pytest.raises(Exception, match=rf"{re.escape(override.split('=')[0])}.*task\.{key}"):
        instantiate(task_cfg, _recursive_=False, _convert_="all")
