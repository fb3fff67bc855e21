"""fusion-client evidence: export a camera's time range as a package a third party verifies
without any token, and verify such a package offline (docs/evidence.md).

Thin: the package format and every check live in ``keyservice.evidence`` (pure: layout,
build, verify), the export in ``client.viewer.export_evidence`` and the zip file in
``client.evidence_zip``; this module owns options, messages and exit codes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from client.options import (
    DEFAULT_URL,
    ArchiverCertOpt,
    ArchiverOpt,
    CameraOpt,
    SiteCaOpt,
    TlsCaOpt,
    TokenOpt,
)
from keyservice.errors import CertificateError, UsageError
from keyservice.exitcodes import ExitCode
from keyservice.text import printable
from keyservice.timespec import format_ms

if TYPE_CHECKING:
    from cryptography import x509

    from client.evidence_zip import read_zip, write_zip
    from keyservice.evidence.parts import PartsReport
    from keyservice.evidence.verify import Report
    from keyservice.identity import Identity, Recipient

# The commands import the viewer library and the verifier (cryptography, httpx, the token
# layer) when they run, not when the CLI is built: `fusion-client --help` loads none of it.

__all__ = ["EXIT_INCOMPLETE", "EXIT_NOT_VERIFIED", "EXIT_PARTLY_VERIFIED",
           "EXIT_SIGNER_NOT_ESTABLISHED", "describe", "evidence_app", "export", "read_zip",
           "verify", "write_zip"]

evidence_app = typer.Typer(no_args_is_help=True, add_completion=False, rich_markup_mode=None,
                           help="Evidence packages a third party verifies without any token: "
                                "export, verify.")

# The verdicts' exit codes (docs/evidence.md): a check failed (the report says which and why;
# client.evidence_zip's EXIT_NOT_VERIFIED); sealed keys and no token (all but keys and video
# verified); verified, but the signed data names recorded video the package lacks; consistent,
# but no trust anchor says whose key signed.
EXIT_NOT_VERIFIED = ExitCode.NOT_VERIFIED  # the same as client.evidence_zip's
EXIT_PARTLY_VERIFIED = ExitCode.PARTLY_VERIFIED
EXIT_INCOMPLETE = ExitCode.EVIDENCE_INCOMPLETE
EXIT_SIGNER_NOT_ESTABLISHED = ExitCode.SIGNER_NOT_ESTABLISHED


def _recipient(path: Path) -> Recipient:
    """The --for certificate, checked as a viewer certificate is before keys are wrapped to
    it (key type and size, validity now, key usage, its OAEP hash); whom to trust is the
    exporter's decision in naming the file, so a CA-issued certificate is accepted too."""
    from client.viewer import load_certificate_file, recipient_for

    cert = load_certificate_file(path)
    try:
        return recipient_for(cert)
    except CertificateError as exc:
        raise CertificateError(f"{path}: {exc}") from None


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
    site_ca: SiteCaOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No summary.")] = False,
) -> None:
    """Export a recorded range as an evidence package: the segments and signed manifests as
    archived, the Archiver's certificate, exactly the range's minute keys, the verified video
    and SHA256SUMS."""
    from client.across import export_across
    from client.pinning import KnownArchivers
    from client.playback import logged_in, say, switch_line
    from client.site import Site, Switch, trust_followed
    from client.viewer import check_camera, load_site_ca, now_ms
    from keyservice.timespec import parse_range

    from_ms, to_ms = parse_range(from_, to, now_ms())
    check_camera(camera)
    if output.is_dir():
        raise UsageError(f"{output} is a directory; give a file name for the package.")
    if not output.parent.is_dir() or not os.access(output.parent, os.W_OK):
        # Checked before the Archiver and the token are bothered.
        raise UsageError(f"Cannot write the package into {output.parent}: not a writable "
                         "directory.")
    recipient = _recipient(for_) if for_ is not None else None
    cas = load_site_ca(site_ca) if site_ca is not None else ()
    with logged_in(archiver, token, archiver_cert, tls_ca, site_ca) as (session, identity,
                                                                         login), \
            Site(session, login, identity,
                 check=trust_followed(KnownArchivers.default(), cas)) as site:
        # Each part from the Archiver that recorded it (reached as a redirect is, checked:
        # client/site.py), verified against its own signer; one part: a one-part package.
        made = export_across(site, identity, camera, from_ms, to_ms, output,
                             recipient=recipient)
    if quiet:
        return
    sealed = f" sealed to {made.sealed_to}" if made.sealed_to is not None else ""
    parts = made.parts
    segments = sum(p.verified.segments for _, p in parts)
    say(f"evidence package {output}: camera {camera}, {segments} segment(s), "
        f"{sum(p.manifests for _, p in parts)} signed manifest(s), "
        f"{sum(p.keys for _, p in parts)} minute key(s){sealed}, "
        f"{sum(len(p.verified.data or b'') for _, p in parts)} bytes of video"
        + (f", {len(parts)} parts" if len(parts) > 1 else ""))
    say(f"package sha256 {made.sha256} (write it down for the chain of custody)")
    for i, (part, exported) in enumerate(parts, 1):
        verified = exported.verified
        if len(parts) > 1:
            say(f"part {i} of {len(parts)}: {format_ms(part.from_ms)} .. {format_ms(part.to_ms)} "
                f"recorded by Archiver {part.archiver}, verified against "
                f"{verified.signer.subject} (sha256 {verified.signer.fingerprint[:16]}...): "
                f"{verified.segments} segment(s)")
        for gap in verified.gaps:
            if len(parts) > 1 and ((i > 1 and verified.first_ms is not None
                                    and gap.to_ms <= verified.first_ms)
                                   or (i < len(parts) and verified.last_ms is not None
                                       and gap.from_ms >= verified.last_ms)):
                continue  # at the switch: said once, as the switch
            say(f"gap: {gap.describe()}")
        if i < len(parts):
            nxt_part, nxt = parts[i]
            say(switch_line(Switch(part.archiver, nxt_part.archiver, verified.last_ms,
                                   nxt.verified.first_ms)))


