"""The one refusal type of the Archiver's services: a wire error code and one sentence.

Services know nothing of HTTP; archiver/deps.py maps each code to its HTTP status in one table
(``http_status``), and the app's exception handler answers it as ``{"error", "message"}``.
"""

from __future__ import annotations

from typing import Any

from keyservice.errors import RequestRefused
from keyservice.wire import ErrorCode


class Refused(RequestRefused):
    """A request a service refuses: ``code`` (the wire error code), ``message`` (one actionable
    sentence), ``body`` (more members of the JSON answer, e.g. a signed expiry statement) and
    ``audit`` (details for the refusal's audit line; never a secret)."""

    def __init__(self, code: ErrorCode, message: str, *, body: dict[str, Any] | None = None,
                 **audit: object) -> None:
        super().__init__(message)
        self.code = code
        self.wire_code = code.value
        self.message = message
        self.body = body or {}
        self.audit = audit
