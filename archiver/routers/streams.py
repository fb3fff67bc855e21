"""What the routers that serve fusion streams share: the media type, the request's nonce
parameter, the bounds of a range, and a streaming response that drops a viewer who stops
reading."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from typing import Annotated

import anyio
from fastapi import Query
from fastapi.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

log = logging.getLogger("archiver")
MEDIA_TYPE = "application/vnd.fusion-stream"
MAX_MS = 2**63 - 1  # SQLite integers are signed 64-bit: larger bounds were a 500
# The viewer's fresh random request nonce (16 bytes, hex): the stream's header repeats it under
# the Archiver's END signature, so a stream cannot be replayed as the answer to another request.
NonceQuery = Annotated[str, Query(pattern=r"^[0-9a-f]{32}$",
                                  description="16 random bytes, hex, fresh for every request")]
TimeQuery = Annotated[int, Query(ge=0, le=MAX_MS)]
STREAM_RESPONSES: dict[int | str, dict[str, object]] = {
    200: {"content": {MEDIA_TYPE: {}}, "description": "A fusion stream"}}


class ViewerStream(StreamingResponse):
    """A fusion stream whose every chunk must be taken by the viewer within send_timeout_s.
    Otherwise the response ends (without an end record, which the viewer reports as a
    truncation) and its task, generator and open archive files are released."""

    def __init__(self, content: AsyncIterator[bytes] | Iterator[bytes],
                 send_timeout_s: float) -> None:
        super().__init__(content, media_type=MEDIA_TYPE)
        self._send_timeout_s = send_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def bounded_send(message: Message) -> None:
            with anyio.fail_after(self._send_timeout_s):
                await send(message)

        try:
            await super().__call__(scope, receive, bounded_send)
        except TimeoutError:
            log.warning("dropped a viewer that stopped reading its fusion stream")
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                await close()
