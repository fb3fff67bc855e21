"""fusion-archiver: run the Archiver, rebuild and check its index offline; the admin commands
over its HTTP API (cameras, viewers, holds, grants) are in archiver/admin_cli.py, registered here.

Thin: argument parsing and output. Owns the exit codes (main): every failure is one sentence on
stderr and a non-zero code, never a traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Annotated, Any

import typer

from archiver.admin_cli import JsonOpt, TlsCaOpt, archiver_info, echo_result
from archiver.admin_cli import register as register_admin_commands
from archiver.identity_cli import identity_app
from keyservice.cli_support import add_version_option, hidden_aliases, run, tidy_help
from keyservice.errors import UsageError

# rich_markup_mode=None: plain help, without ~80 ms of rich and pygments imports (issue 23).
app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode=None,
                  help="The Fusion Archiver: encrypts camera streams, serves fusion streams.")
add_version_option(app, "fusion-archiver")
register_admin_commands(app)
app.add_typer(identity_app, name="identity")
# The Archiver's URL is --archiver in the three CLIs; --url, the old spelling, keeps working.
# --oaep-hash is the old name of --key-scheme (issue 24).
hidden_aliases(app, {"url": "archiver", "oaep-hash": "key-scheme"})


# The site directory: PostgreSQL for a site of several Archivers; SQLite in the data directory
# without it. The environment variable keeps a password off the command line (and out of ps).
DirectoryOpt = Annotated[str | None, typer.Option(
    "--directory", envvar="FUSION_DIRECTORY", show_envvar=True,
    help="The site directory: postgresql://USER@HOST:PORT/DATABASE (password from the URL, "
    "PGPASSWORD or ~/.pgpass). Default: the SQLite file in the data directory.")]


@app.command()
def serve(
    data: Annotated[Path, typer.Option("--data", help="Data directory (SQLite, archive, token).")],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
    tls_cert: Annotated[Path | None, typer.Option(
        "--tls-cert", help="TLS certificate (PEM, its chain after it) to serve HTTPS with.")] = None,
    tls_key: Annotated[Path | None, typer.Option(
        "--tls-key", help="The TLS certificate's private key (PEM).")] = None,
    key_period: Annotated[int, typer.Option("--key-period", help="Seconds per minute key "
                                            "(60 in production; shorter for tests).")] = 60,
    signer_token: Annotated[str | None, typer.Option(
        "--signer-token", help="PKCS#11 URI of the Archiver's signing token (default: a SoftHSM "
        "token created in the data directory).")] = None,
    site_ca: Annotated[list[Path] | None, typer.Option(
        "--site-ca", help="Viewer certificates must chain to this CA (repeatable).")] = None,
    signing_cert: Annotated[Path | None, typer.Option(
        "--signing-cert", help="A certificate (PEM) a site CA issued for the signing key, "
        "used instead of the self-signed one (evidence verify --site-ca then establishes "
        "this Archiver as the signer).")] = None,
    upload_timeout: Annotated[float, typer.Option(
        "--upload-timeout", help="Seconds a segment upload may take (slower ones are dropped: "
        "slow-loris).")] = 60.0,
    session_ttl: Annotated[int, typer.Option(
        "--session-ttl", help="Seconds a viewer session lasts after login.")] = 600,
    stream_send_timeout: Annotated[float, typer.Option(
        "--stream-send-timeout", help="Seconds a viewer may leave a fusion stream chunk "
        "unread before it is dropped.")] = 30.0,
    header_timeout: Annotated[float, typer.Option(
        "--header-timeout", help="Seconds a request's line and headers may take.")] = 10.0,
    body_timeout: Annotated[float, typer.Option(
        "--body-timeout", help="Seconds a JSON request body may take.")] = 10.0,
    max_connections: Annotated[int, typer.Option(
        "--max-connections", help="Open connections (and requests) beyond this are answered "
        "503 at once.")] = 1000,
    login_rate: Annotated[float, typer.Option(
        "--login-rate", help="Login requests a second per client address.")] = 5.0,
    viewer_concurrency: Annotated[int, typer.Option(
        "--viewer-concurrency", help="Requests one viewer may have searched at once (until "
        "their answer starts).")] = 4,
    viewer_streams: Annotated[int, typer.Option(
        "--viewer-streams", help="Requests (streams included) one viewer may have open.")] = 32,
    viewer_rate: Annotated[float, typer.Option(
        "--viewer-rate", help="Requests a second one viewer may make.")] = 20.0,
    refusal_window: Annotated[float, typer.Option(
        "--refusal-window", help="Seconds over which refused requests of one address are "
        "summed up in the audit log.")] = 60.0,
    public_metrics: Annotated[bool, typer.Option(
        "--public-metrics", help="Serve /metrics without a token.")] = False,
    api_docs: Annotated[bool, typer.Option(
        "--api-docs", help="Serve /docs and /openapi.json.")] = False,
    retention_days: Annotated[int, typer.Option(
        "--retention-days", help="Days video is kept by default (a camera may have its own: "
        "'cameras retention'); older video is destroyed, keys first.")] = 30,
    retention_interval: Annotated[float, typer.Option(
        "--retention-interval", help="Seconds between retention passes.")] = 60.0,
    min_free_mib: Annotated[int, typer.Option(
        "--min-free-mib", help="Below this much free space (MiB) the oldest unheld video is "
        "removed, whatever its age.")] = 1024,
    disk_reserve_mib: Annotated[int, typer.Option(
        "--disk-reserve-mib", help="Space (MiB) set aside for retention to free a full disk "
        "with.")] = 16,
    rtsp_max_segment_kib: Annotated[int, typer.Option(
        "--rtsp-max-segment-kib", help="RTSP pull: a segment is cut at this size (KiB), and a "
        "larger frame dropped.")] = 32 * 1024,
    rtsp_max_segment_s: Annotated[float, typer.Option(
        "--rtsp-max-segment-s", help="RTSP pull: a segment is cut after this many seconds "
        "without a keyframe to cut at.")] = 20.0,
    max_behind_s: Annotated[float, typer.Option(
        "--max-behind-s", help="A pushed camera's continuous stream may arrive this many "
        "seconds late and keep its own times; a later segment is placed at its arrival.")] = 30.0,
    rtsp_workers: Annotated[int | None, typer.Option(
        "--rtsp-workers", help="RTSP pull: worker processes that pull and remux the cameras "
        "(default: one per core; 0: in the Archiver's own process).")] = None,
    max_rtsp_cameras: Annotated[int, typer.Option(
        "--max-rtsp-cameras", help="Pulled (RTSP) cameras this Archiver takes; 'cameras add' "
        "refuses more (0: no limit). The default was measured on 2 cores at 1 Mbit/s: size it "
        "to your cores and bit rates (docs/cameras.md).")] = 250,
    bootstrap_token: Annotated[bool, typer.Option(
        "--bootstrap-token/--no-bootstrap-token", help="Accept the data directory's admin-token "
        "(the embedded default). Turn it off once admins are people ('admins add'): then only "
        "personal admin sessions act as admin.")] = True,
    directory: DirectoryOpt = None,
    name: Annotated[str | None, typer.Option(
        "--name", envvar="FUSION_ARCHIVER_NAME", show_envvar=True,
        help="This Archiver's name in its site (default: the host name; Archivers sharing a "
        "host need their own).")] = None,
    public_url: Annotated[str | None, typer.Option(
        "--public-url", envvar="FUSION_PUBLIC_URL", show_envvar=True,
        help="The URL viewers and cameras reach this Archiver at (default: the address it "
        "listens on), e.g. https://a1.site.example:8443.")] = None,
    site_notify: Annotated[bool, typer.Option(
        "--site-notify/--no-site-notify", help="In a site: learn of authorization changes made "
        "through other Archivers by PostgreSQL LISTEN/NOTIFY (off: by polling alone).")] = True,
    site_poll: Annotated[float, typer.Option(
        "--site-poll", help="In a site: poll the directory for authorization changes this "
        "often (seconds), also with NOTIFY: a lost notification still converges.")] = 5.0,
    peer_tls_ca: Annotated[Path | None, typer.Option(
        "--peer-tls-ca", help="In a site: the CA (PEM) that verifies the other Archivers' TLS "
        "when this one consolidates their recordings (default: FUSION_TLS_CA, else the "
        "system's).")] = None,
    consolidate_every: Annotated[float, typer.Option(
        "--consolidate-every", help="In a site: seconds between looks for gaps in the cameras "
        "this Archiver holds that others recorded, copied here as they signed them (0: "
        "never).")] = 600.0,
) -> None:
    """Run the Archiver."""
    import os

    from archiver.app import create_app
    from archiver.datadir import DIR_MODE, lock_data_dir
    from archiver.server import bind_listeners
    from archiver.server import serve as serve_app
    from archiver.settings import Settings

    # Nothing this process creates is for other local users (the data directory holds tokens).
    os.umask(0o027)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings(data_dir=data.resolve(), host=host, port=port, tls_cert=tls_cert,
                        tls_key=tls_key, key_period_s=key_period, signer_token_uri=signer_token,
                        site_ca_files=tuple(site_ca or ()), upload_timeout_s=upload_timeout,
                        signing_cert_file=signing_cert,
                        session_ttl_s=session_ttl, stream_send_timeout_s=stream_send_timeout,
                        header_timeout_s=header_timeout, body_timeout_s=body_timeout,
                        login_rate=login_rate, viewer_concurrency=viewer_concurrency,
                        viewer_streams=viewer_streams,
                        viewer_rate=viewer_rate, refusal_window_s=refusal_window,
                        public_metrics=public_metrics, api_docs=api_docs,
                        max_connections=max_connections, retention_days=retention_days,
                        retention_interval_s=retention_interval,
                        min_free_bytes=min_free_mib * 1024 * 1024,
                        reserve_bytes=disk_reserve_mib * 1024 * 1024,
                        rtsp_max_segment_bytes=rtsp_max_segment_kib * 1024,
                        rtsp_max_segment_s=rtsp_max_segment_s, rtsp_workers=rtsp_workers,
                        max_behind_s=max_behind_s,
                        max_rtsp_cameras=max_rtsp_cameras,
                        bootstrap_token=bootstrap_token, directory_url=directory or None,
                        advertised_url=public_url,
                        site_notify=site_notify, site_poll_s=site_poll,
                        peer_tls_ca=peer_tls_ca, consolidate_every_s=consolidate_every,
                        **({"archiver_name": name} if name else {}))
    if not bootstrap_token:
        from archiver.admins import active_admins
        if active_admins(settings.data_dir, settings.directory_url) == 0:
            # Refused before anything starts: without the bootstrap token and without an
            # admin, nobody could administer this Archiver.
            raise UsageError("--no-bootstrap-token needs at least one admin: add one first with "
                             "'fusion-archiver admins add CERT.pem --name NAME' (with the "
                             "bootstrap token).")
    # Before anything starts (token, index, RTSP pullers): the data directory is ours alone
    # (held until this process ends), and the port is free (bound now, served later).
    settings.data_dir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    lock = lock_data_dir(settings.data_dir, "serve")
    sockets = bind_listeners(settings)
    if settings.directory_url:
        # Reached (and migrated) before the server starts: a directory that cannot be used is
        # refused with its sentence and exit code, not a failed startup with a traceback.
        from archiver.archive import wall_clock_ms
        from archiver.directory import open_directory
        from archiver.registry import check_name
        site = open_directory(settings.directory_url, settings.data_dir)
        try:  # another live Archiver of this name would take this one's cameras
            check_name(site, settings, wall_clock_ms())
        finally:
            site.close()
    signer = None
    from archiver.signing import imported_certificate_path
    if settings.signing_cert_file is not None or imported_certificate_path(settings).exists():
        # Opened before the server starts, so a --signing-cert (or an imported certificate)
        # for another key, or not valid now, is refused with its sentence and exit code, not
        # a failed startup.
        from archiver.signing import open_signer
        signer = open_signer(settings)
    logging.getLogger("archiver").info("listening on %s://%s:%d (data directory %s, pid %d)",
                                       settings.scheme, host, port, settings.data_dir,
                                       os.getpid())
    try:
        serve_app(create_app(settings, signer=signer), settings, sockets=sockets)
    finally:
        lock.release()


@app.command()
def reindex(
    data: Annotated[Path, typer.Option("--data", help="The Archiver's data directory.")],
    archiver_cert: Annotated[Path | None, typer.Option(
        "--archiver-cert", help="Verify against this Archiver certificate (PEM) instead of the "
        "signing token's.")] = None,
    signer_token: Annotated[str | None, typer.Option(
        "--signer-token", help="PKCS#11 URI of the signing token (default: the SoftHSM token "
        "in the data directory).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Rebuild the segment index from the archive files (offline: stop the Archiver first).
    Every segment and manifest is verified against the Archiver's signature and chain; the
    files are not changed."""
    with _offline(data, "reindex"):
        _print_rebuild(data, archiver_cert, signer_token, as_json)


