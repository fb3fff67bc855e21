"""Fusion stream encryption: wire format, crypto core, PKCS#11 token layer.

The public modules: ``keyservice.format`` (the wire format), ``keyservice.reader`` (verifying
and decrypting a fusion stream), ``keyservice.token`` (keys on PKCS#11 tokens),
``keyservice.identity`` and ``keyservice.certs`` (viewers' keys and certificates),
``keyservice.grants`` and ``keyservice.evidence`` (access grants, evidence packages),
``keyservice.errors`` (every error a user may see: ``KeyServiceError``) and
``keyservice.exits`` (an error's sentence and exit code). None of them imports a CLI
framework; ``keyservice.cli`` and ``keyservice.cli_support`` are the command line's.
"""

from typing import Any

from keyservice.errors import KeyServiceError as KeyServiceError


def __getattr__(name: str) -> Any:
    # The public surface: KeyServiceError and every public submodule but the command line's
    # (computed, so that a module added or renamed is in the API reference at once). Listed
    # on first use, not at import: every command imports this package, few ask for its
    # surface (the directory listing and pkgutil cost each command's start, issue 23).
    if name == "__all__":
        import pkgutil

        surface = ["KeyServiceError", *sorted(
            m.name for m in pkgutil.iter_modules(__path__)
            if not m.name.startswith("_") and m.name not in ("cli", "cli_support"))]
        globals()["__all__"] = surface
        return surface
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
