"""Issue 20 fixes: tokenizer files required, CAT-Seg class embeddings follow the head's names (stored
training embeddings: no text tower needed for them), trained CAT-Seg checkpoints in eval / predict /
load_model with new classes, README class-list strings through Hydra, output names."""

from __future__ import annotations

import shlex
import shutil

import pytest
import torch
import torch.nn.functional as F

from siglip_dense.models.heads.catseg import CATSegHead
from siglip_dense.models.text import build_text_encoder
from siglip_dense.models.weights import CheckpointError
from tests.conftest import REPO
from tests.test_openvocab import _run_tool, _save_checkpoint, siglip2_checkpoint, siglip_checkpoint  # noqa: F401 - module fixtures
from tests.test_openvocab_catseg import NAMES, features, make_head

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
    assert "class_embeddings" not in state  # not a weight: init_from must not carry old names' embeddings
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
    assert any(any(not n.isascii() for n in names) for names in seen)
