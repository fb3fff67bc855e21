"""The viewer library (client/viewer.py) as a developer at an integrator uses it: the snippets
of docs/client.md ("As a library") run as written against a real Archiver in production mode
(HTTPS under a site CA) with a viewer key on a real SoftHSM token; the public fetch is bound to
its request, so a stream saved from another request is refused (issue 24)."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from client.player import FileOutput, Player, archiver_pin_check
from client.session import ArchiverSession, GrantInfo, NotAuthorized, playback_request
from client.viewer import (
    VerifiedRange,
    fetch_range,
    load_certificate_file,
    login,
    open_identity,
    play_range,
)
from fusion_testkit.client_cli import Viewer, chunk, now_ms, put
from keyservice.errors import KeyServiceError, RequestMismatch
from keyservice.wire import ErrorCode
from tests.fixtures.server import ArchiverServer

from .proxy import TamperingProxy

ROOT = Path(__file__).parents[2]


def library_snippets() -> list[str]:
    """The python blocks of docs/client.md's "As a library" section, as written."""
    text = (ROOT / "docs" / "client.md").read_text()
    section = text.split("## As a library", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


@pytest.fixture
def client_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The pins (known_archivers) of this test only; run in a directory of its own."""
    home = tmp_path / "client-home"
    monkeypatch.setenv("FUSION_CLIENT_HOME", str(home))
    monkeypatch.delenv("FUSION_PIN", raising=False)
    monkeypatch.delenv("FUSION_TLS_CA", raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    yield home


def recorded(server: ArchiverServer, viewer: Viewer, camera: str, n: int = 3,
             ) -> tuple[int, int, bytes]:
    token = server.add_camera(camera)
    server.add_viewer(viewer.pem, [camera])
    t0 = now_ms()
    parts = [chunk(f"{camera}-{i}") for i in range(n)]
    put(server, camera, token, *parts)
    return t0, now_ms() + 1, b"".join(parts)


def test_the_documented_snippets_run_as_written(
        https_archiver: ArchiverServer, make_viewer: Callable[[str], Viewer],
        client_home: Path) -> None:
    alice = make_viewer("alice")
    from_ms, to_ms, video = recorded(https_archiver, alice, "lobby")
    assert https_archiver.tls_ca is not None
    shutil.copy(https_archiver.tls_ca, Path("site-ca.pem"))
    snippets = library_snippets()
    assert len(snippets) == 2, "docs/client.md's 'As a library' changed: update this test"

    one_call: dict[str, object] = {"url": https_archiver.url, "token_uri": alice.uri,
                                   "from_ms": from_ms, "to_ms": to_ms}
    exec(compile(snippets[0], "docs/client.md (As a library, 1)", "exec"), one_call)
    clip = one_call["clip"]
    assert isinstance(clip, VerifiedRange)
    assert Path("clip.ts").read_bytes() == video and clip.path == Path("clip.ts")
    assert clip.segments == 3 and clip.complete and clip.gaps == ()
    assert len(clip.signer.fingerprint) == 64 and "CN=" in clip.signer.subject
    assert (client_home / "known_archivers").exists()  # trusted on first use, pinned

    session_use = dict(one_call)  # the second snippet follows on from the first
    exec(compile(snippets[1], "docs/client.md (As a library, 2)", "exec"), session_use)
    first = session_use["first"]
    assert isinstance(first, VerifiedRange) and first.data == video
    assert first.signer.fingerprint == clip.signer.fingerprint


def test_a_stream_saved_from_another_request_is_refused_by_the_public_path(
        https_archiver: ArchiverServer, make_viewer: Callable[[str], Viewer],
        client_home: Path, tmp_path: Path) -> None:
    """The issue's attack on the library: a relay answers a new request with a stream the
    viewer saved from an earlier one. The old documented snippet (a Player without request=)
    accepted it; the public fetch refuses it, and so does any Player (it needs the request)."""
    alice = make_viewer("alice")
    assert https_archiver.tls_ca is not None
    t0, t1, video = recorded(https_archiver, alice, "lobby")
    saved: list[bytes] = []
    with ArchiverSession(https_archiver.url, tls_ca=https_archiver.tls_ca) as session, \
            open_identity(alice.uri) as identity:
        me = login(session, identity)
        first = play_range(session, identity, me, "lobby", t0, t1, on_chunk=saved.append)
        assert first.data == video
        archiver_fp = me.archiver_fingerprint
        archiver_cert = me.result.archiver_certificate
    stream = b"".join(saved)

    out = tmp_path / "replayed.ts"
    with TamperingProxy(https_archiver.url, verify=https_archiver.verify) as relay:
        relay.mode, relay.saved = "replay", stream
        with pytest.raises(RequestMismatch, match="does not answer the request just sent"):
            fetch_range(relay.url, alice.uri, "lobby", t0, t1, output=out,
                        archiver_cert=archiver_cert)
        # ... with the header rewritten to name the new request: the END signature breaks.
        relay.rewrite = True
        with pytest.raises(KeyServiceError) as rewritten:
            fetch_range(relay.url, alice.uri, "lobby", t0, t1, output=out,
                        archiver_cert=archiver_cert)
        assert rewritten.value.exit_code != 0
        assert relay.replayed == 2
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(out.name)) == []

    # The request-less Player of the old snippet cannot be built any more, nor a fetch made
    # without the request it must answer.
    with pytest.raises(TypeError):
        Player(None, archiver_pin_check(archiver_fp), FileOutput(tmp_path / "x.ts"))  # type: ignore[arg-type,call-arg]
    with ArchiverSession(https_archiver.url, tls_ca=https_archiver.tls_ca) as session, \
            pytest.raises(TypeError):
        session.recording("lobby", t0, t1)  # type: ignore[call-arg]
    # A request for one thing cannot carry the nonce bound to another.
    with ArchiverSession(https_archiver.url, tls_ca=https_archiver.tls_ca) as session, \
            pytest.raises(KeyServiceError, match="does not describe this fetch"):
        with session.recording("lobby", t0, t1, playback_request("other", t0, t1)):
            pass


def test_refusals_keep_the_wire_code_and_the_http_status(
        https_archiver: ArchiverServer, make_viewer: Callable[[str], Viewer],
        client_home: Path) -> None:
    alice = make_viewer("alice")
    recorded(https_archiver, alice, "lobby")
    https_archiver.add_camera("vault")
    with pytest.raises(NotAuthorized) as refused:
        fetch_range(https_archiver.url, alice.uri, "vault", 0, now_ms(),
                    tls_ca=https_archiver.tls_ca)
    assert refused.value.wire_code == ErrorCode.NOT_AUTHORIZED.value
    assert refused.value.http_status == 403
    assert refused.value.exit_code == 45


def test_grants_come_back_typed(https_archiver: ArchiverServer,
                                make_viewer: Callable[[str], Viewer], client_home: Path) -> None:
    from client.viewer import make_grant_for, recipient_for

    alice, bob = make_viewer("alice"), make_viewer("bob")
    t0, t1, _ = recorded(https_archiver, alice, "lobby")
    https_archiver.add_viewer(bob.pem, [])
    with ArchiverSession(https_archiver.url, tls_ca=https_archiver.tls_ca) as session, \
            open_identity(alice.uri) as identity:
        me = login(session, identity)
        made = make_grant_for(session, identity, me, "lobby", t0, t1,
                              recipient_for(load_certificate_file(bob.pem)), note="case 7")
        listed = session.grants()
    assert isinstance(made.grant, GrantInfo) and made.grant.state == "pending"
    assert made.verified.segments == 3 and made.keys >= 1
    assert [g.grant_id for g in listed] == [made.grant.grant_id]
    assert listed[0].note == "case 7" and listed[0].grantor == me.viewer_fingerprint