@contextmanager
def _offline(data: Path, purpose: str) -> Iterator[None]:
    """The data directory's lock for an offline command that writes the index: a rebuild
    under a running Archiver would race its index writes, so it is refused, naming it."""
    from archiver.datadir import lock_data_dir

    if not data.is_dir():
        raise UsageError(f"{data} is not an Archiver data directory (no such directory).")
    lock = lock_data_dir(data.resolve(), purpose)
    try:
        yield
    finally:
        lock.release()


def _archiver_key(data: Path, archiver_cert: Path | None, signer_token: str | None) -> Any:
    """The Archiver's public signing key: from --archiver-cert, else from its token."""
    from archiver.reindex import ec_public_key
    from archiver.settings import Settings

    settings = Settings(data_dir=data.resolve(), signer_token_uri=signer_token)
    if not settings.archive_dir.is_dir():
        raise UsageError(f"{data} is not an Archiver data directory (no archive/ in it).")
    if archiver_cert is not None:
        from keyservice.certs import load_certificate
        try:
            certificate = load_certificate(archiver_cert.read_bytes())
        except OSError as exc:
            raise UsageError(f"Cannot read {archiver_cert}: {exc.strerror}.") from None
    else:
        if signer_token is None and not (settings.token_dir / "softhsm2.conf").exists():
            raise UsageError(f"No signing token in {data}; give --archiver-cert or --signer-token.")
        # The key on the token: the same whatever certificate is imported for it (an expired
        # one must not stop a check or a rebuild).
        from archiver.signing import open_token_signer
        certificate = open_token_signer(settings).certificate
    try:
        return ec_public_key(certificate.public_key())
    except TypeError as exc:
        raise UsageError(str(exc)) from None


