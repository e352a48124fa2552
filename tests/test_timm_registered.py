"""timm's own model tests on every architecture siglip_dense registers in timm.

The test functions are timm's (tests/third_party/timm_test_models.py, vendored verbatim); these are
the ones timm itself runs on a ``vit_*`` name (its NON_STD filter: no default_cfgs/forward_features
std checks, but the non-std cfg check and forward_intermediates with the features_only wrapper).
"""

from __future__ import annotations

import fnmatch

import pytest
import timm

from siglip_dense.models import backbone
from tests.third_party import timm_test_models as timm_tests

OURS = sorted(backbone.default_cfgs)
TIMM_TESTS = [
    ("test_model_forward", 1),
    ("test_model_backward", 2),
    ("test_model_default_cfgs_non_std", 1),
    ("test_model_forward_intermediates_features", 1),
    ("test_model_forward_intermediates", 1),
    ("test_model_forward_torchscript", 1),
    ("test_model_forward_fx", 1),
]


def test_every_registered_model_has_a_pretrained_cfg() -> None:
    registered = set(timm.list_models(module="backbone")) & set(timm.list_models("*siglip*"))
    assert OURS and registered <= set(OURS)
    for name in OURS:
        cfg = timm.get_pretrained_cfg(name).to_dict()
        for key in ("first_conv", "classifier", "fixed_input_size", "input_size", "mean", "std", "crop_pct"):
            assert cfg.get(key) is not None, (name, key)


@pytest.mark.parametrize("model_name", OURS)
@pytest.mark.parametrize(("test_name", "batch_size"), TIMM_TESTS, ids=[t for t, _ in TIMM_TESTS])
def test_timm_model_tests(model_name: str, test_name: str, batch_size: int) -> None:
    # the same selection timm makes: our names are vit_* (non-standard spatial API)
    assert any(fnmatch.fnmatch(model_name, f) for f in timm_tests.NON_STD_FILTERS)
    getattr(timm_tests, test_name)(model_name, batch_size)
