"""fusion-client evidence: export a camera's time range as a package a third party verifies
without any token, and verify such a package offline (docs/evidence.md).

Thin: the package format and every check live in ``keyservice.evidence`` (pure: layout,
build, verify); this module reads and writes the zip, talks to the Archiver for an export, and
owns messages and exit codes.
"""

from __future__ import annotations

import hashlib
import os
import stat
import zipfile
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path, PurePosixPath
from typing import Annotated

import typer
from cryptography import x509

from client.options import (
    DEFAULT_URL,
    ArchiverCertOpt,
    ArchiverOpt,
    CameraOpt,
    TlsCaOpt,
    TokenOpt,
)
from keyservice.errors import CertificateError, UsageError
from keyservice.evidence.build import build_package, collect
from keyservice.evidence.layout import EvidenceError
from keyservice.evidence.verify import Report, open_sealed_keys, verify_package
from keyservice.exitcodes import ExitCode
from keyservice.format import Record, decode_record
from keyservice.framing import RecordSplitter
from keyservice.identity import Recipient
from keyservice.text import printable

evidence_app = typer.Typer(no_args_is_help=True, add_completion=False,
                           help="Evidence packages a third party verifies without any token: "
                                "export, verify.")

# The verdicts' exit codes (docs/evidence.md): a check failed (the report says which and why);
# sealed keys and no token (all but keys and video verified); verified, but the signed data
# names recorded video the package lacks; consistent, but no trust anchor says whose key signed.
EXIT_NOT_VERIFIED = ExitCode.NOT_VERIFIED
EXIT_PARTLY_VERIFIED = ExitCode.PARTLY_VERIFIED
EXIT_INCOMPLETE = ExitCode.EVIDENCE_INCOMPLETE
EXIT_SIGNER_NOT_ESTABLISHED = ExitCode.SIGNER_NOT_ESTABLISHED
# Limits on a package read from disk (untrusted): member count and total unpacked size.
MAX_MEMBERS = 200_000
MAX_UNPACKED = 16 * 2**30


class PackageUnreadable(EvidenceError):
    exit_code = EXIT_NOT_VERIFIED


def _say(message: str) -> None:
    typer.echo(f"fusion-client: {printable(message)}", err=True)


