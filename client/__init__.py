"""The viewer: logs in to an Archiver by proof of possession of its token, receives fusion
streams, opens epoch openers on the token, verifies and decrypts locally.

Depends on keyservice, never on archiver. The library is ``client.viewer`` (with
``client.session``, ``client.player``, ``client.pinning``, ``client.timespec``): it does not
print, prompt unless asked, or exit. ``client.cli`` (with ``client.playback``, ``client.grants``,
``client.evidence``, ``client.options``) is the thin command line; ``client.web`` the local page.

Its main names are importable from here::

    from client import fetch_range
    clip = fetch_range(url, token_uri, "lobby", from_ms, to_ms, tls_ca=Path("site-ca.pem"))

They are imported on first use (issue 23): ``fusion-client --help`` and any ``import client.x``
do not pay for httpx, cryptography and the token layer until something needs them.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what the names below are, for type checkers and pdoc's signatures
    from client import evidence_zip, pinning, player, session, timespec, viewer
    from client.session import ArchiverSession
    from client.viewer import (
        EvidenceExport,
        GrantMade,
        Login,
        OpenedGrantRange,
        Signer,
        VerifiedRange,
        export_evidence,
        fetch_range,
        live,
        login,
        make_grant_for,
        open_grant,
        open_identity,
        play_grant,
        play_range,
    )

# httpx imports its own command line (httpx._main: click, rich, pygments; about 60 ms, more than
# httpx itself) whenever those are installed, and they are: typer and the progress bar use them.
# Neither the viewer nor the Archiver's clients run httpx's command line, so that import is
# refused here, once, for the process (httpx then falls back to its stub ``httpx.main``).
# setdefault: a process that imported httpx's CLI already keeps it (issue 23).
sys.modules.setdefault("httpx._main", None)  # type: ignore[assignment]

# The library's names, and its modules (the command line's are client.cli and those it lists).
__all__ = ["ArchiverSession", "EvidenceExport", "GrantMade", "Login", "OpenedGrantRange",
           "Signer", "VerifiedRange", "evidence_zip", "export_evidence", "fetch_range", "live",
           "login", "make_grant_for", "open_grant", "open_identity", "pinning", "play_grant",
           "play_range", "player", "session", "timespec", "viewer"]

_MODULES = frozenset({"evidence_zip", "pinning", "player", "session", "timespec", "viewer"})
_WHERE = {"ArchiverSession": "client.session", **{
    name: "client.viewer" for name in __all__ if name not in _MODULES and name != "ArchiverSession"}}


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return importlib.import_module(f"client.{name}")
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value  # once: the next lookup is a plain attribute
        return value
    raise AttributeError(f"module 'client' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
