"""Access grants on the viewer's side (fusion-client grant, grants list, grants play).

``grant``: play the range with your own token (every segment verified as by ``play``, nothing
written), take exactly the minute keys of its segments (each checked against the Archiver's
signed key commitment), wrap them to the grantee's certificate (keyservice/grants.py) and hand
the opaque grant to the Archiver, where it waits for an admin's approval.
``grants play``: the grantee fetches its approved grant, opens it on its token and plays the
range (or a part of it) as a normal fusion stream whose keys come from the grant.

The CLI helpers are imported when a command runs: client.cli registers these commands.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import re
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from client.options import (
    DEFAULT_URL,
    ArchiverCertOpt,
    ArchiverOpt,
    JsonOpt,
    TlsCaOpt,
    TokenOpt,
)
from client.playback import say
from keyservice.errors import FormatError, UsageError
from keyservice.text import printable

_GRANT_ID = re.compile(r"^[0-9a-f]{32}$")


grants_app = typer.Typer(no_args_is_help=True,
                         help="Access grants you made or received: list, play.")


class _Discard:
    """The grantor's output: the range is verified, not written."""

    def write(self, data: bytes) -> None:
        pass

    def commit(self) -> None:
        return None

    def abort(self) -> None:
        return None


def _check_grant_id(grant_id: str) -> str:
    grant_id = grant_id.strip().lower()
    if not _GRANT_ID.match(grant_id):
        raise UsageError(f"{grant_id!r} is not a grant id (32 hex digits, from 'grants list').")
    return grant_id


@contextmanager
def _logged_in(url: str, token: str, archiver_cert: Path | None,
               tls_ca: Path | None) -> Iterator[tuple[Any, Any, Any]]:
    from client import cli
    from client.session import ArchiverSession
    explicit = cli._load_cert(archiver_cert)
    with ExitStack() as stack:
        session = stack.enter_context(ArchiverSession(url, tls_ca=tls_ca))
        identity = cli._open_identity(stack, token)
        login = cli._login(session, identity, url, explicit)
        yield session, identity, login


def _when(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="seconds")


