"""Access grants on the viewer's side (fusion-client grant, grants list, grants play).

``grant``: play the range with your own token (every segment verified as by ``play``, nothing
written), take exactly the minute keys of its segments (each checked against the Archiver's
signed key commitment), wrap them to the grantee's certificate (keyservice/grants.py) and hand
the opaque grant to the Archiver, where it waits for an admin's approval.
``grants play``: the grantee fetches its approved grant, opens it on its token and plays the
range (or a part of it) as a normal fusion stream whose keys come from the grant.

The work is the viewer library's (client.viewer: make_grant_for, open_grant); this module owns
options and messages. client.cli registers these commands.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from client.options import (
    DEFAULT_URL,
    ArchiverCertOpt,
    ArchiverOpt,
    JsonOpt,
    SiteCaOpt,
    TlsCaOpt,
    TokenOpt,
)
from keyservice.errors import UsageError
from keyservice.text import printable

if TYPE_CHECKING:
    from client.session import ArchiverSession
    from client.viewer import OpenedGrantRange
    from keyservice.identity import Identity
    from keyservice.reader import StreamRequest

# The commands import the viewer library (httpx, cryptography, the token layer) when they run,
# not when the CLI is built: `fusion-client --help` loads none of it (issue 23).

__all__ = ["grant", "grants_app", "grants_list", "grants_play", "register"]

GRANT_ID = re.compile(r"^[0-9a-f]{32}$")


grants_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                         help="Access grants you made or received: list, play.")


def check_grant_id(grant_id: str) -> str:
    """A grant id, normalized (lower case); UsageError if it is not 32 hex digits."""
    grant_id = grant_id.strip().lower()
    if not GRANT_ID.match(grant_id):
        raise UsageError(f"{grant_id!r} is not a grant id (32 hex digits, from 'grants list').")
    return grant_id


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
    site_ca: SiteCaOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Grant a recorded range you can play to another viewer certificate. The Archiver serves
    it to the grantee only after an admin approved it; it never sees a key."""
    from client.playback import logged_in, say
    from client.viewer import check_camera, load_certificate_file, make_grant_for, now_ms, recipient_for
    from keyservice.timespec import parse_range

    from_ms, to_ms = parse_range(from_, to, now_ms())
    check_camera(camera)
    grantee = load_certificate_file(to_cert)
    # Checked before the Archiver and the token are bothered.
    recipient = recipient_for(grantee, key_scheme)
    with logged_in(archiver, token, archiver_cert, tls_ca, site_ca) as (session, identity, login):
        # Played exactly as `play` would (every check of the reader), written nowhere: the keys
        # granted are those of the segments the verified stream of this range released.
        made = make_grant_for(session, identity, login, camera, from_ms, to_ms, recipient,
                              note=note)
    if as_json:
        typer.echo(json.dumps(made.grant.to_json()))
        return
    grant_id = made.grant.grant_id
    say(f"verified {made.verified.segments} segment(s) of camera {camera}; wrapped their "
        f"{made.keys} minute key(s) to {printable(grantee.subject.rfc4514_string())}")
    typer.echo(f"grant {grant_id}: {made.grant.state}; an admin must approve it "
               f"('fusion-archiver grants approve {grant_id}')")


@grants_app.command("list")
def grants_list(
    archiver: ArchiverOpt = DEFAULT_URL,
    token: TokenOpt = ...,  # type: ignore[assignment]
    archiver_cert: ArchiverCertOpt = None,
    tls_ca: TlsCaOpt = None,
    site_ca: SiteCaOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The grants you made or received, with their state."""
    from client.playback import logged_in

    with logged_in(archiver, token, archiver_cert, tls_ca, site_ca) as (session, _identity,
                                                                         login):
        rows = session.grants()
        me = login.viewer_fingerprint
    if as_json:
        typer.echo(json.dumps({"grants": [r.to_json() for r in rows]}))
        return
    if not rows:
        typer.echo("no grants")
    for r in rows:
        role = "to you from " + r.grantor[:16] if r.grantee == me else \
            "by you to " + r.grantee[:16]
        typer.echo(printable(f"{r.grant_id}  {r.state:<8}  {r.camera}  "
                             f"{_when(r.from_ms)} .. {_when(r.to_ms)}  {r.keys} keys  "
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
    site_ca: SiteCaOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No summary.")] = False,
) -> None:
    """Play a range granted to you (approved by an admin), with your own token."""
    from client.playback import say, stream_command
    from client.session import playback_request
    from client.viewer import now_ms, open_grant
    from keyservice.timespec import parse_time

    grant_id = check_grant_id(grant_id)
    now = now_ms()
    asked_from = parse_time(from_, now) if from_ is not None else None
    asked_to = parse_time(to, now) if to is not None else None
    granted: list[OpenedGrantRange] = []

    def open_keys(session: ArchiverSession, identity: Identity) -> Mapping[bytes, bytes]:
        opened = open_grant(session, identity, grant_id, from_ms=asked_from, to_ms=asked_to)
        granted.append(opened)
        if not quiet:
            say(f"grant {grant_id} opened on your token (1 token operation): camera "
                f"{opened.camera}, {len(opened.keys)} minute key(s) for "
                f"{_when(opened.granted_from_ms)} .. {_when(opened.granted_to_ms)}")
        return opened.keys

    def request() -> StreamRequest:
        return playback_request(granted[0].camera, granted[0].from_ms, granted[0].to_ms)

    stream_command(url=archiver, token=token, output_target=output, archiver_cert=archiver_cert,
                   tls_ca=tls_ca, site_ca=site_ca, save_stream=None, quiet=quiet, live=False,
                   progress_range=None,
                   make_request=request, grant_id=grant_id, known_keys=open_keys)


def register(app: typer.Typer) -> None:
    """Add ``grant`` and ``grants list|play`` to the fusion-client app."""
    app.command("grant")(grant)
    app.add_typer(grants_app, name="grants")
