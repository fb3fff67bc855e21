"""Text for terminals: whatever a certificate, token, server or file supplied is printed with
its control characters escaped, so it cannot move the cursor, rewrite the screen, change the
window title or fake a line of output (ANSI/OSC escapes, CR, backspace, U+2028, bidi overrides).
"""

from __future__ import annotations

import unicodedata

# Cc: C0/C1 controls and DEL; Cf: format characters (bidi overrides, zero-width joiners);
# Zl/Zp: U+2028/U+2029; Cs/Co/Cn: surrogates, private use, unassigned.
_UNSAFE = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})


def printable(text: str, *, newlines: bool = False) -> str:
    """``text`` with every unsafe character as an escape (``\\x1b``, ``\\u2028``); with
    ``newlines``, "\\n" and "\\t" are kept (for messages whose line breaks are our own)."""
    out = []
    for ch in text:
        if newlines and ch in "\n\t":
            out.append(ch)
        elif unicodedata.category(ch) in _UNSAFE:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100
                       else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
        else:
            out.append(ch)
    return "".join(out)
