"""``python -m siglip_dense.benchmark <subcommand> ...`` (same as ``tools/benchmark.py``)."""

import sys

from siglip_dense.benchmark.cli import main

sys.exit(main())