# --- the zip -------------------------------------------------------------------------------
def write_zip(path: Path, files: dict[str, bytes]) -> str:
    """Write the package as PATH.partial (owner-only: it may hold keys), fsync, rename;
    returns the SHA-256 of the zip file (for the chain of custody)."""
    partial = path.with_name(path.name + ".partial")
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            # Stored, not deflated: segments are ciphertext and the video is compressed
            # already; any unzip (or python3 -m zipfile) unpacks it.
            with zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED) as zf:
                for name in sorted(files):
                    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
                    info.external_attr = (stat.S_IFREG | 0o644) << 16
                    zf.writestr(info, files[name])
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(partial, path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise EvidenceError(f"Cannot write {path}: {exc.strerror or exc}.") from None
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_zip(path: Path) -> dict[str, bytes]:
    """The package's files by name; refuses what no exporter writes (directories, absolute or
    parent paths, duplicates, more than the limits)."""
    try:
        zf = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise UsageError(f"No such file: {path}.") from None
    except (zipfile.BadZipFile, OSError) as exc:
        raise PackageUnreadable(f"{path} is not a readable zip file ({exc}).") from None
    with zf:
        members = zf.infolist()
        if len(members) > MAX_MEMBERS or sum(m.file_size for m in members) > MAX_UNPACKED:
            raise PackageUnreadable(f"{path} unpacks to more than an evidence package may hold.")
        files: dict[str, bytes] = {}
        for member in members:
            name = member.filename
            parts = PurePosixPath(name).parts
            if (member.is_dir() or name.startswith("/") or "\\" in name or ".." in parts
                    or name in files):
                raise PackageUnreadable(f"{path} holds an entry no evidence package has: "
                                        f"{name!r}.")
            if member.flag_bits & 0x1:
                # No exporter encrypts a member; zipfile would ask for a password.
                raise PackageUnreadable(f"{path}: {name} is encrypted (zip password "
                                        "protection), which no evidence package uses.")
            try:
                files[name] = zf.read(member)
            except (zipfile.BadZipFile, OSError, NotImplementedError, RuntimeError,
                    zlib.error, EOFError, ValueError) as exc:
                # Damaged compressed data (zlib.error, EOFError), a bad CRC (BadZipFile),
                # an unsupported method (NotImplementedError): the package is refused.
                raise PackageUnreadable(f"{path}: {name} cannot be read, its compressed data "
                                        f"is damaged or unsupported ({exc}).") from None
    return files


def _recipient(path: Path) -> Recipient:
    """The --for certificate, checked as a viewer certificate is before keys are wrapped to
    it (key type and size, validity now, key usage, its OAEP hash); whom to trust is the
    exporter's decision in naming the file, so a CA-issued certificate is accepted too."""
    import datetime as dt

    from client.cli import _load_cert
    from keyservice.certs import validate_viewer_certificate
    cert = _load_cert(path)
    assert cert is not None
    try:
        oaep_hash = validate_viewer_certificate(cert, now=dt.datetime.now(dt.UTC),
                                                trust_decision=False)
    except CertificateError as exc:
        raise CertificateError(f"{path}: {exc}") from None
    return Recipient(cert, oaep_hash)


# --- commands --------------------------------------------------------------------------------
@evidence_app.command("export")
def export(
    camera: CameraOpt,
    from_: Annotated[str, typer.Option("--from", help="Start: ISO 8601 (UTC unless an offset "
                                       "is given), relative (-10m, -2h) or 'now'.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The package (a .zip).")],
    to: Annotated[str, typer.Option("--to", help="End, same forms as --from.")] = "now",
    for_: Annotated[Path | None, typer.Option(
        "--for", help="Seal the minute keys to this recipient certificate (PEM): only its "
                      "token can then check the keys and the video.")] = None,
    archiver: ArchiverOpt = DEFAULT_URL,
    token: TokenOpt = ...,  # type: ignore[assignment]
    archiver_cert: ArchiverCertOpt = None,
    tls_ca: TlsCaOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No summary.")] = False,
) -> None:
    """Export a recorded range as an evidence package: the segments and signed manifests as
    archived, the Archiver's certificate, exactly the range's minute keys, the verified video
    and SHA256SUMS."""
    from client.cli import _check_camera, _load_cert, _login, _now_ms, _open_identity
    from client.player import Player, archiver_pin_check
    from client.session import ArchiverSession, playback_request
    from keyservice.timespec import parse_range

    from_ms, to_ms = parse_range(from_, to, _now_ms())
    _check_camera(camera)
    if output.is_dir():
        raise UsageError(f"{output} is a directory; give a file name for the package.")
    if not output.parent.is_dir() or not os.access(output.parent, os.W_OK):
        # Checked before the Archiver and the token are bothered.
        raise UsageError(f"Cannot write the package into {output.parent}: not a writable "
                         "directory.")
    recipient = _recipient(for_) if for_ is not None else None
    explicit = _load_cert(archiver_cert)
    video = _Memory()
    received: deque[bytes] = deque()
    with ExitStack() as stack:
        session = stack.enter_context(ArchiverSession(archiver, tls_ca=tls_ca))
        identity = _open_identity(stack, token)
        login = _login(session, identity, archiver, explicit)
        asked = playback_request(camera, from_ms, to_ms)
        player = Player(identity, archiver_pin_check(login.archiver_fingerprint), video,
                        request=asked)
        with session.recording(camera, from_ms, to_ms, asked) as chunks:
            for chunk in chunks:
                received.append(chunk)
                player.feed(chunk)
        summary = player.finish()  # verified: signed END, complete range, nothing missing
        keys = {key_id: k.key for key_id, k in player.verified_keys.items()}
        header = player.header
        assert header is not None
    collected = collect(_records(received), camera, keys)
    archiver_certificate = x509.load_der_x509_certificate(header.archiver_cert_der)
    files = build_package(camera=camera, from_ms=from_ms, to_ms=to_ms,
                          archiver_cert=archiver_certificate, collected=collected, keys=keys,
                          video=video.data(), exported_ms=_now_ms(), recipient=recipient)
    digest = write_zip(output, files)
    if not quiet:
        key_count = len({decode_record(raw).key_id for raw in collected.segments})  # type: ignore[union-attr]
        sealed = (f" sealed to {recipient.certificate.subject.rfc4514_string()}"
                  if recipient is not None else "")
        _say(f"evidence package {output}: camera {camera}, {summary.segments} segment(s), "
             f"{len(collected.manifests)} signed manifest(s), {key_count} minute key(s)"
             f"{sealed}, {len(video.data())} bytes of video")
        _say(f"package sha256 {digest} (write it down for the chain of custody)")
        for gap in sorted(summary.gaps, key=lambda g: g.from_ms):
            _say(f"gap: {gap.describe()}")


def _records(received: deque[bytes]) -> Iterator[tuple[Record, bytes]]:
    """The stream's records again, each chunk dropped once split: the export does not hold
    the stream twice."""
    splitter = RecordSplitter()
    while received:
        for record, raw in splitter.iter_feed(received.popleft()):
            yield record, bytes(raw)


class _Memory:
    """The verified video of an export, in memory until the package is written."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> None:
        self._parts.append(data)

    def commit(self) -> None:
        return None

    def abort(self) -> None:
        self._parts.clear()

    def data(self) -> bytes:
        if len(self._parts) != 1:
            self._parts = [b"".join(self._parts)]
        return self._parts[0]


@evidence_app.command("verify")
def verify(
    package: Annotated[Path, typer.Argument(help="The evidence package (.zip).")],
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Write the verified video here (only if everything verified).")
                      ] = None,
    expect_archiver: Annotated[str | None, typer.Option(
        "--expect-archiver", help="The Archiver certificate's SHA-256 (hex) you know from "
                                  "elsewhere; the package must carry that certificate.")] = None,
    site_ca: Annotated[list[Path] | None, typer.Option(
        "--site-ca", help="A site CA certificate (PEM; may be repeated) you trust to have "
                          "issued the Archiver's signing certificate.")] = None,
    token: Annotated[str | None, typer.Option(
        "--token",
        help="Only for keys sealed to a recipient (--for): the recipient's PKCS#11 URI.")] = None,
) -> None:
    """Verify a package offline, with no token and no Archiver: signatures, manifest chain,
    digests, key commitments, decryption and the video. Prints a report; exits 0 only if
    everything verified, the package holds the whole range, and the signer was established
    (--expect-archiver or --site-ca)."""
    from client.player import FileOutput

    expected = None
    if expect_archiver is not None:
        try:
            expected = bytes.fromhex(expect_archiver.replace(":", ""))
        except ValueError:
            expected = b""
        if len(expected) != 32:
            raise UsageError("--expect-archiver takes a SHA-256 fingerprint: 64 hex digits.")
    cas = [_load_ca(path) for path in site_ca or ()]
    out = FileOutput(output) if output is not None else None
    try:
        files = read_zip(package)
        with ExitStack() as stack:
            open_keys: Callable[[bytes], bytes] | None = None
            if token is not None:
                uri = token

                def with_token(sealed: bytes) -> bytes:
                    # The token is opened only for a package whose keys are sealed.
                    from client.cli import _open_identity
                    return open_sealed_keys(sealed, _open_identity(stack, uri))
                open_keys = with_token
            report = verify_package(files, open_keys=open_keys, expect_archiver=expected,
                                    site_cas=cas)
    except BaseException:
        if out is not None:
            out.abort()
        raise
    for line in describe(report, package):
        typer.echo(printable(line))
    if report.failures:
        if out is not None:
            out.abort()
        _say(f"NOT VERIFIED: {report.failures[0]}")
        raise SystemExit(EXIT_NOT_VERIFIED)
    if report.not_checked:
        if out is not None:
            out.abort()
        _say("PARTLY VERIFIED: the keys are sealed to a recipient; give --token with the "
             "recipient's token to check the keys and the video.")
        raise SystemExit(EXIT_PARTLY_VERIFIED)
    if report.missing:
        if out is not None:
            out.abort()
        _say(f"INCOMPLETE: the package lacks signed parts of the range: {report.missing[0]}.")
        raise SystemExit(EXIT_INCOMPLETE)
    if report.signer_established is None:
        if out is not None:
            out.abort()
        _say("CONSISTENT, SIGNER NOT ESTABLISHED: any Archiver key could have signed this; "
             "give --expect-archiver with the fingerprint you know, or --site-ca.")
        raise SystemExit(EXIT_SIGNER_NOT_ESTABLISHED)
    if out is not None:
        assert report.video is not None
        out.write(report.video)
        final = out.commit()
        typer.echo(f"verified video written to {printable(str(final))}")


def _load_ca(path: Path) -> x509.Certificate:
    """A --site-ca certificate: readable PEM (or DER) and a CA (basic constraints)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"No such file: {path}.") from None
    except OSError as exc:
        raise UsageError(f"Cannot read {path}: {exc.strerror or exc}.") from None
    try:
        cert = (x509.load_pem_x509_certificate(data) if b"-----BEGIN" in data
                else x509.load_der_x509_certificate(data))
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except (ValueError, x509.ExtensionNotFound):
        raise CertificateError(f"{path} is not a readable CA certificate (PEM or DER with "
                               "basic constraints).") from None
    if not is_ca:
        raise CertificateError(f"{path} is not a CA certificate (basic constraints: not a CA).")
    return cert


