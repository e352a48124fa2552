"""The CAT-Seg-style head: class embeddings from the text tower, equivariance to the order and number of
classes (what lets it segment unseen label sets), the segmentation task building it with the data's names."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from siglip_dense.models.heads.catseg import CATSegHead
from tests.conftest import PEER_TOL, REPO, max_abs_diff
from tests.helpers.peer_rules import catseg_class_embeddings
from tests.test_openvocab import siglip_checkpoint  # noqa: F401 - module fixture
from tests.test_text import reference_features

NAMES = ["wall", "floor", "sky", "ball", "box"]


def make_head(path, names=NAMES, keys=("blocks.0", "blocks.1")) -> CATSegHead:
    torch.manual_seed(0)
    return CATSegHead(
        in_channels=32,
        num_classes=len(names),
        text_checkpoint=path,
        class_names=names,
        in_keys=list(keys),
        templates="imagenet7",
        embed_dim=16,
        guidance_dim=8,
        num_heads=2,
    ).eval()


def features(b: int = 2) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {"blocks.0": torch.randn(b, 32, 4, 5), "blocks.1": torch.randn(b, 32, 4, 5)}


def test_class_embeddings_are_the_text_towers(siglip_checkpoint):  # noqa: F811
    kind, path, model, tok = siglip_checkpoint
    head = make_head(path)
    temps = head.templates
    for i, name in enumerate(NAMES):
        ref = F.normalize(reference_features(model, tok, [t.format(name) for t in temps]), dim=-1)
        assert max_abs_diff(head.class_embeddings[i], ref) <= PEER_TOL
    assert (
        json.loads(bytes(head.state_dict()["class_names_utf8"].tolist())) == NAMES
    )  # stored with embeddings
    assert not any("text_model" in k for k in head.state_dict())  # the frozen tower is not saved


def test_synonym_names_are_embedded_as_catseg(siglip_checkpoint):  # noqa: F811
    """Training names and names switched to later (set_classes) with ", "-separated synonyms: each
    synonym in each template, averaged per template (CAT-Seg's class_embeddings)."""
    _, path, model, tok = siglip_checkpoint
    train = ["wall", "building, edifice", "floor, flooring", "Sofa_Bed"]
    head = make_head(path, names=train)

    def reference(names: list[str]) -> torch.Tensor:
        return catseg_class_embeddings(
            names, head.templates, lambda texts: reference_features(model, tok, texts)
        )

    assert max_abs_diff(head.class_embeddings, reference(train)) <= PEER_TOL
    other = ["tree", "car, auto, automobile, machine, motorcar", "sky"]
    head.set_classes(other)
    assert max_abs_diff(head.current_embeddings, reference(other)) <= PEER_TOL
    with torch.no_grad():
        assert head(features()).shape[1] == len(other)


def test_equivariant_to_class_order_and_count(siglip_checkpoint):  # noqa: F811
    _, path, *_ = siglip_checkpoint
    head = make_head(path)
    feats = features()
    with torch.no_grad():
        logits = head(feats)
        assert logits.shape == (2, 5, 8, 10)  # one 2x upsampling stage per guidance map (blocks.0)
    perm = [3, 0, 4, 1, 2]
    head.set_classes([NAMES[i] for i in perm])
    with torch.no_grad():
        permuted = head(feats)
    assert max_abs_diff(permuted, logits[:, perm]) <= 1e-5
    head.set_classes(["ring", "flag", "wall"])  # unseen names, another count
    with torch.no_grad():
        assert head(feats).shape == (2, 3, 8, 10)


@pytest.mark.slow
def test_toy_openvocab_train_then_eval_other_names(toy_data_root, tmp_path, hydra_cleanup):
    """train.py experiment=toy_openvocab on the toy names; tools/eval.py zero_shot=true on the trained
    checkpoint reproduces the run's own validation with the same names, and runs with renamed classes."""
    from tests.test_openvocab import _run_tool, _save_checkpoint

    _, clip, *_ = _save_checkpoint("siglip", tmp_path / "clip")
    run = tmp_path / "run"
    common = [f"data.root={toy_data_root}", "data.num_workers=0"]
    _run_tool(
        str(REPO / "train.py"),
        "experiment=toy_openvocab",
        f"backbone.checkpoint={clip}",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=3",
        f"hydra.run.dir={run}",
        *common,
        cwd=tmp_path,
    )
    trained = json.loads((run / "metrics.json").read_text())
    ckpt = run / "checkpoints" / "last.ckpt"

    def evaluate(*overrides: str) -> dict:  # tools/eval.py's function, in process (the CLI is tested above)
        from siglip_dense.openvocab.run import run_zero_shot_eval
        from tests.conftest import compose_cfg

        out = tmp_path / f"eval{len(overrides)}"
        cfg = compose_cfg(
            "eval", ["zero_shot=true", f"ckpt_path={ckpt}", f"output_dir={out}", *common, *overrides], out
        )
        run_zero_shot_eval(cfg)
        return json.loads((out / "metrics.json").read_text())

    assert evaluate()["mIoU"] == pytest.approx(trained["mIoU"], abs=1e-6)
    renamed = ["partition", "ground", "heavens", "sphere", "crate", "pylon", "hoop", "banner"]
    other = evaluate(f"open_vocab.classes=[{','.join(renamed)}]")
    assert list(other["per_class_IoU"]) == renamed and 0.0 <= other["mIoU"] <= 1.0


# the training set; the eval-only benchmark configs (CAT-Seg's prepared layouts) are composed in
# tests/test_openvocab_benchmarks.py
BENCHMARK_DATA = {"openvocab_cocostuff171": 171}


@pytest.mark.parametrize("data", sorted(BENCHMARK_DATA))
def test_benchmark_recipes_compose(data, tmp_path, hydra_cleanup):
    """The COCO-Stuff training command and the zero-shot eval configs compose and pass the key check,
    with each benchmark's number of distinct class names."""
    from siglip_dense.config_check import check_train_config
    from tests.conftest import compose_cfg, compose_train_cfg

    train = compose_train_cfg(
        [
            "~experiment",  # no toy recipe underneath: the groups chosen here only
            "task=seg_catseg_openvocab",
            "backbone=b16",
            "neck=none",
            f"data={data}",
            "data.root=/x",
            "backbone.checkpoint=/c",
        ],
        tmp_path / "run",
    )
    check_train_config(train)
    assert train.task.head.text_checkpoint == "/c"
    names = list(train.data.classes)
    assert len(names) == len(set(names)) == BENCHMARK_DATA[data]
    ev = compose_cfg(
        "eval", ["zero_shot=true", "ckpt_path=/c", f"data={data}", "data.root=/x"], tmp_path / "ev"
    )
    assert ev.zero_shot and len(ev.data.classes) == BENCHMARK_DATA[data]
