"""Rules for free text that ends up in the record.

What is refused is what cannot be shown faithfully or can make one text look like another: a
name that reads right-to-left from the middle, a chat line that seems to start a new line, an
invisible character that makes two names differ. Ordinary text in any script, emoji (with their
joiners and variation selectors) and, in multi-line fields, line breaks and tabs stay."""

from __future__ import annotations

import unicodedata

# Invisible format characters that can spoof what a reader sees (besides the controls below).
_REFUSED_FORMAT = frozenset(
    [
        "\u061c",  # ARABIC LETTER MARK
        "\u200b",  # ZERO WIDTH SPACE
        "\u200e",  # LEFT-TO-RIGHT MARK
        "\u200f",  # RIGHT-TO-LEFT MARK
        *map(chr, range(0x202A, 0x202F)),  # bidi embeddings and overrides
        *map(chr, range(0x2060, 0x2065)),  # WORD JOINER and the invisible operators
        *map(chr, range(0x2066, 0x206A)),  # bidi isolates
        *map(chr, range(0x206A, 0x2070)),  # deprecated format characters
        "\ufeff",  # ZERO WIDTH NO-BREAK SPACE (a byte order mark)
        *map(chr, range(0xFFF9, 0xFFFC)),  # interlinear annotation
    ]
)
_LINE_BREAKS = frozenset("\n\r")
_MULTI_LINE_CONTROLS = frozenset("\n\r\t")

REFUSED_SUMMARY = (
    "C0 and C1 control characters and DEL (U+0000-U+001F, U+007F-U+009F; multi-line text keeps "
    "tab, LF and CR), U+2028 and U+2029, lone surrogates, and invisible format characters: "
    "U+061C, U+200B, U+200E, U+200F, U+202A-U+202E, U+2060-U+2064, U+2066-U+206F, U+FEFF, "
    "U+FFF9-U+FFFB"
)


def reject_control_characters(value: str) -> str:
    """Multi-line text (a reason, a summary, an opinion, a chat line): see REFUSED_SUMMARY."""
    for ch in value:
        if ch not in _MULTI_LINE_CONTROLS and _refused(ch):
            raise ValueError(_message(ch))
    return value


def reject_control_characters_or_line_breaks(value: str) -> str:
    """One-line text (a name, an institution, a device label): no line break or tab either,
    so it cannot seem to end and start another line of the record."""
    for ch in value:
        if _refused(ch) or ch in _LINE_BREAKS or ch == "\t":
            raise ValueError(_message(ch))
    return value


def _refused(ch: str) -> bool:
    code = ord(ch)
    return (
        code < 0x20
        or 0x7F <= code <= 0x9F
        or code in (0x2028, 0x2029)
        or 0xD800 <= code <= 0xDFFF
        or ch in _REFUSED_FORMAT
    )


def _message(ch: str) -> str:
    code = f"U+{ord(ch):04X}"
    name = unicodedata.name(ch, "")
    shown = f"{code} ({name})" if name else code
    return f"{shown} is not allowed: control characters and invisible format characters are refused"
