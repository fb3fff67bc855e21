"""The Archiver: encrypts camera streams at ingest and serves per-viewer fusion streams.

From Python (docs/embedding.md): ``create_services(settings)`` opens an Archiver's services
without HTTP, ``create_app(settings)`` serves them, ``AdminClient`` drives a running one's admin
API. Imported on first use, so ``import archiver.x`` stays light.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

# httpx imports its own command line (httpx._main: click, rich, pygments; about 60 ms, more than
# httpx itself) whenever those are installed, and they are: typer and the progress bar use them.
# Neither the viewer nor the Archiver's clients run httpx's command line, so that import is
# refused here, once, for the process (httpx then falls back to its stub ``httpx.main``).
# setdefault: a process that imported httpx's CLI already keeps it (issue 23).
sys.modules.setdefault("httpx._main", None)  # type: ignore[assignment]

__all__ = ["AdminClient", "ArchiverServices", "Refused", "Settings", "create_app",
           "create_services"]

_WHERE = {"AdminClient": "archiver.admin_client", "ArchiverServices": "archiver.services.container",
          "Refused": "archiver.services.refused", "Settings": "archiver.settings",
          "create_app": "archiver.app", "create_services": "archiver.services.container"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'archiver' has no attribute {name!r}")