def _print_rebuild(data: Path, archiver_cert: Path | None, signer_token: str | None,
                   as_json: bool) -> None:
    import sqlite3

    from archiver.db import Database
    from archiver.reindex import rebuild_index
    from archiver.settings import Settings

    key = _archiver_key(data, archiver_cert, signer_token)
    settings = Settings(data_dir=data.resolve(), signer_token_uri=signer_token)
    try:
        db = Database(settings.db_path)
        try:
            # A dropped table is recreated empty: the segment index is refilled from the files.
            restored = db.restore_missing_tables()
            report = rebuild_index(settings.archive_dir, db, key)
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        from archiver.check import IndexDamaged
        raise IndexDamaged(f"The index {settings.db_path.name} is damaged beyond a rebuild "
                           f"in place ({exc}).", "Restore it from a backup.") from None
    total = sum(report.cameras.values())
    lines = [f"{camera}: {count} segment(s)" for camera, count in sorted(report.cameras.items())]
    lines.append(f"indexed {total} segment(s) under {report.manifests} signed manifest(s) from "
                 f"{report.files} file(s)")
    lines.append(f"key streams: {report.epochs} epoch opener(s), {report.key_records} key "
                 "record(s) read back from the key journals")
    lines += [f"not indexed: {problem}" for problem in report.problems]
    lines += [f"the index lacked the table {table}: recreated" for table in restored]
    echo_result(as_json, {"restored_tables": restored, "cameras": report.cameras, "segments": total,
                   "manifests": report.manifests, "files": report.files,
                   "epochs": report.epochs, "key_records": report.key_records,
                   "problems": report.problems}, "\n".join(lines))