def describe(report: Report, package: Path) -> list[str]:
    """The human-readable report."""
    from keyservice.timespec import format_ms

    def when(ms: int | None) -> str:
        return format_ms(ms) if ms is not None else "?"

    lines = [f"Evidence package {package}"]
    if report.camera is not None:
        lines.append(f"  camera:      {report.camera}")
        lines.append(f"  range:       {when(report.from_ms)} .. {when(report.to_ms)}")
        if report.exported_signed:
            lines.append(f"  served:      {when(report.exported_ms)} by the Archiver to viewer "
                         f"certificate sha256 {report.exported_by} (signed by the Archiver)")
        else:
            lines.append(f"  exported:    {when(report.exported_ms)} by viewer certificate "
                         f"sha256 {report.exported_by} (as the package states; not signed)")
    if report.archiver_sha256 is not None:
        lines.append(f"  Archiver:    {report.archiver_subject}")
        lines.append(f"               certificate sha256 {report.archiver_sha256}")
        lines.append("               " + (
            f"signer established: {report.signer_established}"
            if report.signer_established is not None else
            "signer NOT established: no --expect-archiver or --site-ca was given, so any "
            "Archiver key could have made this package"))
    if report.segments:
        lines.append(f"  video:       {report.segments} segment(s) captured "
                     f"{when(report.first_ms)} .. {when(report.last_ms)}, "
                     f"{report.manifests} signed manifest(s), {report.keys} minute key(s)")
    lines.append("Verified:")
    lines += [f"  ok  {item}" for item in report.verified] or ["  (nothing)"]
    if report.not_checked:
        lines.append("Not checked:")
        lines += [f"  --  {item}" for item in report.not_checked]
    lines.append("Gaps:")
    lines += [f"  {gap}" for gap in report.gaps] or ["  none in the signed data"]
    if report.notes:
        lines.append("Notes:")
        lines += [f"  {note}" for note in report.notes]
    if report.missing:
        lines.append("Missing (named by the Archiver's signed data, not in the package):")
        lines += [f"  --  {item}" for item in report.missing]
    if report.failures:
        lines.append("FAILED:")
        lines += [f"  !!  {failure}" for failure in report.failures]
        lines.append(f"Result: NOT VERIFIED ({len(report.failures)} problem(s))")
    elif report.not_checked:
        lines.append("Result: PARTLY VERIFIED (see 'Not checked')")
    elif report.missing:
        lines.append("Result: INCOMPLETE. What the package holds verified, but it is only part "
                     "of the range: see 'Missing'"
                     + ("" if report.signer_established is not None else
                        " (and the signer was not established)") + ".")
    elif report.signer_established is None:
        lines.append("Result: CONSISTENT, SIGNER NOT ESTABLISHED. The package is consistent "
                     "with the certificate it carries, but nothing shows that certificate is "
                     "your Archiver's: give --expect-archiver or --site-ca.")
    else:
        lines.append("Result: VERIFIED. The video is exactly the decryption of segments the "
                     "Archiver named above recorded and signed for this camera, and it covers "
                     "the whole range (see Gaps for stretches with no recording).")
    return lines

