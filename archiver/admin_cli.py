"""fusion-archiver's admin commands over the Archiver's HTTP API: cameras, viewers (and its
hidden alias clients), holds, grants. archiver/cli.py registers them on its app (``register``).

Thin: argument parsing, one call of the Python admin client (archiver/admin_client.py) per
command, output. Every failure is raised as one of keyservice.errors' errors, which
fusion-archiver's main() turns into one sentence on stderr and a non-zero exit code, never a
traceback.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from keyservice.errors import ArchiverFailed, RequestRefused, UsageError
from keyservice.text import printable
from keyservice.timespec import parse_range

if TYPE_CHECKING:
    import ssl

    from archiver.admin_client import AdminClient

# The commands import the admin client (httpx) when they run, not when the CLI is built:
# `fusion-archiver --help` loads no HTTP client (issue 23).

# rich_markup_mode=None: plain help, without ~80 ms of rich and pygments imports (issue 23).
cameras_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                          help="Cameras: add, list, retention (how long video is kept), remove.")
viewers_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                          help="Viewers: add, list, cameras (change a viewer's cameras), revoke.")
holds_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                        help="Evidence holds (video that survives retention until released): "
                             "add, list, remove.")
admins_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                         help="Admins as people, each with a certificate on their own token: "
                              "add, list, revoke, login (an admin session whose actions the "
                              "audit log names).")
site_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                       help="The site: its Archivers (archivers).")
grants_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                         help="Access grants viewers made: list, approve, reject, revoke. The "
                              "Archiver serves a grant only once approved.")


def register(app: typer.Typer) -> None:
    """Add the admin commands to fusion-archiver's ``app``, in the order its help lists them."""
    app.add_typer(cameras_app, name="cameras")
    app.add_typer(viewers_app, name="viewers")
    app.add_typer(viewers_app, name="clients", hidden=True)  # the old name, kept as an alias
    app.add_typer(holds_app, name="holds")
    app.add_typer(grants_app, name="grants")
    app.add_typer(admins_app, name="admins")
    app.add_typer(site_app, name="site")
    app.command("audit")(audit_list)
    app.command("consolidate")(consolidate)


# --archiver, as fusion-client names it; --url, the old spelling, is a hidden alias (cli.py).
UrlOpt = Annotated[str, typer.Option("--archiver", envvar="FUSION_ARCHIVER_URL",
                                     help="The Archiver's base URL.")]
TokenOpt = Annotated[str | None, typer.Option("--admin-token", envvar="FUSION_ADMIN_TOKEN",
                                              help="The admin token (or --data).")]
DataOpt = Annotated[Path | None, typer.Option("--data", help="Read the admin token from the "
                                              "Archiver's data directory.")]
CameraArg = Annotated[str, typer.Argument(help="The camera's name.")]
GrantIdArg = Annotated[str, typer.Argument(help="The grant's id (32 hex digits, grants list).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object, for scripts.")]
TlsCaOpt = Annotated[Path | None, typer.Option(
    "--tls-ca", envvar="FUSION_TLS_CA",
    help="CA certificate (PEM) to verify the Archiver's HTTPS certificate.")]
DEFAULT_URL = "http://127.0.0.1:8080"


# --- helpers -------------------------------------------------------------------------------
def _admin_token(token: str | None, data: Path | None) -> str:
    if token:
        return token
    if data is not None:
        path = data / "admin-token"
        try:
            return path.read_text().strip()
        except OSError as exc:
            raise UsageError(f"Cannot read the admin token from {path}: {exc.strerror}.") from None
    raise UsageError("No admin token: give --admin-token, set FUSION_ADMIN_TOKEN, or --data DIR.")


def _verify(tls_ca: Path | None) -> ssl.SSLContext:
    """How to check the Archiver's HTTPS certificate: the one trust rule of keyservice.tls
    (--tls-ca, else FUSION_TLS_CA for commands that do not declare --tls-ca, else the system's)."""
    from keyservice.tls import trust as tls_trust

    return tls_trust(tls_ca)


def _client(url: str, admin_token: str | None, data: Path | None,
            tls_ca: Path | None) -> AdminClient:
    from archiver.admin_client import AdminClient

    return AdminClient(url, _admin_token(admin_token, data), verify=_verify(tls_ca))


def archiver_info(url: str, tls_ca: Path | None) -> dict[str, Any]:
    """The Archiver's public /v1/archiver answer (its signing certificate), no token needed."""
    import httpx

    from keyservice.exits import unreachable

    try:
        response = httpx.get(url.rstrip("/") + "/v1/archiver", timeout=30, verify=_verify(tls_ca))
    except httpx.InvalidURL as exc:
        raise UsageError(f"The Archiver URL {url!r} is not usable: {exc}.") from None
    except httpx.TransportError as exc:
        raise unreachable(url, exc) from None
    if response.status_code != 200:
        raise RequestRefused(f"{url} answered HTTP {response.status_code} to /v1/archiver; is it "
                             "a Fusion Archiver?")
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise ArchiverFailed(f"The answer of {url} to /v1/archiver is not the Archiver's.")
    return body


def echo_result(as_json: bool, obj: Any, human: str) -> None:
    """Print a command's result: ``obj`` as one JSON object (``--json``), else ``human``."""
    # JSON escapes every control and non-ASCII character; the human form escapes them too
    # (its line breaks are ours: values with line breaks are escaped where they are inserted).
    typer.echo(json.dumps(obj) if as_json else printable(human, newlines=True))


