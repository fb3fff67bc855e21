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
    from client.across import grant_across
    from client.pinning import KnownArchivers
    from client.playback import logged_in, say
    from client.site import Site, trust_followed
    from client.viewer import (
        check_camera,
        load_certificate_file,
        load_site_ca,
        now_ms,
        recipient_for,
    )
    from keyservice.timespec import parse_range

    from_ms, to_ms = parse_range(from_, to, now_ms())
    check_camera(camera)
    grantee = load_certificate_file(to_cert)
    # Checked before the Archiver and the token are bothered.
    recipient = recipient_for(grantee, key_scheme)
    cas = load_site_ca(site_ca) if site_ca is not None else ()
    with logged_in(archiver, token, archiver_cert, tls_ca, site_ca) as (session, identity,
                                                                         login), \
            Site(session, login, identity,
                 check=trust_followed(KnownArchivers.default(), cas)) as site:
        # On the Archiver that recorded the range, one grant per Archiver for a range across a
        # change of Archiver (reached as a redirect is, checked: client/site.py). Each part is
        # played exactly as `play` would (every check of the reader), written nowhere: the keys
        # granted are those of the segments that part's verified stream released.
        made = grant_across(site, identity, camera, from_ms, to_ms, recipient, note=note)
    if as_json:
        if len(made) == 1:
            typer.echo(json.dumps(made[0].made.grant.to_json()))
        else:
            typer.echo(json.dumps({"grants": [
                {**g.made.grant.to_json(), "archiver": g.part.archiver} for g in made]}))
        return
    for g in made:
        where = f" (recorded by Archiver {g.part.archiver})" if len(made) > 1 else ""
        say(f"verified {g.made.verified.segments} segment(s) of camera {camera}{where}; wrapped "
            f"their {g.made.keys} minute key(s) to "
            f"{printable(grantee.subject.rfc4514_string())}")
    for g in made:
        grant_id = g.made.grant.grant_id
        typer.echo(f"grant {grant_id}: {g.made.grant.state}; an admin must approve it "
                   f"('fusion-archiver grants approve {grant_id}')")
    if len(made) > 1:
        ids = " ".join(g.made.grant.grant_id for g in made)
        typer.echo(f"the range was recorded by {len(made)} Archivers: one grant each; the "
                   f"grantee plays them as one range with 'fusion-client grants play {ids}'")


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
    grant_ids: Annotated[list[str], typer.Argument(
        help="The grant's id (grants list); for a range across Archivers, the id of each "
             "part's grant (as 'grant' printed them), played as one range.")],
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

    ids = [check_grant_id(g) for g in grant_ids]
    now = now_ms()
    asked_from = parse_time(from_, now) if from_ is not None else None
    asked_to = parse_time(to, now) if to is not None else None
    if len(ids) > 1:
        _play_across(ids, output, asked_from, asked_to, archiver, token, archiver_cert, tls_ca,
                     site_ca, quiet)
        return
    grant_id = ids[0]
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


def _play_across(ids: list[str], output: str, asked_from: int | None, asked_to: int | None,
                 archiver: str, token: str, archiver_cert: Path | None, tls_ca: Path | None,
                 site_ca: Path | None, quiet: bool) -> None:
    """The grants of one range across Archivers (one per part), played as one range: each
    part at the Archiver that recorded it, verified against its signer, the switch at the
    signed edges."""
    from client.across import open_grants, play_grants
    from client.pinning import KnownArchivers
    from client.playback import logged_in, open_output, say, switch_line
    from client.site import Site, Switch, trust_followed
    from client.viewer import load_site_ca
    from keyservice.timespec import format_ms

    if len(set(ids)) != len(ids):
        raise UsageError("A grant id is given twice.")
    target = open_output(output)
    cas = load_site_ca(site_ca) if site_ca is not None else ()
    try:
        with logged_in(archiver, token, archiver_cert, tls_ca, site_ca) as (
                session, identity, login), \
                Site(session, login, identity,
                     check=trust_followed(KnownArchivers.default(), cas)) as site:
            opened = open_grants(site, identity, ids, from_ms=asked_from, to_ms=asked_to)
            if not quiet:
                say(f"{len(ids)} grants opened on your token ({len(ids)} token operations): "
                    f"camera {opened[0].opened.camera if opened else '?'}")
            played = play_grants(site, identity, opened, target)
    except BaseException:
        kept = target.abort()
        if kept is not None:
            say(f"the verified video of the parts played so far is in {kept}")
        raise
    final = target.commit()
    if quiet:
        return
    for i, (item, verified) in enumerate(played, 1):
        say(f"part {i} of {len(played)}: grant {item.opened.grant_id}, "
            f"{format_ms(item.opened.from_ms)} .. {format_ms(item.opened.to_ms)} recorded by "
            f"Archiver {item.part.archiver}, verified against {verified.signer.subject}: "
            f"{verified.segments} segment(s)")
        if i < len(played):
            nxt_item, nxt = played[i]
            say(switch_line(Switch(item.part.archiver, nxt_item.part.archiver,
                                   verified.last_ms, nxt.first_ms)))
    say("complete (every part's signed end record verified)"
        + (f"; video in {final}" if final is not None else "; video written to stdout"))


def register(app: typer.Typer) -> None:
    """Add ``grant`` and ``grants list|play`` to the fusion-client app."""
    app.command("grant")(grant)
    app.add_typer(grants_app, name="grants")
