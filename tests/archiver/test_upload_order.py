"""A camera's slow earlier upload must not hold back its later ones (issue 19, left open): an
upload whose body is complete waits a bounded time for earlier uploads still arriving, then
is archived; the overtaken upload is refused (409 upload_overtaken) and counted, never
archived after a later segment. Against a real Archiver over HTTPS, with a raw slow client."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from pathlib import Path

import httpx

from tests.fixtures.camera import make_source, requires_ffmpeg
from tests.fixtures.server import ArchiverServer

pytestmark = [requires_ffmpeg]
TRICKLE_BUDGET_S = 40  # under the Archiver's --upload-timeout (60 s): bounds a hang only


def _response(sock: ssl.SSLSocket) -> bytes:
    sock.settimeout(60)
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_a_slow_earlier_upload_does_not_hold_back_the_next(https_archiver: ArchiverServer,
                                                           tmp_path: Path) -> None:
    server = https_archiver
    token = server.add_camera("cam1")
    segment = make_source(tmp_path / "seg.ts", 2).read_bytes()
    context = ssl.create_default_context(cafile=str(server.tls_ca))
    raw = socket.create_connection(("127.0.0.1", server.port))
    slow = context.wrap_socket(raw, server_hostname="127.0.0.1")
    try:
        # Headers first, with Expect: the 100 Continue says the route is reading this body,
        # so this upload was numbered before the next one starts.
        slow.sendall(f"PUT /ingest/cam1/slow.ts HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     f"Authorization: Bearer {token}\r\nContent-Type: video/mp2t\r\n"
                     f"Content-Length: {len(segment)}\r\nExpect: 100-continue\r\n\r\n".encode())
        slow.settimeout(30)
        assert slow.recv(4096).startswith(b"HTTP/1.1 100"), "no 100 Continue"
        normal_done = threading.Event()
        trickled = {"bytes": 0, "stopped_by_budget": False}

        def trickle() -> None:
            started = time.monotonic()
            while not normal_done.is_set():
                if time.monotonic() - started > TRICKLE_BUDGET_S:
                    trickled["stopped_by_budget"] = True
                    break
                if trickled["bytes"] < len(segment) - 1:
                    slow.sendall(segment[trickled["bytes"]:trickled["bytes"] + 1])
                    trickled["bytes"] += 1
                normal_done.wait(0.3)

        trickler = threading.Thread(target=trickle, daemon=True)
        trickler.start()
        response = httpx.put(f"{server.url}/ingest/cam1/next.ts", content=segment, timeout=120,
                             headers={"Authorization": f"Bearer {token}"}, verify=server.verify)
        normal_done.set()
        trickler.join(10)
        # Archived while the earlier upload was still trickling, not once it ended.
        assert response.status_code == 201, response.text
        assert not trickled["stopped_by_budget"], "the later upload waited for the slow one"
        assert response.headers["X-Fusion-Segment-Seq"] == "0"
        # The rest of the slow body arrives: refused, never archived after segment 0.
        slow.sendall(segment[trickled["bytes"]:])
        answer = _response(slow)
    finally:
        slow.close()
    assert answer.startswith(b"HTTP/1.1 409") and b"upload_overtaken" in answer, answer[:400]
    camera = next(c for c in server.admin("GET", "/v1/admin/cameras", expect=200)
                  if c["name"] == "cam1")
    assert camera["refused"] == 1 and camera["segments"] == 1, camera
    # And the camera goes on: the next upload is archived after segment 0.
    after = httpx.put(f"{server.url}/ingest/cam1/after.ts", content=segment, timeout=60,
                      headers={"Authorization": f"Bearer {token}"}, verify=server.verify)
    assert after.status_code == 201 and after.headers["X-Fusion-Segment-Seq"] == "1"
    assert "Traceback" not in server.log()