def _when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="seconds")


# `cameras add --archiver`: the Archiver's URL as everywhere, or (issue 21) the name of the
# site's Archiver that records the camera; names cannot hold "://", so the two never mix up.
ArchiverOrNameOpt = Annotated[list[str] | None, typer.Option(
    "--archiver", help="The Archiver's base URL (default FUSION_ARCHIVER_URL, else "
    f"{DEFAULT_URL}), and/or the NAME of the site's Archiver that records the camera (default: "
    "the one the command is sent to; 'site archivers' lists them). Give it twice for both.")]


def _url_and_name(values: list[str] | None) -> tuple[str, str | None]:
    import os

    urls = [v for v in values or () if "://" in v]
    names = [v for v in values or () if "://" not in v]
    if len(urls) > 1 or len(names) > 1:
        raise UsageError("Give --archiver at most twice: once the URL to send the command to, "
                         "once the name of the Archiver that records the camera.")
    url = urls[0] if urls else os.environ.get("FUSION_ARCHIVER_URL") or DEFAULT_URL
    return url, names[0] if names else None


@cameras_app.command("add")
def cameras_add(name: CameraArg, archiver: ArchiverOrNameOpt = None,
                admin_token: TokenOpt = None,
                data: DataOpt = None, tls_ca: TlsCaOpt = None,
                as_json: JsonOpt = False,
                rtsp: Annotated[str | None, typer.Option(
                    "--rtsp", envvar="FUSION_RTSP_URL",
                    help="Pull this RTSP URL in the Archiver. With credentials in it, prefer the "
                    "FUSION_RTSP_URL variable: other users can read argv (ps), not your "
                    "environment.")] = None,
                archivers: Annotated[str | None, typer.Option(
                    "--archivers", metavar="A1,A2,...",
                    help="The site's Archivers of the camera, in order: the first records it, "
                    "the next takes over when the one recording it is down (docs/site.md).")] = None,
                redundant: Annotated[bool, typer.Option(
                    "--redundant", help="All the --archivers record the camera at once, each "
                    "under its own keys and signature (a pulled camera only).")] = False) -> None:
    """Add a camera; prints its ingest URL (that of the Archiver that records it) and ingest
    token (shown once). A pulled camera (--rtsp) gets no token: the Archiver is its only
    source."""
    url, holder = _url_and_name(archiver)
    standbys: list[str] = []
    if archivers is not None:
        names = [n.strip() for n in archivers.split(",") if n.strip()]
        if not names or holder is not None:
            raise UsageError("Give the camera's Archivers once: --archivers a1,a2,... (the "
                             "first records it), or one --archiver NAME.")
        holder, standbys = names[0], names[1:]
    with _client(url, admin_token, data, tls_ca) as client:
        result = asdict(client.add_camera(name, rtsp, holder, standbys, redundant))
    by = f" by Archiver {result['archiver']}" if result.get("archiver") else ""
    if result.get("standbys"):
        by += (f" (and at once by {', '.join(result['standbys'])})" if result["redundant"]
               else f" (standbys, in order: {', '.join(result['standbys'])})")
    if result.get("ingest_token") is None:
        human = (f"camera {result['name']} added, pulled{by} from "
                 f"{result['rtsp_url']} (no ingest token; it accepts no pushed video)")
    else:
        human = (f"camera {result['name']} added, recorded{by}\n"
                 f"ingest URL:   {result['ingest_url']}\n"
                 f"ingest token: {result['ingest_token']}  (shown once; keep it secret)")
    echo_result(as_json, result, human)


@cameras_app.command("move")
def cameras_move(name: CameraArg,
                 to: Annotated[str, typer.Option("--to", help="The name of the site's Archiver "
                                                 "that records the camera from now on.")],
                 url: UrlOpt = DEFAULT_URL, admin_token: TokenOpt = None, data: DataOpt = None,
                 tls_ca: TlsCaOpt = None, as_json: JsonOpt = False) -> None:
    """Move a camera's recording to another Archiver of the site: the one recording it ends
    its stream (its last segment archived and signed), the other starts, within seconds. What
    was recorded stays playable where it was recorded."""
    with _client(url, admin_token, data, tls_ca) as client:
        result = asdict(client.move_camera(name, to))
    human = (f"camera {name} recorded by {result['to']} from {_when(result['since_ms'])} "
             f"(before: {result['from_archiver'] or 'each Archiver that read it'}; its "
             "history stays there)" if result["moved"]
             else f"camera {name} is recorded by {result['to']} already; nothing moved")
    echo_result(as_json, result, human)


def _archivers(camera: dict[str, Any]) -> str:
    """Who records it: "a2" (one Archiver), "a2 (a1>a2>a3)" (the standbys' order), or
    "a1+a2 redundant"."""
    order = camera.get("archivers") or []
    if camera.get("redundant"):
        return "+".join(order) + " redundant"
    holder = camera.get("archiver") or "-"
    return f"{holder} ({'>'.join(order)})" if order else holder


