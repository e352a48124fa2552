"""Issue 20 fixes: tokenizer files required, CAT-Seg class embeddings follow the head's names (stored
training embeddings: no text tower needed for them), trained CAT-Seg checkpoints in eval / predict /
load_model with new classes, README class-list strings through Hydra, output names."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from siglip_dense.models.heads.catseg import CATSegHead
from siglip_dense.models.text import build_text_encoder
from siglip_dense.models.weights import CheckpointError
from tests.conftest import REPO
from tests.test_openvocab import _run_tool, _save_checkpoint, siglip2_checkpoint, siglip_checkpoint  # noqa: F401 - module fixtures
from tests.test_openvocab_catseg import NAMES, features, make_head
from tests.test_predict_api import seg_ckpt  # noqa: F401 - module fixture (a closed-set checkpoint)

RENAMED = ["partition", "ground", "heavens", "sphere", "crate"]


# -- 1: the checkpoint's own tokenizer ----------------------------------------------------------------
def test_siglip2_dir_without_tokenizer_files_is_refused(siglip2_checkpoint, tmp_path):  # noqa: F811
    _, path, *_ = siglip2_checkpoint
    bare = tmp_path / "notok"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(path / name, bare / name)
    with pytest.raises(CheckpointError, match=r"notok: no tokenizer files: missing tokenizer\.json") as err:
        build_text_encoder(bare)
    assert "tokenizer=" in str(err.value)
    enc = build_text_encoder(bare, tokenizer=path)  # the option named in the message works
    assert len(enc.tokenizer) == len(build_text_encoder(path).tokenizer)


def test_tokenizer_larger_than_the_text_vocabulary_is_refused(siglip_checkpoint, siglip2_checkpoint):  # noqa: F811
    (_, small, *_), (_, big, *_) = siglip_checkpoint, siglip2_checkpoint  # 40- and 108-token vocabularies
    with pytest.raises(CheckpointError, match=r"108 tokens, the text tower's vocab_size is 40"):
        build_text_encoder(small, tokenizer=big)


# -- 2 / 6: class embeddings follow the names; stored training embeddings ------------------------------
def _embed(path, names, templates):
    enc = build_text_encoder(path)
    return F.normalize(enc.encode([t.format(n) for n in names for t in templates]), dim=-1).view(
        len(names), len(templates), -1
    )


def test_init_from_another_label_set_uses_the_new_names(siglip_checkpoint):  # noqa: F811
    _, path, *_ = siglip_checkpoint
    trained = make_head(path)
    state = trained.state_dict()
    assert json.loads(bytes(state["class_names_utf8"].tolist())) == NAMES  # embeddings stored with names
    renamed = make_head(path, names=RENAMED)
    renamed.load_state_dict(state)  # what init_from does with the head's weights
    expected = _embed(path, RENAMED, renamed.templates)
    assert torch.allclose(renamed.class_embeddings, expected, atol=1e-5)
    assert not torch.allclose(renamed.class_embeddings, trained.class_embeddings, atol=1e-3)


def test_trained_head_predicts_its_classes_without_the_text_tower(siglip_checkpoint, tmp_path):  # noqa: F811
    _, path, *_ = siglip_checkpoint
    trained = make_head(path)
    with torch.no_grad():
        ref = trained(features())
    state = trained.state_dict()
    moved = tmp_path / "moved_away"  # the SigLIP directory is no longer where training saw it
    torch.manual_seed(5)
    head = CATSegHead(
        in_channels=32,
        num_classes=len(NAMES),
        text_checkpoint=moved,
        class_names=NAMES,
        in_keys=["blocks.0", "blocks.1"],
        templates="imagenet7",
        embed_dim=16,
        guidance_dim=8,
        num_heads=2,
    ).eval()
    head.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(head(features()), ref)
    with pytest.raises(
        CheckpointError, match=r"text tower.*task\.head\.text_checkpoint=.*open_vocab\.text_checkpoint"
    ):
        head.set_classes(RENAMED)


# -- 5: README's classes= strings, as a shell splits them, through Hydra --------------------------------
def _readme_predict_lines() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return [
        ln.strip()
        for ln in text.splitlines()
        if ln.startswith("python tools/predict.py") and "classes=" in ln
    ]


def test_readme_classes_strings_parse(hydra_cleanup):
    """Each README predict line, split as a POSIX shell does, composes (Hydra's override grammar)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from siglip_dense.openvocab.run import _classes
    from tests.conftest import CONFIG_DIR

    lines = _readme_predict_lines()
    assert len(lines) >= 2
    seen = []
    for line in lines:
        args = [a for a in shlex.split(line.split("python tools/predict.py", 1)[1]) if "=" in a]
        GlobalHydra.instance().clear()
        with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
            cfg = compose("predict", overrides=args)
        seen.append(_classes(cfg.classes))
    assert ["cat", "sofa", "window"] in seen
    assert ["sofa, couch", "window", "tv, television"] in seen  # a quoted list item keeps its synonyms
    assert any(any(not n.isascii() for n in names) for names in seen)


def test_eval_data_group_drops_the_null_member_placeholders(toy_data_root, tmp_path, hydra_cleanup):
    """``data=toy_seg`` on tools/eval.py: eval.yaml's all-null ``data.datamodules`` must not reach the
    single-task datamodule (any checkpoint kind: the chosen group is returned before the task is read)."""
    from hydra.utils import instantiate

    from siglip_dense.evaluate import eval_data_config
    from tests.conftest import compose_cfg

    cfg = compose_cfg(
        "eval", ["ckpt_path=x.ckpt", "data=toy_seg", f"data.root={toy_data_root}"], tmp_path / "r"
    )
    data = eval_data_config(cfg, task=None)
    assert "datamodules" not in data and data["root"] == str(toy_data_root)
    assert instantiate(data, _convert_="all").num_classes == 8  # SegDataModule takes every key


# -- 3 / 4 / 6: a trained CAT-Seg checkpoint -------------------------------------------------------
@pytest.fixture(scope="module")
def catseg_run(tmp_path_factory, toy_data_root) -> tuple[Path, Path, Path]:
    """(SigLIP 2 dir, run dir, toy data): train.py experiment=toy_openvocab, 2 steps."""
    tmp = tmp_path_factory.mktemp("catseg")
    _, clip, *_ = _save_checkpoint("siglip2", tmp / "clip")
    run = tmp / "run"
    _run_tool(
        str(REPO / "train.py"),
        "experiment=toy_openvocab",
        f"backbone.checkpoint={clip}",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=2",
        f"hydra.run.dir={run}",
        f"data.root={toy_data_root}",
        "data.num_workers=0",
        cwd=tmp,
    )
    return clip, run, toy_data_root


@pytest.mark.slow
def test_eval_trained_catseg_with_a_data_group(catseg_run, tmp_path):
    """tools/eval.py [zero_shot=true] ckpt_path=<CAT-Seg ckpt> data=toy_seg data.root=...: both
    reproduce the run's own validation mIoU (same data, same names)."""
    _, run, data = catseg_run
    trained = json.loads((run / "metrics.json").read_text())["mIoU"]
    for extra in (["zero_shot=true"], []):
        out = tmp_path / f"eval{len(extra)}"
        _run_tool(
            str(REPO / "tools/eval.py"),
            *extra,
            f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
            "data=toy_seg",
            f"data.root={data}",
            f"output_dir={out}",
            cwd=tmp_path,
        )
        assert json.loads((out / "metrics.json").read_text())["mIoU"] == pytest.approx(trained, abs=1e-6)


@pytest.mark.slow
def test_trained_catseg_new_classes_and_moved_text_tower(catseg_run, tmp_path):
    """load_model(ckpt).predict(images, classes=...) and tools/predict.py classes=...; with the SigLIP
    directory moved the training classes still predict, new names name the text tower option."""
    import siglip_dense
    import siglip_dense.openvocab as ov
    from siglip_dense.data.io import read_label

    clip, run, _ = catseg_run
    ckpt = run / "checkpoints" / "last.ckpt"
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    new = ["floor", "partition", "Banner"]
    own = np.asarray(siglip_dense.load_model(ckpt).predict(img))
    ref_new = np.asarray(siglip_dense.load_model(ckpt).predict(img, classes=new))
    assert ref_new.shape == (40, 56) and set(np.unique(ref_new)) <= {0, 1, 2}
    from PIL import Image

    Image.fromarray(img).save(tmp_path / "x.jpg")
    decoded = np.asarray(Image.open(tmp_path / "x.jpg").convert("RGB"))
    _run_tool(
        str(REPO / "tools/predict.py"),
        f"ckpt_path={ckpt}",
        f"input={tmp_path / 'x.jpg'}",
        f"output={tmp_path / 'out'}",
        f"classes=[{','.join(new)}]",
        cwd=tmp_path,
    )
    expected = np.asarray(siglip_dense.load_model(ckpt).predict(decoded, classes=new))
    assert np.array_equal(read_label(tmp_path / "out" / "x.jpg.png"), expected)  # project naming
    moved = clip.with_name("clip_moved")
    clip.rename(moved)
    try:
        assert np.array_equal(np.asarray(siglip_dense.load_model(ckpt).predict(img)), own)
        with pytest.raises(CheckpointError, match=r"text tower.*open_vocab\.text_checkpoint"):
            siglip_dense.load_model(ckpt).predict(img, classes=new)
        task = ov.load_model(ckpt, text_checkpoint=moved)
        assert np.array_equal(np.asarray(task.predict(img, classes=new)), ref_new)
    finally:
        moved.rename(clip)


def test_load_model_of_a_siglip_checkpoint_predicts_classes(siglip2_checkpoint):  # noqa: F811
    """siglip_dense.load_model(<SigLIP 2 dir>) is the training-free segmenter; same maps as openvocab's."""
    import siglip_dense
    from siglip_dense.openvocab import ZeroShotSegmenter

    _, path, *_ = siglip2_checkpoint
    img = np.random.default_rng(1).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    model = siglip_dense.load_model(path)
    assert isinstance(model, ZeroShotSegmenter)
    ref = ZeroShotSegmenter.from_checkpoint(path).predict([img], classes=["cat", "sofa"])[0]
    assert np.array_equal(model.predict([img], classes=["cat", "sofa"])[0], ref)
    with pytest.raises(ValueError, match="same text for this model"):
        model.predict([img], classes=["Cat", "cat"])


# -- 7: legend font, width; one-line class errors ------------------------------------------------------
def test_overlay_legend_fits_long_names_in_a_covering_font(tmp_path):
    """The legend is as wide as its longest name in the font used; that font has every glyph of the
    names (matplotlib's font list), or a warning says which characters it lacks."""
    import warnings

    from matplotlib import ft2font
    from PIL import Image

    from siglip_dense.visualize import legend_font, save_segmentation_overlay

    names = ["fenêtre", "a very long class name that does not fit one hundred and eighty pixels", "猫"]
    labels = np.repeat(np.arange(3), 20)[None].repeat(10, 0)
    font = legend_font(names[:2])
    assert {ord(c) for c in "".join(names[:2]) if c != " "} <= set(ft2font.FT2Font(font.path).get_charmap())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = save_segmentation_overlay(np.zeros((10, 60, 3), np.uint8), labels, names, tmp_path / "v.png")
        cjk = legend_font(["猫"])
    if "猫" in "".join(str(w.message) for w in caught):
        assert "LastResort" not in cjk.path  # placeholder boxes are not a font for the names
    else:
        assert ord("猫") in ft2font.FT2Font(cjk.path).get_charmap()
    width = Image.open(out).width - 60
    assert width >= 22 + legend_font(names).getlength(names[1]) > 180


def test_bad_classes_are_one_line_errors(siglip2_checkpoint, tmp_path):  # noqa: F811
    """tools/predict.py with duplicated names after SigLIP 2's lower-casing: status 1, one error line."""
    import os
    import subprocess
    import sys

    _, path, *_ = siglip2_checkpoint
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools/predict.py"), f"ckpt_path={path}", f"input={tmp_path}",
         f"output={tmp_path / 'o'}", "classes=[Cat,cat]"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "error: classes 'Cat' and 'cat' are the same text for this model" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_classes_for_a_closed_set_or_vision_only_checkpoint_are_refused(seg_ckpt, tmp_path):  # noqa: F811
    """A trained closed-set head and a vision-only SigLIP have no way to embed new names: clear errors."""
    import siglip_dense
    import siglip_dense.openvocab as ov
    from tests.conftest import save_siglip_vision

    img = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="closed-set"):
        siglip_dense.load_model(seg_ckpt).predict(img, classes=["cat", "sofa"])
    with pytest.raises(ValueError, match="closed-set"):
        ov.load_model(seg_ckpt)
    save_siglip_vision(tmp_path / "vision")
    with pytest.raises(CheckpointError, match=r"vision/config\.json.*vision-only model has no text tower"):
        siglip_dense.load_model(tmp_path / "vision")


def test_bad_open_vocab_options_are_data_errors():
    """Bad ``open_vocab`` values raise the error the CLI reports in one line (a DataError)."""
    from siglip_dense.cli import data_error_message
    from siglip_dense.openvocab.run import open_vocab_options

    for bad, match in (
        ({"method": "bogus"}, "open_vocab.method must be one of"),
        ({"templates": ["no placeholder"]}, r"open_vocab.templates: .*\{\}"),
        ({"colour": 1}, r"unknown keys \['colour'\]"),
    ):
        with pytest.raises(ValueError, match=match) as err:
            open_vocab_options(bad)
        assert data_error_message(err.value) == str(err.value)
