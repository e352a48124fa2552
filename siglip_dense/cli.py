"""``key=value`` arguments for the small tools, the same syntax as the Hydra ones."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def parse_key_values(
    argv: Sequence[str], required: Sequence[str], optional: dict[str, str] | None = None
) -> dict[str, str]:
    """Parse ``k=v`` pairs; unknown or missing keys exit with a usage message (code 2)."""
    known = {*required, *(optional or {})}
    args = dict(optional or {})
    usage = (
        "usage: " + " ".join(f"{k}=..." for k in required) + "".join(f" [{k}=...]" for k in optional or {})
    )
    for item in argv:
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            sys.exit(f"unexpected argument {item!r}\n{usage}")
        args[key] = value
    missing = [k for k in required if k not in args]
    if missing:
        sys.exit(f"missing {', '.join(missing)}\n{usage}")
    return args