@cameras_app.command("list")
def cameras_list(url: UrlOpt = DEFAULT_URL, admin_token: TokenOpt = None, data: DataOpt = None,
                 tls_ca: TlsCaOpt = None, as_json: JsonOpt = False) -> None:
    """List the site's cameras: the Archiver that records each, and (as this Archiver
    knows them) health (receiving, behind, stalled, unreachable, auth_failed, bad_stream,
    bad_timestamps, waiting), recorded range, traffic in the last minute, capture-to-archive lag,
    gaps."""
    with _client(url, admin_token, data, tls_ca) as client:
        result = [asdict(c) for c in client.cameras()]
        storage = asdict(client.storage())
    lines = [f"{c['name']:<20} {_archivers(c):<12} {c['state']:<12} "
             f"{c['segments']:>8} segments  "
             f"{_when(c['first_ms'])} .. {_when(c['last_ms'])}  retention "
             f"{c['retention_days']} d{' (default)' if c['retention_default'] else ''}"
             + (f", {c['holds']} hold(s)" if c["holds"] else "") + "  last minute: "
             f"{c['segments_last_minute']} segments, {c['bytes_last_minute']} bytes; "
             f"gaps {c['gaps']}" + _lag(c) + (f", refused {c['refused']} (last: {c['last_refusal']})"
                                   if c["refused"] else "")
             + (f", timestamp jumps {c['timestamp_jumps']}" if c.get("timestamp_jumps") else "")
             + (f"  rtsp {c['rtsp_url']}, {c['puller_restarts']} restarts" if c["rtsp_url"] else "")
             + (f"  ({c['message']})" if c["message"] else "") for c in result]
    lines = lines or ["no cameras"]
    lines.append(f"archive disk: {storage['free_bytes'] / 2**30:.1f} GiB free (threshold "
                 f"{storage['min_free_bytes'] / 2**30:.1f} GiB)"
                 + ("; BELOW THE THRESHOLD with nothing unheld left to remove"
                    if storage["below_watermark"] else ""))
    echo_result(as_json, {"cameras": result, "storage": storage}, "\n".join(lines))


@cameras_app.command("retention")
def cameras_retention(
    name: CameraArg,
    days: Annotated[str, typer.Argument(help="Days to keep the camera's video, or 'default'.")],
    url: UrlOpt = DEFAULT_URL, admin_token: TokenOpt = None, data: DataOpt = None,
    tls_ca: TlsCaOpt = None, as_json: JsonOpt = False,
) -> None:
    """Set how long a camera's video is kept (older video is destroyed, keys first)."""
    value: int | None = None
    if days != "default":
        try:
            value = int(days)
        except ValueError:
            raise UsageError(f"'{days}' is not a number of days or 'default'.") from None
        if value < 1:
            raise UsageError("The retention period must be at least 1 day.")
    with _client(url, admin_token, data, tls_ca) as client:
        result = asdict(client.set_retention(name, value))
    echo_result(as_json, result, f"camera {name}: video kept {result['retention_days']} days"
         + (" (the site default)" if result["retention_default"] else ""))


@cameras_app.command("remove")
def cameras_remove(name: CameraArg, url: UrlOpt = DEFAULT_URL, admin_token: TokenOpt = None,
                   data: DataOpt = None, tls_ca: TlsCaOpt = None,
                   as_json: JsonOpt = False) -> None:
    """Stop accepting a camera's ingest. Its archive is kept."""
    with _client(url, admin_token, data, tls_ca) as client:
        client.remove_camera(name)
    echo_result(as_json, {"name": name, "removed": True}, f"camera {name} removed (archive kept)")


