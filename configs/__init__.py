"""Hydra configs, installed as the package ``siglip_dense.configs`` (see setup.py).

Hydra reads a ``pkg://`` config package only when it holds an ``__init__.py``: this file. No code.
"""
