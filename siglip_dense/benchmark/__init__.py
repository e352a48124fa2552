"""Benchmarks against the peers, one module per benchmark; run them through ``tools/benchmark.py``.

- :mod:`~siglip_dense.benchmark.backbone` — our backbone vs plain timm vs transformers;
- :mod:`~siglip_dense.benchmark.data` — augmentation pipelines vs ``torchvision.transforms.v2``;
- :mod:`~siglip_dense.benchmark.eval` — COCO evaluators, sliding-window inference, mIoU update;
- :mod:`~siglip_dense.benchmark.train_step` — one training step per task and variant;
- :mod:`~siglip_dense.benchmark.timing` — round-robin timing (``torch.utils.benchmark.Timer``);
- :mod:`~siglip_dense.benchmark.cli` — the ``backbone | data | eval | train-step`` command line.

See ``docs/benchmarks.md`` for the commands and the latest figures.
"""
