"""The token's PKCS#11 module loaded in a thread while a stream command imports the rest
(issue 23, start-up).

``fusion-client play`` spends most of its start importing libraries, which holds the GIL.
Loading a PKCS#11 module is dlopen and ``C_Initialize``, which python-pkcs11 calls without the
GIL: SoftHSM reads its configuration and token directory there, a smart card's middleware
talks to its reader. Started first thing, that work (and finding the token in the module)
runs beside the imports.

Nothing here reads a PIN or logs in: the token is opened, and its PIN used once, where it
always was (after the command's own checks); this only leaves the module loaded, which
keyservice.token keeps one of per path and takes from there. A failure here is dropped: the
open meets it again at its usual place and reports it as it always did.
"""

from __future__ import annotations

import contextlib
import importlib
import threading

__all__ = ["import_in_background", "preload_token_module"]


def preload_token_module(uri: str) -> threading.Thread:
    """Start loading the module the token URI ``uri`` names; the thread is returned (joining
    it is never needed: the open waits for the module's lock)."""
    # A daemon: a command that fails before it opens the token does not wait for a module
    # (a card reader's middleware can be slow) to exit.
    thread = threading.Thread(target=_load, args=(uri,), name="fusion-pkcs11-preload",
                              daemon=True)
    thread.start()
    return thread


def _load(uri: str) -> None:
    # Any failure (a malformed URI, a missing module, no token) is the open's to report, in
    # the main thread, at its usual place and with its usual exit code.
    with contextlib.suppress(Exception):
        from keyservice.token import token_kind

        # Loads the module (kept for the open) and finds the token in it, without logging in.
        token_kind(uri)


def import_in_background(name: str) -> threading.Thread:
    """Import the module ``name`` in a daemon thread: started where the main thread is about
    to wait for the Archiver (the login), the import runs in that wait instead of after it.
    Whoever imports it meanwhile waits for this import (the module's own lock); a failure
    here is dropped and met again, and reported, by that import."""
    thread = threading.Thread(target=_import, args=(name,), name="fusion-import", daemon=True)
    thread.start()
    return thread


def _import(name: str) -> None:
    with contextlib.suppress(Exception):
        importlib.import_module(name)