# --- commands -----------------------------------------------------------------------------
def grant(
    camera: Annotated[str, typer.Option("--camera", help="Camera name.")],
    from_: Annotated[str, typer.Option("--from", help="Start: ISO 8601, relative (-2h) or "
                                       "'now'.")],
    to: Annotated[str, typer.Option("--to", help="End, same forms as --from.")],
    to_cert: Annotated[Path, typer.Option(
        "--to-cert", help="The grantee's certificate (PEM): an enrolled viewer of this Archiver "
                          "(it needs no camera).")],
    note: Annotated[str | None, typer.Option(
        "--note", help="Why (case number...), shown to the approving admin.")] = None,
    key_scheme: Annotated[str | None, typer.Option(
        "--key-scheme", help="rsa-oaep-sha256|rsa-oaep-sha1 (old spellings sha256|sha1 and "
        "--oaep-hash still work): only for an RSA grantee certificate without the enrolment "
        "extension.")] = None,
    archiver: ArchiverOpt = DEFAULT_URL,
    token: TokenOpt = ...,  # type: ignore[assignment]
    archiver_cert: ArchiverCertOpt = None,
    tls_ca: TlsCaOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Grant a recorded range you can play to another viewer certificate. The Archiver serves
    it to the grantee only after an admin approved it; it never sees a key."""
    from client import cli
    from client.player import Player, archiver_pin_check
    from client.session import playback_request
    from keyservice.certs import validate_viewer_certificate
    from keyservice.grants import MAX_GRANT_KEYS, GrantKey, decode_grant, make_grant
    from keyservice.keyscheme import KeyScheme, Recipient
    from keyservice.timespec import parse_range

    from_ms, to_ms = parse_range(from_, to, cli._now_ms())
    cli._check_camera(camera)
    grantee = cli._load_cert(to_cert)
    kind = validate_viewer_certificate(
        grantee, now=dt.datetime.now(dt.UTC), trust_decision=False,
        oaep_hash=KeyScheme.from_label(key_scheme) if key_scheme else None)
    recipient = Recipient(grantee, kind)
    with _logged_in(archiver, token, archiver_cert, tls_ca) as (session, identity, login):
        # Played exactly as `play` would (every check of the reader), written nowhere: the keys
        # granted are those of the segments the verified stream of this range released.
        request = playback_request(camera, from_ms, to_ms)
        player = Player(identity, archiver_pin_check(login.archiver_fingerprint), _Discard(),
                        request=request)
        with session.recording(camera, from_ms, to_ms, request) as chunks:
            summary = player.run(chunks)
        keys = [GrantKey(k.stream, k.key_id, k.key) for k in player.verified_keys.values()]
        if not keys:
            raise UsageError("Nothing to grant: the range holds no segment you can decrypt.")
        if len(keys) > MAX_GRANT_KEYS:
            raise UsageError(f"The range spans {len(keys)} minute keys; a grant carries at most "
                             f"{MAX_GRANT_KEYS}. Split it into several grants.")
        blob = make_grant(recipient, camera, from_ms, to_ms, keys, cli._now_ms())
        grant_id = decode_grant(blob).grant_id.hex()
        answer = session.create_grant(blob, note)
    if as_json:
        typer.echo(json.dumps(answer))
        return
    state = answer.get("state", "?") if isinstance(answer, dict) else "?"
    say(f"verified {summary.segments} segment(s) of camera {camera}; wrapped their "
             f"{len(keys)} minute key(s) to {printable(grantee.subject.rfc4514_string())}")
    typer.echo(f"grant {grant_id}: {state}; an admin must approve it "
               f"('fusion-archiver grants approve {grant_id}')")


@grants_app.command("list")
def grants_list(
    archiver: ArchiverOpt = DEFAULT_URL,
    token: TokenOpt = ...,  # type: ignore[assignment]
    archiver_cert: ArchiverCertOpt = None,
    tls_ca: TlsCaOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The grants you made or received, with their state."""
    with _logged_in(archiver, token, archiver_cert, tls_ca) as (session, _identity, login):
        rows = session.grants()
        me = login.viewer_fingerprint
    if as_json:
        typer.echo(json.dumps({"grants": rows}))
        return
    if not rows:
        typer.echo("no grants")
    for r in rows:
        role = "to you from " + r["grantor"][:16] if r["grantee"] == me else \
            "by you to " + r["grantee"][:16]
        typer.echo(printable(f"{r['grant_id']}  {r['state']:<8}  {r['camera']}  "
                             f"{_when(r['from_ms'])} .. {_when(r['to_ms'])}  {r['keys']} keys  "
                             f"{role}"))


@grants_app.command("play")
def grants_play(
    grant_id: Annotated[str, typer.Argument(help="The grant's id (grants list).")],
    output: Annotated[str, typer.Option("--output", "-o", help="Output MPEG-TS file, or '-'.")],
    from_: Annotated[str | None, typer.Option(
        "--from", help="Start (default: the grant's); must lie in the granted range.")] = None,
    to: Annotated[str | None, typer.Option(
        "--to", help="End (default: the grant's); must lie in the granted range.")] = None,
    archiver: ArchiverOpt = DEFAULT_URL,
    token: TokenOpt = ...,  # type: ignore[assignment]
    archiver_cert: ArchiverCertOpt = None,
    tls_ca: TlsCaOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No summary.")] = False,
) -> None:
    """Play a range granted to you (approved by an admin), with your own token."""
    from client import cli
    from client.session import playback_request
    from keyservice.grants import open_grant
    from keyservice.timespec import parse_time

    grant_id = _check_grant_id(grant_id)
    now = cli._now_ms()
    asked_from = parse_time(from_, now) if from_ is not None else None
    asked_to = parse_time(to, now) if to is not None else None
    granted: dict[str, Any] = {}

    def open_keys(session: Any, identity: Any) -> Mapping[bytes, bytes]:
        body = session.grant(grant_id)
        try:
            blob = base64.b64decode(body["grant"], validate=True)
        except (binascii.Error, ValueError):
            raise FormatError("The grant the Archiver sent is not base64.") from None
        opened = open_grant(identity, blob)  # one token operation; IntegrityError if altered
        if opened.grant_id.hex() != grant_id:
            raise FormatError("The Archiver sent another grant than the one asked for.")
        start = opened.from_ms if asked_from is None else asked_from
        end = opened.to_ms if asked_to is None else asked_to
        if end < start:
            raise UsageError("The range ends before it starts.")
        if start < opened.from_ms or end > opened.to_ms:
            from client.session import OutsideGrant
            raise OutsideGrant(f"Grant {grant_id} covers camera {opened.camera} from "
                               f"{_when(opened.from_ms)} to {_when(opened.to_ms)} only.")
        granted.update(camera=opened.camera, from_ms=start, to_ms=end)
        if not quiet:
            say(f"grant {grant_id} opened on your token (1 token operation): camera "
                     f"{opened.camera}, {len(opened.keys)} minute key(s) for "
                     f"{_when(opened.from_ms)} .. {_when(opened.to_ms)}")
        return opened.keys

    def request() -> Any:
        return playback_request(granted["camera"], granted["from_ms"], granted["to_ms"])

    def fetch(session: Any, asked: Any) -> Any:
        return session.grant_recording(grant_id, asked)

    cli._stream_command(url=archiver, token=token, output_target=output,
                        archiver_cert=archiver_cert, tls_ca=tls_ca, save_stream=None,
                        quiet=quiet, live=False, progress_range=None, make_request=request,
                        request=fetch, known_keys=open_keys)


def register(app: typer.Typer) -> None:
    app.command("grant")(grant)
    app.add_typer(grants_app, name="grants")
