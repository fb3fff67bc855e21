"""fusion-archiver identity: the Archiver's identity in its site (issue 21). ``csr`` makes a
PKCS#10 request signed on the Archiver's token by its signing key (the key never leaves the
token); ``import`` keeps the certificate the site CA issued for it, after checking it, so that
``serve`` presents it in every stream without --signing-cert. archiver/cli.py registers them.

Thin: argument parsing and output; every failure is one of keyservice.errors' errors, which
fusion-archiver's main() turns into one sentence and a non-zero exit code.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from keyservice.errors import UsageError

if TYPE_CHECKING:

    from archiver.settings import Settings

__all__ = ["identity_app"]

# rich_markup_mode=None: plain help, without ~80 ms of rich and pygments imports (issue 23).
identity_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                           help="The Archiver's identity in its site: a CSR made on its token "
                                "(csr), and the certificate the site CA issued for it (import).")

DataOpt = Annotated[Path, typer.Option("--data", help="The Archiver's data directory.")]
SignerTokenOpt = Annotated[str | None, typer.Option(
    "--signer-token", help="PKCS#11 URI of the Archiver's signing token (default: the SoftHSM "
    "token in the data directory, made on first use).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object, for scripts.")]


def _settings(data: Path, signer_token: str | None, name: str | None = None) -> Settings:
    from archiver.settings import Settings

    if data.exists() and not data.is_dir():
        raise UsageError(f"{data} is not a directory; give the Archiver's data directory.")
    return Settings(data_dir=data.resolve(), signer_token_uri=signer_token,
                    **({"archiver_name": name} if name else {}))


@identity_app.command("csr")
def csr(
    data: DataOpt,
    output: Annotated[str, typer.Option(
        "--output", "-o", help="Where to write the request (PEM), or '-' for standard output.")],
    name: Annotated[str | None, typer.Option(
        "--name", envvar="FUSION_ARCHIVER_NAME", show_envvar=True,
        help="The Archiver's name in its site, the request's subject CN (default: the host "
             "name, as serve --name).")] = None,
    signer_token: SignerTokenOpt = None,
) -> None:
    """Write a certificate signing request for the Archiver's signing key, signed on its token;
    give it to the site CA, then import the certificate it issues (identity import)."""
    from cryptography.hazmat.primitives.serialization import Encoding

    from archiver.datadir import DIR_MODE
    from archiver.signing import make_csr
    from keyservice.text import printable

    settings = _settings(data, signer_token, name)
    target = None if output == "-" else Path(output)
    if target is not None and target.is_dir():
        raise UsageError(f"{target} is a directory; give a file name for the request.")
    settings.data_dir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    request = make_csr(settings, settings.archiver_name)
    pem = request.public_bytes(Encoding.PEM)
    if target is None:
        sys.stdout.buffer.write(pem)
        sys.stdout.flush()
        return
    try:
        target.write_bytes(pem)
    except OSError as exc:
        raise UsageError(f"Cannot write {target}: {exc.strerror or exc}.") from None
    typer.echo(printable(f"wrote a certificate signing request for CN={settings.archiver_name} "
                         f"to {target}; have the site CA sign it (key usage digitalSignature, "
                         "not a CA), then run 'fusion-archiver identity import'."), err=True)


@identity_app.command("import")
def import_(
    certificate: Annotated[Path, typer.Argument(
        help="The certificate (PEM or DER) the site CA issued for this Archiver's CSR.")],
    data: DataOpt,
    site_ca: Annotated[list[Path] | None, typer.Option(
        "--site-ca", help="Check that this site CA (PEM; repeatable) issued it.")] = None,
    signer_token: SignerTokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Keep the site CA's certificate for the signing key: checked to be for this very key,
    valid now, allowed to sign, not a CA, and issued by --site-ca if given. serve presents it
    from its next start (serve --signing-cert still overrides it)."""
    from archiver.admin_cli import echo_result
    from archiver.signing import import_certificate
    from keyservice.identity import fingerprint

    settings = _settings(data, signer_token)
    if signer_token is None and not (settings.token_dir / "softhsm2.conf").exists():
        raise UsageError(f"No signing token in {data}; make the CSR there first "
                         "(fusion-archiver identity csr --data DIR), or give --signer-token.")
    from keyservice.certs import load_certificate_file

    cert = load_certificate_file(certificate)
    cas = [load_certificate_file(path) for path in site_ca or ()]
    path = import_certificate(settings, cert, cas)
    subject = cert.subject.rfc4514_string()
    fp = fingerprint(cert).hex()
    echo_result(as_json, {"subject": subject, "issuer": cert.issuer.rfc4514_string(),
                          "fingerprint": fp, "stored_in": str(path)},
                f"imported {subject} (sha256 {fp}), issued by {cert.issuer.rfc4514_string()}, "
                f"into {path}; the Archiver presents it from its next start")
