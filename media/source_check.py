"""How the relay's modules check that aiortc and aioice methods still do what they rely on
(media/internals.py collects the checks): by lines of their source."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any


def missing_lines(
    where: str, methods: Iterable[Callable[..., Any]], lines: Iterable[str]
) -> list[str]:
    """A problem for each of `lines` found in none of `methods`' source."""
    source = "".join(inspect.getsource(method) for method in methods)
    return [f"missing in {where}: {line}" for line in lines if line not in source]