@viewers_app.command("add")
def viewers_add(
    certificates: Annotated[list[Path], typer.Argument(
        help="The viewer's PEM certificate; several (e.g. certs/*.pem) are authorized in "
        "batches of up to 500, each all or none.")],
    cameras: Annotated[str, typer.Option("--cameras", help="cam1,cam2, 'all', or 'none' (a "
                                         "grantee of access grants needs no camera).")],
    key_scheme: Annotated[str | None, typer.Option(
        "--key-scheme", help="rsa-oaep-sha256|rsa-oaep-sha1 (old spellings sha256|sha1 and "
        "--oaep-hash still work), only for RSA certificates not made by fusion-keys.")] = None,
    url: UrlOpt = DEFAULT_URL, admin_token: TokenOpt = None, data: DataOpt = None,
    tls_ca: TlsCaOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Authorize viewer certificates on cameras; prints their SHA-256 fingerprints. A viewer
    authorized already on other cameras is refused: change its cameras with 'viewers cameras'."""
    # Every file is read (and a private key refused) before anything is sent.
    pems = [_read_certificate(path) for path in certificates]
    wanted = [] if cameras.strip() == "none" else _camera_list(cameras, "--cameras")
    with _client(url, admin_token, data, tls_ca) as client:
        if len(pems) == 1:
            result = asdict(client.add_viewer(pems[0], wanted, key_scheme))
            echo_result(as_json, result, f"viewer {printable(result['subject'])} authorized "
                        f"on {_cams(result['cameras'])}"
                        + (" (as it was already: cameras unchanged, epoch renewed)"
                           if result.get("reauthorized") else "")
                        + f"\nfingerprint: {result['fingerprint']}")
            return
        results = add_in_batches(client, certificates, pems, wanted, key_scheme)
    renewed = sum(1 for r in results if r["reauthorized"])
    echo_result(as_json, {"viewers": results}, "\n".join(
        f"{r['fingerprint']}  {printable(r['subject'])}" for r in results)
        + f"\n{len(results)} viewers authorized on {_cams(wanted)}"
        + (f" ({renewed} of them were already: epoch renewed)" if renewed else ""))


def add_in_batches(client: AdminClient, paths: list[Path], pems: list[str],
                    cameras: list[str] | str, key_scheme: str | None) -> list[dict]:
    """``viewers add`` with several certificates: batches of the Archiver's size, in order. A
    refused batch authorizes nobody in it; the error says which were authorized before it."""
    from archiver.admin_client import AdminRefused, viewer_batches

    seen: dict[str, Path] = {}
    for path, pem in zip(paths, pems, strict=True):
        if pem in seen:
            raise UsageError(f"{seen[pem]} and {path} are the same certificate: give each "
                             "once.")
        seen[pem] = path
    results: list[dict] = []
    for batch in viewer_batches(pems, cameras):
        first = len(results)
        try:
            results += [asdict(v) for v in client.add_viewers(batch, cameras, key_scheme)]
        except AdminRefused as exc:
            done = (f"{first} viewers ({paths[0]} to {paths[first - 1]}) were authorized "
                    "before it" if first else "none was authorized")
            raise AdminRefused(
                f"{exc} (in the batch of {paths[first]} to {paths[first + len(batch) - 1]}, "
                f"which authorized nobody; {done}; the {len(pems) - first - len(batch)} "
                "after it were not sent.)", exc.code, exc.status) from None
        except Exception:
            # The batch's answer is lost: it may or may not have been authorized; 'viewers
            # list' tells, and adding the same certificates again only renews their epochs.
            if first:
                typer.echo(f"{first} viewers ({paths[0]} to {paths[first - 1]}) were "
                           "authorized before this failure; the batch of "
                           f"{paths[first]} to {paths[first + len(batch) - 1]} may or may "
                           "not have been ('viewers list' tells).", err=True)
            raise
    return results


def _lag(camera: dict) -> str:
    """The capture-to-archive lag: the last segment's, and the most in the last minute."""
    if camera.get("lag_ms") is None:
        return ""
    return (f"; lag {camera['lag_ms'] / 1000:.1f} s (max {(camera['max_lag_ms'] or 0) / 1000:.1f} "
            "s in the last minute)")


def _cams(cameras: list[str] | str) -> str:
    return "all cameras" if cameras == "all" else ",".join(cameras) or "-"


def _camera_list(text: str, option: str) -> list[str] | str:
    if text.strip() == "all":
        return "all"
    cameras = [c.strip() for c in text.split(",") if c.strip()]
    if not cameras:
        raise UsageError(f"{option}: give camera names (cam1,cam2) or 'all'.")
    return cameras


# Any PEM private key: PKCS#8 (plain or encrypted), PKCS#1 RSA, SEC1 EC, OpenSSH.
_PRIVATE_KEY_MARK = "PRIVATE KEY-----"


def _read_certificate(path: Path) -> str:
    """A certificate file's PEM text. A file holding a private key is refused here, before
    anything is sent: the key must not travel to the Archiver (nor anywhere)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"Cannot read the certificate {path}: {exc}.") from None
    if _PRIVATE_KEY_MARK in text:
        raise UsageError(f"{path} holds a private key, so nothing was sent: give a file with "
                         "the certificate alone (and keep the key where it belongs).")
    return text


def _resolve_viewer(viewer: str, client: AdminClient) -> str:
    """A viewer's full fingerprint from its certificate file, its fingerprint, or a unique
    prefix of it (the short form other commands print)."""
    path = Path(viewer)
    if path.is_file():
        from keyservice.certs import load_certificate
        from keyservice.errors import CertificateError
        from keyservice.identity import fingerprint

        try:
            return fingerprint(load_certificate(_read_certificate(path).encode())).hex()
        except CertificateError as exc:
            raise UsageError(f"Cannot read the certificate {path}: {exc}") from None
    prefix = viewer.strip().lower()
    if len(prefix) < MIN_PREFIX or any(c not in "0123456789abcdef" for c in prefix):
        raise UsageError(f"{viewer!r} is neither a certificate file nor a fingerprint (at least "
                         f"{MIN_PREFIX} hex digits, as 'viewers list' prints).")
    if len(prefix) == 64:
        return prefix
    matches = [asdict(v) for v in client.viewers() if v.fingerprint.startswith(prefix)]
    if not matches:
        raise RequestRefused(f"No viewer's fingerprint starts with {prefix} (see 'viewers "
                             "list').")
    if len(matches) > 1:
        candidates = "; ".join(
            f"{v['fingerprint'][:16]} {printable(v['subject'])}"
            + (" (revoked)" if v["revoked_ms"] else "") for v in matches)
        raise UsageError(f"{prefix} is the start of {len(matches)} viewers' fingerprints "
                         f"({candidates}): give more digits.")
    return str(matches[0]["fingerprint"])


MIN_PREFIX = 4
ViewerArg = Annotated[str, typer.Argument(
    metavar="VIEWER", help="The viewer: its certificate file, its fingerprint, or a unique "
    "start of it (at least 4 hex digits).")]


@viewers_app.command("cameras")
def viewers_cameras(
    viewer: ViewerArg,
    add: Annotated[str | None, typer.Option(
        "--add", help="Cameras to add (cam1,cam2), or 'all'.")] = None,
    remove: Annotated[str | None, typer.Option(
        "--remove", help="Cameras to remove (cam1,cam2).")] = None,
    set_: Annotated[str | None, typer.Option(
        "--set", help="The cameras it has from now on (cam1,cam2), or 'all'.")] = None,
    url: UrlOpt = DEFAULT_URL, admin_token: TokenOpt = None, data: DataOpt = None,
    tls_ca: TlsCaOpt = None, as_json: JsonOpt = False,
) -> None:
    """Change the cameras of an authorized viewer: add some, remove some, or set them all;
    prints what changed. Keys rotate: a camera added now gives nothing recorded before."""
    if set_ is not None and (add is not None or remove is not None):
        raise UsageError("Give --set alone, or --add and --remove.")
    if set_ is None and add is None and remove is None:
        raise UsageError("Give --add, --remove or --set (see --help).")
    body: dict[str, Any] = {}
    if set_ is not None:
        body["set"] = _camera_list(set_, "--set")
    if add is not None:
        added = _camera_list(add, "--add")
        body["add" if added != "all" else "set"] = added
    if remove is not None:
        removed = _camera_list(remove, "--remove")
        if removed == "all":
            raise UsageError("--remove all would leave no camera: revoke the viewer instead.")
        body["remove"] = removed
    if body.get("set") == "all" and "remove" in body:
        raise UsageError("--add all cannot go with --remove: give --set with the cameras.")
    with _client(url, admin_token, data, tls_ca) as client:
        fp = _resolve_viewer(viewer, client)
        result = asdict(client.change_viewer_cameras(fp, body.get("add"), body.get("remove"),
                                                     body.get("set")))
    if result["before"] == result["cameras"]:
        human = f"viewer {fp[:16]}: cameras unchanged ({_cams(result['cameras'])})"
    else:
        human = (f"viewer {fp[:16]} {printable(result['subject'])}: cameras "
                 f"{_cams(result['before'])} -> {_cams(result['cameras'])}"
                 + (f"; added {','.join(result['added'])}" if result["added"] else "")
                 + (f"; removed {','.join(result['removed'])}" if result["removed"] else ""))
    echo_result(as_json, result, human)


@viewers_app.command("list")
def viewers_list(url: UrlOpt = DEFAULT_URL, admin_token: TokenOpt = None, data: DataOpt = None,
                 tls_ca: TlsCaOpt = None, as_json: JsonOpt = False) -> None:
    """List viewers."""
    with _client(url, admin_token, data, tls_ca) as client:
        result = [asdict(v) for v in client.viewers()]
    now = dt.datetime.now(dt.UTC)
    lines = []
    soon = 0
    for c in result:
        state = "revoked " + _when(c["revoked_ms"]) if c["revoked_ms"] else "active"
        cams = c["cameras"] if c["cameras"] == "all" else ",".join(c["cameras"])
        expiry, warn = _expiry(c["not_after"], now, active=not c["revoked_ms"])
        soon += warn
        lines.append(f"{c['fingerprint']}  {printable(c['subject'])}  {cams}  "
                     f"{c.get('key_scheme') or c['oaep_hash']}  "
                     f"{state}  {expiry}")
    if soon:
        lines.append(f"{soon} active viewer(s) expired or expiring within {EXPIRY_WARNING_DAYS} "
                     "days: have them enrol again (fusion-keys enroll) and authorize the new "
                     "certificate.")
    echo_result(as_json, {"viewers": result}, "\n".join(lines) or "no viewers")


EXPIRY_WARNING_DAYS = 30


def _expiry(not_after: str, now: dt.datetime, active: bool) -> tuple[str, bool]:
    """The expiry column of `viewers list`, and whether an admin should act on it."""
    try:
        when = dt.datetime.fromisoformat(not_after)
    except (TypeError, ValueError):
        return "expiry unknown", False
    stamp = when.isoformat(timespec="seconds")
    if when <= now:
        return f"EXPIRED {stamp}", active
    days = (when - now).days
    if days < EXPIRY_WARNING_DAYS:
        return f"EXPIRES IN {days} DAYS ({stamp})", active
    return f"expires {stamp}", False


@viewers_app.command("revoke")
def viewers_revoke(
    viewer: ViewerArg,
    delete_key_streams: Annotated[bool, typer.Option(
        "--delete-key-streams", help="Also delete its key streams: IRREVERSIBLE.")] = False,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    url: UrlOpt = DEFAULT_URL, admin_token: TokenOpt = None, data: DataOpt = None,
    tls_ca: TlsCaOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Revoke a viewer: no key material for it from now on."""
    if delete_key_streams and not yes:
        warning = ("Deleting key streams is irreversible: recordings that only this viewer "
                   "could open become unrecoverable.")
        if not sys.stdin.isatty():
            raise UsageError(warning + " Add --yes to confirm.")
        typer.confirm(warning + " Continue?", abort=True)
    with _client(url, admin_token, data, tls_ca) as client:
        fingerprint = _resolve_viewer(viewer, client)
        result = asdict(client.revoke_viewer(fingerprint, delete_key_streams))
    echo_result(as_json, result, f"viewer {fingerprint} revoked"
         + (" and its key streams deleted" if delete_key_streams else ""))


# --- evidence holds ------------------------------------------------------------------------
def _hold_line(h: dict[str, Any]) -> str:
    return (f"{h['hold_id']:>5}  {h['camera']:<20} {_when(h['from_ms'])} .. {_when(h['to_ms'])}"
            f"  by {h['created_by']} at {_when(h['created_ms'])}: {printable(h['reason'])}")


@holds_app.command("add")
def holds_add(
    camera: CameraArg,
    from_: Annotated[str, typer.Option("--from", help="Start: ISO 8601 (UTC unless an offset "
                                       "is given), relative (-10m, -2h) or 'now'.")],
    to: Annotated[str, typer.Option("--to", help="End, as --from.")],
    reason: Annotated[str, typer.Option("--reason", help="Why (case number...); audited.")],
    url: UrlOpt = DEFAULT_URL, admin_token: TokenOpt = None, data: DataOpt = None,
    tls_ca: TlsCaOpt = None, as_json: JsonOpt = False,
) -> None:
    """Protect a camera's video in a range from retention until the hold is removed."""
    # The one time parser of the three CLIs: "--from -10m" works here as in fusion-client.
    from_ms, to_ms = parse_range(from_, to, int(time.time() * 1000))
    with _client(url, admin_token, data, tls_ca) as client:
        result = asdict(client.add_hold(camera, from_ms, to_ms, reason))
    echo_result(as_json, result, f"hold {result['hold_id']} added\n{_hold_line(result)}")


@holds_app.command("list")
def holds_list(camera: Annotated[str | None, typer.Option(
                   "--camera", help="Only this camera's holds.")] = None,
               url: UrlOpt = DEFAULT_URL, admin_token: TokenOpt = None, data: DataOpt = None,
               tls_ca: TlsCaOpt = None, as_json: JsonOpt = False) -> None:
    """List evidence holds."""
    with _client(url, admin_token, data, tls_ca) as client:
        result = [asdict(h) for h in client.holds(camera)]
    echo_result(as_json, {"holds": result}, "\n".join(map(_hold_line, result)) or "no holds")


@holds_app.command("remove")
def holds_remove(hold_id: Annotated[int, typer.Argument(help="The hold's number (holds list).")],
                 url: UrlOpt = DEFAULT_URL, admin_token: TokenOpt = None,
                 data: DataOpt = None, tls_ca: TlsCaOpt = None,
                 as_json: JsonOpt = False) -> None:
    """Release a hold: its video is subject to retention again."""
    with _client(url, admin_token, data, tls_ca) as client:
        result = asdict(client.remove_hold(hold_id))
    echo_result(as_json, result, f"hold {hold_id} removed (its video is subject to retention again)")


# --- access grants (admin decisions) --------------------------------------------------------
def _grant_line(g: dict[str, Any]) -> str:
    line = (f"{g['grant_id']}  {g['state']:<8}  {g['camera']}  {_when(g['from_ms'])} .. "
            f"{_when(g['to_ms'])}  {g['keys']} keys  by {g['grantor'][:16]} to "
            f"{g['grantee'][:16]}  made {_when(g['created_ms'])}")
    if g.get("decided_ms"):
        line += f"  decided {_when(g['decided_ms'])}"
    if g.get("note"):
        line += f"  note: {printable(g['note'])}"
    return line


@grants_app.command("list")
def grants_list(
    state: Annotated[str | None, typer.Option(
        "--state", help="pending|approved|rejected|revoked (default: all).")] = None,
    url: UrlOpt = DEFAULT_URL, admin_token: TokenOpt = None, data: DataOpt = None,
    tls_ca: TlsCaOpt = None, as_json: JsonOpt = False,
) -> None:
    """List access grants (newest first): who granted which camera and range to whom."""
    if state is not None and state not in ("pending", "approved", "rejected", "revoked"):
        raise UsageError(f"Unknown state {state!r}: pending, approved, rejected or revoked.")
    with _client(url, admin_token, data, tls_ca) as client:
        result = [asdict(g) for g in client.grants(state)]  # type: ignore[arg-type]
    echo_result(as_json, {"grants": result}, "\n".join(_grant_line(g) for g in result) or "no grants")


def _decide(decision: str, grant_id: str, note: str | None, url: str, admin_token: str | None,
            data: Path | None, tls_ca: Path | None, as_json: bool) -> None:
    grant_id = grant_id.strip().lower()
    if len(grant_id) != 32 or any(c not in "0123456789abcdef" for c in grant_id):
        raise UsageError(f"{grant_id!r} is not a grant id (32 hex digits, see 'grants list').")
    with _client(url, admin_token, data, tls_ca) as client:
        result = asdict(client.decide_grant(grant_id, decision, note))  # type: ignore[arg-type]
    echo_result(as_json, result, _grant_line(result))


NoteOpt = Annotated[str | None, typer.Option("--note", help="Why (kept in the audit log).")]


@grants_app.command("approve")
def grants_approve(grant_id: GrantIdArg, note: NoteOpt = None, url: UrlOpt = DEFAULT_URL,
                   admin_token: TokenOpt = None, data: DataOpt = None,
                   tls_ca: TlsCaOpt = None, as_json: JsonOpt = False) -> None:
    """Approve a pending grant: from now on the grantee may fetch it and play its range."""
    _decide("approve", grant_id, note, url, admin_token, data, tls_ca, as_json)


@grants_app.command("reject")
def grants_reject(grant_id: GrantIdArg, note: NoteOpt = None, url: UrlOpt = DEFAULT_URL,
                  admin_token: TokenOpt = None, data: DataOpt = None,
                  tls_ca: TlsCaOpt = None, as_json: JsonOpt = False) -> None:
    """Reject a pending grant: it is never served."""
    _decide("reject", grant_id, note, url, admin_token, data, tls_ca, as_json)


@grants_app.command("revoke")
def grants_revoke(grant_id: GrantIdArg, note: NoteOpt = None, url: UrlOpt = DEFAULT_URL,
                  admin_token: TokenOpt = None, data: DataOpt = None,
                  tls_ca: TlsCaOpt = None, as_json: JsonOpt = False) -> None:
    """Revoke a grant: it is no longer served, and a stream under it stops at its next manifest
    (keys the grantee already opened cannot be taken back)."""
    _decide("revoke", grant_id, note, url, admin_token, data, tls_ca, as_json)


# --- admins (people with their own token; archiver/admins.py) ----------------------------------
def _admin_line(a: dict[str, Any]) -> str:
    state = (f"revoked {_when(a['revoked_ms'])} by {printable(a['revoked_by'])}"
             if a["revoked_ms"] else "active")
    return (f"{a['name']:<16} {a['fingerprint']}  {printable(a['subject'])}  added "
            f"{_when(a['added_ms'])} by {printable(a['added_by'])}  {state}  expires "
            f"{a['not_after']}")


@admins_app.command("add", help="Add an admin: a person who logs in with 'admins login' on "
                    "their own token. Run it with the bootstrap admin token (the data directory's "
                    "admin-token) or another admin's session.")
def admins_add(
    certificate: Annotated[Path, typer.Argument(help="The admin's PEM certificate (enrolled on "
                                                "the admin's own token with fusion-keys enroll).")],
    name: Annotated[str, typer.Option("--name", help="Unique name the audit log gives this "
                                      "admin (lower case; never reused).")],
    key_scheme: Annotated[str | None, typer.Option(
        "--key-scheme", help="rsa-oaep-sha256|rsa-oaep-sha1 (old spellings sha256|sha1 and "
        "--oaep-hash still work), only for RSA certificates not made by fusion-keys.")] = None,
    url: UrlOpt = DEFAULT_URL, admin_token: TokenOpt = None, data: DataOpt = None,
    tls_ca: TlsCaOpt = None, as_json: JsonOpt = False,
) -> None:
    # Thin: the Archiver checks the certificate (as a viewer's) and audits the addition; a
    # file holding a private key is refused here, before anything is sent.
    pem = _read_certificate(certificate)
    with _client(url, admin_token, data, tls_ca) as client:
        result = asdict(client.add_admin(pem, name, key_scheme))
    echo_result(as_json, result, f"admin {result['name']} added; the audit log names them "
         f"{printable(result['actor'])}\nfingerprint: {result['fingerprint']}")


@admins_app.command("list")
def admins_list(url: UrlOpt = DEFAULT_URL, admin_token: TokenOpt = None, data: DataOpt = None,
                tls_ca: TlsCaOpt = None, as_json: JsonOpt = False) -> None:
    """List admins (revoked ones too: the audit log names them)."""
    with _client(url, admin_token, data, tls_ca) as client:
        result = [asdict(a) for a in client.admins()]
    echo_result(as_json, {"admins": result},
         "\n".join(_admin_line(a) for a in result) or "no admins (only the bootstrap admin token)")


@admins_app.command("revoke")
def admins_revoke(
    who: Annotated[str, typer.Argument(help="The admin's name, fingerprint or a unique "
                                       "fingerprint prefix.")],
    url: UrlOpt = DEFAULT_URL, admin_token: TokenOpt = None, data: DataOpt = None,
    tls_ca: TlsCaOpt = None, as_json: JsonOpt = False,
) -> None:
    """Revoke an admin: their sessions end at once and they cannot log in again."""
    with _client(url, admin_token, data, tls_ca) as client:
        result = asdict(client.revoke_admin(who))
    echo_result(as_json, result, f"admin {result['name']} ({result['fingerprint'][:16]}) revoked")


@admins_app.command("login", help="Log in on your own token (proof of possession) and print "
                    "a short-lived admin session token for the other commands: export "
                    "FUSION_ADMIN_TOKEN=$(fusion-archiver admins login --token URI). The audit "
                    "log names you for everything done with it.")
def admins_login(
    token: Annotated[str, typer.Option(
        "--token", envvar="FUSION_ADMIN_PKCS11",
        help="PKCS#11 URI of your admin identity on your token (with ;object=NAME); the PIN "
        "from pin-value/pin-source in the URI, FUSION_PIN, or a prompt.")],
    archiver_fingerprint: Annotated[str | None, typer.Option(
        "--archiver-fingerprint", envvar="FUSION_ARCHIVER_FINGERPRINT",
        help="Refuse an Archiver whose certificate has another SHA-256 fingerprint "
        "('fusion-archiver certificate' prints it), before the token's key is used.")] = None,
    url: UrlOpt = DEFAULT_URL, tls_ca: TlsCaOpt = None, as_json: JsonOpt = False,
) -> None:
    # The login itself (token, challenge, proof) is archiver/admin_login.py.
    from archiver.admin_login import login_admin

    session = login_admin(url, _verify(tls_ca), token, archiver_fingerprint)
    info = {"session_token": session.session_token, "name": session.name,
            "fingerprint": session.fingerprint, "actor": session.actor,
            "expires_ms": session.expires_ms,
            "archiver_fingerprint": session.archiver_fingerprint}
    if as_json:
        typer.echo(json.dumps(info))
        return
    # The token alone on stdout (for $(...)); what it is on stderr.
    typer.echo(session.session_token)
    typer.echo(printable(f"admin session for {session.actor} until {_when(session.expires_ms)} "
                         f"on the Archiver sha256 {session.archiver_fingerprint}; give it to "
                         "the other commands as FUSION_ADMIN_TOKEN or --admin-token"), err=True)


@site_app.command("archivers")
def site_archivers(url: UrlOpt = DEFAULT_URL, admin_token: TokenOpt = None, data: DataOpt = None,
                   tls_ca: TlsCaOpt = None, as_json: JsonOpt = False) -> None:
    """List the site's Archivers: name, URL, signing certificate fingerprint (SHA-256), last
    heartbeat, cameras held."""
    with _client(url, admin_token, data, tls_ca) as client:
        result = [asdict(a) for a in client.site_archivers()]
    lines = []
    for a in result:
        age = a["heartbeat_age_ms"]
        heard = "none (stopped, or never heard of)" if age is None else f"{age / 1000:.0f} s ago"
        lines.append(f"{a['name']:<16} {a['url']:<32} sha256 {a['certificate_sha256']}  "
                     f"heartbeat {heard}{'' if a['alive'] else ' (NOT ALIVE)'}  "
                     f"{len(a['cameras_held'])} camera(s)"
                     + (f": {', '.join(a['cameras_held'])}" if a["cameras_held"] else "")
                     + ("  (this one)" if a["this"] else ""))
    echo_result(as_json, {"archivers": result}, "\n".join(lines) or "no Archivers registered")


# --- the audit log -------------------------------------------------------------------------
def _audit_line(entry: dict[str, Any]) -> str:
    details = {k: v for k, v in entry["entry"].items()
               if k not in ("ts_ms", "actor", "action", "prev")}
    shown = " ".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}"
                     for k, v in sorted(details.items()))
    return (f"{_when(entry['ts_ms'])}  {entry['archiver']}#{entry['seq']}  "
            f"{entry['actor']}  {entry['action']}  {shown}").rstrip()


