"""Text from configs and run directories made safe to show: the one sanitiser.

Configs and run directories get shared, so a name, a path or a message may hold characters a
terminal acts on instead of showing (ESC sequences that clear the screen, retitle the window or
write the clipboard). `printable` writes them as escapes. `console` applies it to everything it
prints; `rundir.files` to the command line it records in config.yaml and sweep.yaml.
"""

from __future__ import annotations

import re
import unicodedata

# What a terminal may act on instead of showing: C0/C1 controls (ESC starts the sequences that
# clear the screen, retitle the window or write the clipboard), format characters (bidi
# overrides), line and paragraph separators, and lone surrogates (undecodable file names).
_UNSAFE = frozenset(("Cc", "Cf", "Zl", "Zp", "Cs"))
# What follows a backslash that must be doubled to stay a backslash when read back.
_ESCAPE_NEXT = re.compile(r"\\|x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}")


def _escaped(c: str) -> str:
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def printable(text: str, *, allow: str = "") -> str:
    """`text` with every character a terminal could act on written as an escape (`\\x1b`,
    `\\u2028`); the characters in `allow` (a newline, for messages) are kept.

    Readable back unambiguously: a backslash is doubled only where it would otherwise read as
    the start of such an escape (or as `\\\\`), so ordinary text and most Windows paths show as
    they are.
    """
    if text.isprintable() and "\\" not in text:
        return text  # the common case, at C speed
    out = []
    for i, c in enumerate(text):
        if c == "\\":
            nxt = text[i + 1 : i + 10]
            doubled = nxt and (_ESCAPE_NEXT.match(nxt) or _unsafe(nxt[0], allow))
            out.append("\\\\" if doubled else c)
        elif _unsafe(c, allow):
            out.append(_escaped(c))
        else:
            out.append(c)
    return "".join(out)


def _unsafe(c: str, allow: str) -> bool:
    return c not in allow and unicodedata.category(c) in _UNSAFE


__all__ = ["printable"]