@evidence_app.command("verify")
def verify(
    package: Annotated[Path, typer.Argument(help="The evidence package (.zip).")],
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Write the verified video here (only if everything verified).")
                      ] = None,
    expect_archiver: Annotated[list[str] | None, typer.Option(
        "--expect-archiver", help="The Archiver certificate's SHA-256 (hex) you know from "
                                  "elsewhere; the package must carry that certificate (may be "
                                  "repeated: a package of several parts, each signed by one "
                                  "of them).")] = None,
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
    from client.playback import say
    from client.player import FileOutput
    from client.viewer import open_identity
    from keyservice.evidence.parts import verify_evidence
    from keyservice.evidence.verify import open_sealed_keys

    expected: list[bytes] = []
    for given in expect_archiver or ():
        try:
            fp = bytes.fromhex(given.replace(":", ""))
        except ValueError:
            fp = b""
        if len(fp) != 32:
            raise UsageError("--expect-archiver takes a SHA-256 fingerprint: 64 hex digits.")
        expected.append(fp)
    cas = [_load_ca(path) for path in site_ca or ()]
    out = FileOutput(output) if output is not None else None
    try:
        from client.evidence_zip import read_zip

        files = read_zip(package)
        with ExitStack() as stack:
            open_keys: Callable[[bytes], bytes] | None = None
            if token is not None:
                uri = token
                opened: list[Identity] = []

                def with_token(sealed: bytes) -> bytes:
                    # The token is opened only for a package whose keys are sealed, and once
                    # (one PIN) for all the parts of a package of several.
                    if not opened:
                        opened.append(stack.enter_context(open_identity(uri, prompt=True)))
                    return open_sealed_keys(sealed, opened[0])
                open_keys = with_token
            report = verify_evidence(files, open_keys=open_keys, expect_archiver=expected,
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
        say(f"NOT VERIFIED: {report.failures[0]}")
        raise SystemExit(EXIT_NOT_VERIFIED)
    if report.not_checked:
        if out is not None:
            out.abort()
        say("PARTLY VERIFIED: the keys are sealed to a recipient; give --token with the "
             "recipient's token to check the keys and the video.")
        raise SystemExit(EXIT_PARTLY_VERIFIED)
    if report.missing:
        if out is not None:
            out.abort()
        say(f"INCOMPLETE: the package lacks signed parts of the range: {report.missing[0]}.")
        raise SystemExit(EXIT_INCOMPLETE)
    if report.signer_established is None:
        if out is not None:
            out.abort()
        say("CONSISTENT, SIGNER NOT ESTABLISHED: any Archiver key could have signed this; "
             "give --expect-archiver with the fingerprint you know, or --site-ca.")
        raise SystemExit(EXIT_SIGNER_NOT_ESTABLISHED)
    if out is not None:
        assert report.video is not None
        out.write(report.video)
        final = out.commit()
        typer.echo(f"verified video written to {printable(str(final))}")


def _load_ca(path: Path) -> x509.Certificate:
    """A --site-ca certificate: readable PEM (or DER) and a CA (basic constraints)."""
    from cryptography import x509

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
    from keyservice.evidence.parts import PartsReport

    if isinstance(report, PartsReport):
        return _describe_parts(report, package)
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
    return lines + _verdict(report)


def _verdict(report: Report, parts: bool = False) -> list[str]:
    """What is missing, the failures, and the one result line (``parts``: of a package of
    parts, each signed by its own Archiver)."""
    lines: list[str] = []
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
        who = ("each part's Archiver named above (each verified against its own "
               "certificate)" if parts else "the Archiver named above")
        lines.append("Result: VERIFIED. The video is exactly the decryption of segments "
                     f"{who} recorded and signed for this camera, and it covers the whole "
                     "range (see Gaps for stretches with no recording"
                     + ("; Switches for where one Archiver's part ends and the next one's "
                        "begins" if parts else "") + ").")
    return lines


def _describe_parts(report: PartsReport, package: Path) -> list[str]:
    """A package of parts: the whole, each part's own report (indented), the switches at
    their signed edges (as ``play`` says them), and one result."""
    from client.playback import switch_line
    from client.site import Switch

    def when(ms: int | None) -> str:
        return format_ms(ms) if ms is not None else "?"

    count = len(report.parts)
    lines = [f"Evidence package {package}: {count} part(s), each recorded and signed by its "
             "own Archiver"]
    if report.camera is not None:
        lines.append(f"  camera:      {report.camera}")
        lines.append(f"  range:       {when(report.from_ms)} .. {when(report.to_ms)}")
        lines.append(f"  exported:    {when(report.exported_ms)} by viewer certificate "
                     f"sha256 {report.exported_by}")
    for part in report.parts:
        lines.append(f"Part {part.number} of {count}: recorded by Archiver {part.archiver}")
        own = describe(part.report, package)[1:]
        verdict = len(_verdict(part.report))  # said once, for the whole package, below
        lines += ["  " + line for line in own[:len(own) - verdict]]
    if report.switches:
        lines.append("Switches (signed edges):")
        lines += ["  " + switch_line(Switch(s.from_archiver, s.to_archiver, s.last_end_ms,
                                            s.first_start_ms)) for s in report.switches]
    lines.append("The whole package:")
    lines += [f"  ok  {item}" for item in report.verified] or ["  (nothing)"]
    if report.notes:
        lines.append("Notes:")
        lines += [f"  {note}" for note in report.notes]
    if report.signer_established is not None:
        lines.append(f"  signers established: {report.signer_established}")
    return lines + _verdict(report, parts=True)


def __getattr__(name: str) -> object:
    # read_zip and write_zip, re-exported from client.evidence_zip on first use (zipfile and
    # hashlib are not needed to build the CLI).
    if name in ("read_zip", "write_zip"):
        from client import evidence_zip

        return getattr(evidence_zip, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