def audit_list(url: UrlOpt = DEFAULT_URL, admin_token: TokenOpt = None, data: DataOpt = None,
               tls_ca: TlsCaOpt = None,
               since_ms: Annotated[int, typer.Option(
                   "--since-ms", min=0, help="Entries from this time on (Unix ms).")] = 0,
               only: Annotated[str | None, typer.Option(
                   "--only", help="One Archiver's entries (its --name).")] = None,
               limit: Annotated[int, typer.Option(
                   "--limit", min=1, max=10_000, help="At most this many entries.")] = 1000,
               as_json: JsonOpt = False) -> None:
    """The audit log, oldest first: in a site the site's (every Archiver's entries, each with
    the Archiver that wrote it), standalone this Archiver's."""
    with _client(url, admin_token, data, tls_ca) as client:
        site, entries = client.audit(since_ms, only, limit)
    result = [asdict(e) for e in entries]
    echo_result(as_json, {"site": site, "entries": result},
                "\n".join(_audit_line(e) for e in result) or "no audit entries")


# --- consolidation ------------------------------------------------------------------------
def _part_line(camera: str, part: dict[str, Any]) -> str:
    asked = f"{_when(part['asked_from_ms'])} .. {_when(part['asked_to_ms'])}"
    if not part["stored"]:
        return (f"camera {camera}: {asked} recorded by {part['archiver']}: "
                f"{part['message']}")
    return (f"camera {camera}: consolidated from {part['archiver']} (signed by "
            f"{part['signer']}): {part['segments']} segments, {part['bytes']} bytes, "
            f"video {_when(part['from_ms'])} .. {_when(part['to_ms'])}, key streams of "
            f"{part['viewers']} viewer(s); part {part['part']}")


