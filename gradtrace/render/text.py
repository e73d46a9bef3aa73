"""Text from a trace file is untrusted: make it safe to print to a terminal.

A crafted trace can name a pass ``"\\x1b]0;owned\\x07"`` or a cut location
``"model.py\\u202e"``: printed verbatim, the first drives the viewer's terminal,
the second reorders what they read. ``safe`` replaces every such character with
a visible escape, so the report shows exactly what the file holds.
"""
from __future__ import annotations

import re
import unicodedata

# Characters a terminal may act on instead of showing: controls (C0, DEL, C1: ESC
# starts ANSI sequences, U+009B is a one-byte CSI), format characters (bidi overrides
# and isolates, zero-width joiners, the BOM), line and paragraph separators, and lone
# surrogates (JSON can spell them; printing one raises UnicodeEncodeError).
_UNSAFE = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
# Printable ASCII is always safe: only the rest is looked up.
_CANDIDATES = {True: re.compile(r"[^\n\x20-\x7e]"), False: re.compile(r"[^\x20-\x7e]")}


def safe(text: str, newlines: bool = True) -> str:
    """``text`` with control, bidi and other invisible characters escaped (``\\x1b``, ``\\u202e``).

    Printable text in any script passes unchanged, and so does a newline unless
    ``newlines=False`` (a table cell or a one-line error message must not start
    a new line). Applying it twice changes nothing more.
    """
    return _CANDIDATES[newlines].sub(_escape, text)


def _escape(match: "re.Match[str]") -> str:
    char = match.group()
    if unicodedata.category(char) not in _UNSAFE:
        return char
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"
