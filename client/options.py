"""The options shared by the viewer's commands (cli.py, grants.py, evidence.py): one
definition each, so every command names and explains them alike."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = ["DEFAULT_CLOCK_SKEW_S", "DEFAULT_URL", "MAX_LIVE_S", "ArchiverCertOpt", "ArchiverOpt",
           "CameraOpt", "JsonOpt", "OutputOpt", "QuietOpt", "SaveOpt", "SiteCaOpt", "TlsCaOpt",
           "TokenOpt"]

DEFAULT_URL = "http://127.0.0.1:8080"
# Option bounds and defaults that help shows, written here so that building the CLI imports no
# library (issue 23: --help loads neither httpx nor cryptography). They are the library's
# values, client.session.MAX_LIVE_S and keyservice.request_policy.DEFAULT_MAX_SKEW_MS /
# 1000 (tests/test_startup_imports.py checks that they agree).
MAX_LIVE_S = 86_400
DEFAULT_CLOCK_SKEW_S = 30.0

ArchiverOpt = Annotated[str, typer.Option("--archiver", envvar="FUSION_ARCHIVER_URL",
                                          help="The Archiver's base URL.")]
TokenOpt = Annotated[str, typer.Option(
    "--token", envvar="FUSION_TOKEN",
    help="PKCS#11 URI of your viewer key, e.g. 'pkcs11:token=viewers;object=alice'. The PIN comes "
         "from pin-value/pin-source in the URI, FUSION_PIN, or a prompt.")]
CameraOpt = Annotated[str, typer.Option("--camera", help="Camera name.")]
OutputOpt = Annotated[str, typer.Option("--output", "-o",
                                        help="Output MPEG-TS file, or '-' for standard output.")]
ArchiverCertOpt = Annotated[Path | None, typer.Option(
    "--archiver-cert", help="Pin this Archiver certificate (PEM) instead of trusting on first "
                            "use; also replaces an older pin after a legitimate key change.")]
SiteCaOpt = Annotated[Path | None, typer.Option(
    "--site-ca", envvar="FUSION_SITE_CA",
    help="Your site CA's certificate (PEM): accept any Archiver whose signing certificate it "
         "issued, for any Archiver URL of the site, without a pin; refuse every other. Pins "
         "(--archiver-cert, known_archivers) still apply beside it.")]
TlsCaOpt = Annotated[Path | None, typer.Option(
    "--tls-ca", envvar="FUSION_TLS_CA",
    help="The site CA's certificate (PEM): the only CA the Archiver's HTTPS certificate is "
         "verified against (default: the system's CAs).")]
SaveOpt = Annotated[Path | None, typer.Option(
    "--save-stream", help="Also keep the raw fusion stream (encrypted, signed) in this file, "
                          "e.g. as evidence a third party can verify with 'fusion-client open'.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar, no summary.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]
