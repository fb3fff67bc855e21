"""Resource limits before authentication (issue 12, finding 3 and 6), against a real Archiver:
big and slow bodies, slow headers, login and viewer-query limits, and refused accesses audited
without filling the disk. No figure here is a speed assertion: the time bounds only stop a
test from hanging when a limit is missing."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from archiver.audit import AuditLog, verify_audit_log
from archiver.limits import RefusalAudit
from tests.fixtures.server import ArchiverServer
from tests.fixtures.viewer import login
from tests.hardening.conftest import memory_kib

MiB = 2**20


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., ArchiverServer]]:
    servers: list[ArchiverServer] = []

    def start(*args: str) -> ArchiverServer:
        server = ArchiverServer(tmp_path / f"archiver{len(servers)}", extra_args=args).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
        log = server.log()
        assert "Traceback" not in log and "unexpected error" not in log, log[-3000:]


def _response(sock: socket.socket, limit_s: float = 30) -> bytes:
    """What the server sent until it closed the connection (or a complete JSON answer)."""
    sock.settimeout(limit_s)
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep and b"content-length" in head.lower():
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                if len(body) >= length:
                    break
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def _status(data: bytes) -> int:
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0


def test_big_bodies_are_refused_before_they_are_read_and_memory_stays_bounded(
        serve: Callable[..., ArchiverServer]) -> None:
    """The finding: one anonymous POST grew the Archiver from 79 MB to 1.6 GB (JSON bodies were
    read whole before any size check or authentication)."""
    server = serve()
    pid = server.process.pid
    rss_before, peak_before = memory_kib(pid)

    # 1. A declared length over the limit: 413 on the headers, not a byte of the body read.
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/sessions/challenge HTTP/1.1\r\nHost: a\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 1600000000\r\n\r\n"
                     + b"x" * 65536)
        answer = _response(sock)
    assert _status(answer) == 413 and b"too_large" in answer, answer[:300]

    # 2. No length (chunked): the body is cut once it passes the limit; the client, still
    #    sending, finds the connection closed long before its 64 MiB are out.
    sent = 0
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/sessions/challenge HTTP/1.1\r\nHost: a\r\n"
                     b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"100000\r\n" + b"A" * MiB + b"\r\n"
        try:
            while sent < 64 * MiB:
                sock.sendall(chunk)
                sent += MiB
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = _response(sock)
    assert _status(answer) == 413, answer[:300]
    assert sent < 64 * MiB  # cut off, not read to the end

    # 3. A 20 MB JSON document with an honest length, as any HTTP client sends it, on an
    #    anonymous and on an admin route: 413 (it was parsed whole, then 422).
    for path in ("/v1/sessions/challenge", "/v1/admin/viewers"):
        response = httpx.post(f"{server.url}{path}", timeout=60, content=b'{"certificate": "'
                              + b"A" * 20_000_000 + b'", "cameras": "all"}',
                              headers={"Content-Type": "application/json",
                                       "Authorization": f"Bearer {server.admin_token}"})
        assert (response.status_code, response.json()["error"]) == (413, "too_large")

    rss_after, peak_after = memory_kib(pid)
    print(f"Archiver RSS before {rss_before // 1024} MiB (peak {peak_before // 1024} MiB), after "
          f"{rss_after // 1024} MiB (peak {peak_after // 1024} MiB); 1.6 GB declared, "
          f"{sent // MiB} MiB sent chunked, 2 x 20 MB JSON")
    # Bounded: far less than any one of the bodies (the 20 MB document alone, parsed, took
    # hundreds of MB before).
    assert peak_after - peak_before < 16 * 1024, (peak_before, peak_after)
    assert httpx.get(f"{server.url}/healthz").status_code == 200
    # A body within the limit still works, of course.
    assert httpx.post(f"{server.url}/v1/sessions/challenge",
                      json={"certificate": "x"}).status_code == 422


def test_slow_bodies_time_out(serve: Callable[..., ArchiverServer]) -> None:
    """A JSON body trickling in (a byte every 0.3 s) is answered 408 at --body-timeout,
    before it reaches any route: anonymous and admin routes alike."""
    server = serve("--body-timeout", "2")
    for path, auth in (("/v1/sessions/challenge", b""),
                       ("/v1/admin/cameras", f"Authorization: Bearer {server.admin_token}\r\n"
                        .encode())):
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: a\r\n" + auth
                         + b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n")
            answer = b""
            started = time.monotonic()
            while time.monotonic() - started < 30 and not answer:  # bounds a hang only
                try:
                    sock.sendall(b" ")
                except OSError:
                    break
                sock.settimeout(0.3)
                try:
                    answer = sock.recv(4096)
                except TimeoutError:
                    continue
            answer += _response(sock)
        assert _status(answer) == 408 and b"body_timeout" in answer, (path, answer[:300])
    assert not [c for c in server.admin("GET", "/v1/admin/cameras", expect=200)]


def _closed_by_server(sock: socket.socket, trickle: bytes | None, limit_s: float = 30) -> bool:
    """Send ``trickle`` a byte every 0.3 s (or nothing); True once the server closes."""
    started = time.monotonic()
    position = 0
    sock.settimeout(0.3)
    while time.monotonic() - started < limit_s:  # bounds a hang only
        if trickle is not None:
            try:
                sock.sendall(trickle[position % len(trickle):position % len(trickle) + 1])
            except OSError:
                return True
            position += 1
        try:
            if sock.recv(4096) == b"":
                return True
        except TimeoutError:
            continue
        except ConnectionResetError:
            return True
    return False


def test_slow_and_missing_headers_are_cut(serve: Callable[..., ArchiverServer]) -> None:
    """uvicorn has no header timeout (a connection trickling its headers stayed open for 30 s
    and more); with --header-timeout the protocol closes it, on the first request of a
    connection and on a later one (keep-alive), and an idle connection too."""
    server = serve("--header-timeout", "2")
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: a\r\n")
        assert _closed_by_server(sock, b"X-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n")
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        assert _closed_by_server(sock, None)
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
        sock.settimeout(10)
        assert _status(sock.recv(4096)) == 200
        assert _closed_by_server(sock, b"GET /healthz HTTP/1.1\r\nHost: a\r\nX: aaaaaaaaaa")
    # Answered early (403 before the body was read), then the rest of the body trickles in
    # for nobody: closed as well.
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"PUT /ingest/nocam/x.ts HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer x"
                     b"\r\nContent-Length: 1000000\r\n\r\nabc")
        sock.settimeout(10)
        assert _status(sock.recv(4096)) == 403
        assert _closed_by_server(sock, b"b")
    # A normal client is not affected.
    assert httpx.get(f"{server.url}/healthz").status_code == 200


def test_login_rate_and_viewer_concurrency_limits(serve: Callable[..., ArchiverServer],
                                                  make_viewer) -> None:
    server = serve("--login-rate", "1", "--viewer-streams", "2")
    alice, bob = make_viewer("alice"), make_viewer("bob")
    server.add_camera("cam1")
    server.add_viewer(alice.pem, ["cam1"])
    server.add_viewer(bob.pem, ["cam1"])
    alice_session, bob_session = login(server.url, alice.identity), login(server.url, bob.identity)

    # Logins: a burst passes, a flood from one address is answered 429 with Retry-After.
    statuses = []
    with httpx.Client() as client:
        for _ in range(80):
            response = client.post(f"{server.url}/v1/sessions/challenge",
                                   json={"certificate": "x"})
            statuses.append(response.status_code)
            if response.status_code == 429:
                assert int(response.headers["retry-after"]) >= 1
                assert response.json()["error"] == "too_many_requests"
    assert 422 in statuses and 429 in statuses, statuses

    # Viewer streams: two open live streams are alice's limit (--viewer-streams); a third is
    # refused, while bob is not affected. (Requests still being searched have their own limit,
    # --viewer-concurrency: hardening/test_query_flood.py.)
    def live(session: str) -> httpx.Response:
        return httpx.get(f"{server.url}/v1/cameras/cam1/live",
                         params={"duration_s": 4, "nonce": os.urandom(16).hex()},
                         headers={"Authorization": f"Bearer {session}"}, timeout=30)

    open_streams: list[httpx.Response] = []
    ready = threading.Barrier(3)

    def hold() -> None:
        with httpx.stream("GET", f"{server.url}/v1/cameras/cam1/live",
                          params={"duration_s": 4, "nonce": os.urandom(16).hex()}, timeout=30,
                          headers={"Authorization": f"Bearer {alice_session}"}) as response:
            open_streams.append(response)
            ready.wait()
            for _ in response.iter_bytes():
                pass

    holders = [threading.Thread(target=hold) for _ in range(2)]
    for thread in holders:
        thread.start()
    ready.wait(timeout=20)
    assert [r.status_code for r in open_streams] == [200, 200]
    third = live(alice_session)
    assert (third.status_code, third.json()["error"]) == (429, "too_many_requests")
    assert "streams open" in third.json()["message"]
    bob_stream = httpx.get(f"{server.url}/v1/cameras", timeout=30,
                           headers={"Authorization": f"Bearer {bob_session}"})
    assert bob_stream.status_code == 200
    for thread in holders:
        thread.join()
    # Once they ended, alice may open streams again.
    assert httpx.get(f"{server.url}/v1/cameras", timeout=30,
                     headers={"Authorization": f"Bearer {alice_session}"}).status_code == 200


def test_refused_accesses_are_audited_with_aggregation(serve: Callable[..., ArchiverServer]
                                                       ) -> None:
    """Every refusal is counted, but a flood of them writes a bounded number of audit lines:
    the first of each kind per address per window at once, one summary when the window ends.
    (Each bad proof wrote one fsynced line: ~6 GB a day.)"""
    server = serve("--login-rate", "100000", "--refusal-window", "3")
    audit = server.data_dir / "audit.jsonl"
    lines_before = len(audit.read_bytes().splitlines())
    bad_proof = {"challenge_id": "00" * 16, "proof": "AAAA"}
    with httpx.Client() as client:
        for _ in range(300):
            assert client.post(f"{server.url}/v1/sessions", json=bad_proof).status_code == 401
        for _ in range(50):
            response = client.get(f"{server.url}/v1/admin/cameras",
                                  headers={"Authorization": "Bearer wrong"})
            assert response.status_code == 403
    first = [entry for line in audit.read_bytes().splitlines()[lines_before:]
             if (entry := json.loads(line))["action"] == "access.refused"]
    assert {(e["action"], e["error"]) for e in first} == {
        ("access.refused", "proof_refused"), ("access.refused", "forbidden")}
    assert first[0]["source"] == "127.0.0.1" and first[0]["path"] == "/v1/sessions"
    # Every window ends with one summary line per address (when it saw more than its first
    # lines); wait for the last one.
    time.sleep(3.5)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # bounds a hang only
        entries = [json.loads(line) for line in audit.read_bytes().splitlines()[lines_before:]]
        if entries[-1]["action"] == "access.refused.summary":
            break
        time.sleep(0.5)
    # Accounting: every refusal is counted exactly once, in its window's summary (or, in a
    # window without one, as one of its first lines).
    windows: dict[int, list[dict]] = {}
    summaries: dict[int, dict] = {}
    for entry in entries:
        if entry["action"] == "access.refused":
            windows.setdefault(entry["window_start_ms"], []).append(entry)
        else:
            assert entry["action"] == "access.refused.summary", entry
            summaries[entry["window_start_ms"]] = entry
    counted = sum(summaries[w]["count"] if w in summaries else len(firsts)
                  for w, firsts in windows.items())
    assert counted == 350
    assert sum(s["errors"].get("proof_refused", 0) for s in summaries.values()) <= 300
    # ... with at most 3 lines (2 first lines + 1 summary) per window, not 350.
    assert len(entries) <= 3 * len(windows), entries
    print(f"350 refused requests in {len(windows)} window(s): {len(entries)} audit lines")
    assert verify_audit_log(audit) is None


def test_refusals_from_many_addresses_write_a_bounded_number_of_lines(tmp_path: Path) -> None:
    """An attacker with many addresses (an IPv6 prefix) gets no more lines per window than
    the caps: first lines are capped, sources beyond the cap count under "other"."""
    now = [1_000_000]
    audit = AuditLog(tmp_path / "audit.jsonl")
    refusals = RefusalAudit(audit, lambda: now[0], window_s=60, max_sources=50,
                            max_first_lines=20)
    for window in range(3):
        for source in range(5000):
            for code in ("proof_refused", "forbidden"):
                refusals.refused(f"2001:db8::{window}:{source}", 401, code)
        now[0] += 61_000
    refusals.flush()
    audit.close()
    entries = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert len(entries) <= 3 * (20 + 50 + 1)
    summaries = [e for e in entries if e["action"] == "access.refused.summary"]
    assert sum(e["count"] for e in summaries) + sum(
        1 for e in entries if e["action"] == "access.refused") >= 3 * 10_000 - 3 * 20
    assert {e["source"] for e in summaries if e["count"] > 1000} == {"other"}
    assert verify_audit_log(tmp_path / "audit.jsonl") is None
