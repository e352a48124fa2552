"""Package layout that ``pyproject.toml`` cannot express: ``configs/`` shipped as ``siglip_dense.configs``.

Metadata lives in ``pyproject.toml``. Here: the ``siglip_dense`` packages found as usual, plus the
top-level ``configs/`` folder installed as the package ``siglip_dense.configs`` (every ``*.yaml``), so a
non-editable install has the Hydra configs the console scripts read via ``pkg://siglip_dense.configs``.
"""

from setuptools import find_namespace_packages, find_packages, setup

# the config groups too (configs/backbone -> siglip_dense.configs.backbone, ...), so setuptools does not
# warn about importable folders installed as data
CONFIG_PACKAGES = [
    "siglip_dense.configs",
    *(f"siglip_dense.configs.{name}" for name in find_namespace_packages(where="configs")),
]

setup(
    packages=[*find_packages(include=["siglip_dense", "siglip_dense.*"]), *CONFIG_PACKAGES],
    package_dir={"siglip_dense.configs": "configs"},
    package_data={
        **{name: ["*.yaml"] for name in CONFIG_PACKAGES},
        "siglip_dense.openvocab": ["classnames/*.json", "classnames/README.md"],
    },
)