def consolidate(camera: Annotated[str, typer.Option("--camera", help="The camera's name.")],
                start: Annotated[str | None, typer.Option(
                    "--from", help="Only gaps from this time (ISO 8601, -2h, now).")] = None,
                end: Annotated[str | None, typer.Option(
                    "--to", help="Only gaps until this time.")] = None,
                url: UrlOpt = DEFAULT_URL, admin_token: TokenOpt = None, data: DataOpt = None,
                tls_ca: TlsCaOpt = None, as_json: JsonOpt = False) -> None:
    """Fill this Archiver's gaps in a camera with what other Archivers of the site recorded
    (after a failover or a move): their ciphertext, signed manifests and key streams copied
    exactly as they signed them, verified before anything is stored. Nothing is decrypted or
    signed again; running it twice copies once."""
    import time

    from keyservice.timespec import parse_time

    now = time.time_ns() // 1_000_000
    from_ms = parse_time(start, now) if start else None
    to_ms = parse_time(end, now) if end else None
    if from_ms is not None and to_ms is not None and to_ms < from_ms:
        raise UsageError("The range ends before it starts; check --from and --to.")
    with _client(url, admin_token, data, tls_ca) as client:
        result = client.consolidate(camera, from_ms, to_ms)
    lines = [_part_line(camera, part) for part in result["parts"]]
    echo_result(as_json, result, "\n".join(lines) or
                f"camera {camera}: no gap recorded by another Archiver to consolidate")
