"""Rules for free text that ends up in the record."""

from __future__ import annotations

_ALLOWED_CONTROLS = frozenset("\n\r\t")


def reject_control_characters(value: str) -> str:
    """NUL and other C0 controls never belong in clinical text (and PostgreSQL refuses NUL)."""
    if any(ord(ch) < 32 and ch not in _ALLOWED_CONTROLS for ch in value):
        raise ValueError("control characters are not allowed")
    return value