@app.command()
def check(
    data: Annotated[Path, typer.Option("--data", help="The Archiver's data directory.")],
    archiver_cert: Annotated[Path | None, typer.Option(
        "--archiver-cert", help="Verify against this Archiver certificate (PEM) instead of the "
        "signing token's.")] = None,
    signer_token: Annotated[str | None, typer.Option(
        "--signer-token", help="PKCS#11 URI of the signing token (default: the SoftHSM token "
        "in the data directory).")] = None,
    rebuild_index: Annotated[bool, typer.Option(
        "--rebuild-index", help="Then rebuild the index from the archive files, as "
        "'reindex' does (stop the Archiver first).")] = False,
    retention_days: Annotated[int, typer.Option(
        "--retention-days", help="The site's default retention ('serve --retention-days'): "
        "a day marked removed must have been past it.")] = 30,
    as_json: JsonOpt = False,
    directory: DirectoryOpt = None,
) -> None:
    """Check the archive: files, index, signatures and manifest chains. Exit 0 if sound,
    3 if damaged (each problem is listed)."""
    # Checking alone only reads; with --rebuild-index it writes, so it must be alone, and is
    # refused before the check rather than after it.
    with _offline(data, "check --rebuild-index") if rebuild_index else nullcontext():
        _check(data, archiver_cert, signer_token, rebuild_index, retention_days, as_json,
               directory or None)


def _check(data: Path, archiver_cert: Path | None, signer_token: str | None,
           rebuild_index: bool, retention_days: int, as_json: bool,
           directory_url: str | None = None) -> None:
    from archiver.check import check_archive

    key = _archiver_key(data, archiver_cert, signer_token)
    report = check_archive(data.resolve(), key, retention_days, directory_url=directory_url)
    lines = [f"checked {report.files} archive file(s), {report.journals} key journal(s): "
             f"{report.segments} segment(s), {report.manifests} manifest(s) on "
             f"{len(report.cameras)} camera chain(s)"]
    lines += [f"note: {note}" for note in report.notes]
    lines += [f"consolidated part of camera {c['camera']} from {c['archiver']} (signed by "
              f"{c['signer']}): {c['segments']} segment(s), verified against its signer"
              for c in report.consolidated]
    lines += [f"PROBLEM: {p.message}" for p in report.problems]
    lines.append("the archive is sound" if report.ok else
                 f"{len(report.problems)} problem(s) found: restore the damaged files from a "
                 "backup, or rebuild the index from the files (check --rebuild-index, with the "
                 "Archiver stopped) if the files are sound and the index is not")
    echo_result(as_json, report.to_json(), "\n".join(lines))
    if rebuild_index:
        _print_rebuild(data, archiver_cert, signer_token, as_json)
    if not report.ok:
        from archiver.check import EXIT_DAMAGED
        raise SystemExit(EXIT_DAMAGED)


@app.command(help="Print the Archiver's signing certificate (PEM) and its SHA-256 fingerprint: "
             "what viewers pin. Give viewers the certificate (fusion-client --archiver-cert) or "
             "the fingerprint to compare on first use. From the running Archiver (--archiver) or "
             "from its data directory's signing token (--data).")
def certificate(
    data: Annotated[Path | None, typer.Option(
        "--data", help="The Archiver's data directory (reads its signing token).")] = None,
    url: Annotated[str | None, typer.Option(
        "--archiver", envvar="FUSION_ARCHIVER_URL",
        help="The running Archiver's base URL.")] = None,
    signer_token: Annotated[str | None, typer.Option(
        "--signer-token", help="PKCS#11 URI of the signing token (default: the SoftHSM token "
        "in the data directory).")] = None,
    tls_ca: TlsCaOpt = None,
    as_json: JsonOpt = False,
) -> None:
    from cryptography.hazmat.primitives.serialization import Encoding

    from keyservice.identity import fingerprint

    if (data is None) == (url is None):
        raise UsageError("Give either --data DIR (the data directory) or --archiver URL (the "
                         "running Archiver).")
    if data is not None:
        from archiver.settings import Settings
        from archiver.signing import open_signer

        settings = Settings(data_dir=data.resolve(), signer_token_uri=signer_token)
        if signer_token is None and not (settings.token_dir / "softhsm2.conf").exists():
            raise UsageError(f"No signing token in {data}; is it an Archiver's data directory "
                             "(started once)? Or give --signer-token.")
        cert = open_signer(settings).certificate
    else:
        from keyservice.certs import load_certificate

        assert url is not None
        answer = archiver_info(url, tls_ca)
        cert = load_certificate(str(answer.get("certificate", "")).encode())
    pem = cert.public_bytes(Encoding.PEM).decode()
    fp = fingerprint(cert).hex()
    echo_result(as_json, {"certificate": pem, "fingerprint": fp,
                   "subject": cert.subject.rfc4514_string()},
         f"{pem.rstrip()}\nsha256 fingerprint: {fp}")


tidy_help(app)


def main() -> None:
    run(app, "fusion-archiver")
