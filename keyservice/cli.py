"""fusion-keys: enrol and manage token-bound viewer identities (a thin CLI over keyservice.token).

Every failure is one sentence on stderr and a non-zero exit code (``error.exit_code``); never a
traceback: commands let errors through to ``keyservice.cli_support.run``, the path all three CLIs share.
"""

from __future__ import annotations

import enum
import getpass
import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from keyservice.cli_support import add_version_option, hidden_aliases, run, tidy_help
from keyservice.errors import UsageError
from keyservice.text import printable

if TYPE_CHECKING:
    from keyservice.token import Token

# The commands import the token layer and certificates (pkcs11, cryptography) when they run,
# not when the CLI is built: `fusion-keys --help` loads neither (issue 23). What help shows of
# them is written here: keyservice.certs.VIEWER_DAYS (tests/test_startup_imports.py checks it).
VIEWER_DAYS = 730

# rich_markup_mode=None: plain help, without ~80 ms of rich and pygments imports (issue 23).
app = typer.Typer(
    name="fusion-keys",
    rich_markup_mode=None,
    help="Enrol and manage viewer identities whose private keys live in a PKCS#11 token.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
add_version_option(app, "fusion-keys")
# --output (-o), as fusion-client names it; --out, the old spelling, keeps working.
hidden_aliases(app, {"out": "output"})

TokenOpt = Annotated[str, typer.Option(
    "--token", envvar="FUSION_TOKEN", metavar="URI",
    help="PKCS#11 URI, e.g. 'pkcs11:token=viewers;object=alice?module-path=...'. The PIN comes "
         "from pin-source/pin-value in the URI, $FUSION_PIN, or a prompt.")]


class KeyChoice(enum.StrEnum):
    rsa2048 = "rsa2048"
    rsa3072 = "rsa3072"
    rsa4096 = "rsa4096"


class KeyTypeChoice(enum.StrEnum):
    auto = "auto"
    rsa = "rsa"
    ec = "ec"


def _echo(message: str, err: bool = False) -> None:
    # Labels, subjects and token errors come from tokens and certificates: escape their
    # control characters (the line breaks of our own messages stay).
    typer.echo(printable(message, newlines=True), err=err)


def _open(uri: str) -> Token:
    # Imported here so `fusion-keys --help` and softhsm-init work without loading pkcs11.
    from keyservice.token import Token

    return Token.open(uri, prompt=True)


def _object_name(uri: str) -> str:
    from keyservice.pkcs11uri import Pkcs11Uri

    parsed = Pkcs11Uri.parse(uri)
    if parsed.object is None:
        raise UsageError("The token URI names no identity; add ;object=NAME, e.g. "
                         "pkcs11:token=viewers;object=alice.")
    return parsed.object


def _so_pin(source: Path | None) -> str:
    """The SO PIN: --so-pin-source file, $FUSION_SO_PIN, or a prompt (never retried)."""
    if source is not None:
        try:
            return source.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"Cannot read the SO PIN file {source} "
                             f"({getattr(exc, 'strerror', None) or 'not UTF-8 text'}).") from None
    env = os.environ.get("FUSION_SO_PIN")
    if env:
        return env
    if sys.stdin is not None and sys.stdin.isatty():
        return getpass.getpass("SO PIN (PIV card: management key in hex): ")
    raise UsageError("This token needs its SO PIN (a PIV card's management key in hex); give "
                     "--so-pin-source FILE, set FUSION_SO_PIN, or run interactively.")


def _refuse_existing(path: Path) -> None:
    if path.exists():
        raise UsageError(f"{path} already exists; choose another --output or remove it first.")
    if not path.parent.is_dir():
        raise UsageError(f"The directory {path.parent} does not exist; create it or choose "
                         "another --output.")


def _write(path: Path, data: bytes) -> None:
    try:
        with path.open("xb") as handle:  # "x": never overwrite a file created meanwhile
            handle.write(data)
    except OSError as exc:
        raise UsageError(f"Cannot write {path} ({exc.strerror}); check the path and "
                         "permissions.") from None


@app.command()
def enroll(
    token: TokenOpt,
    out: Annotated[Path, typer.Option("--output", "-o", help="Where to write the certificate (or CSR) "
                                                    "PEM.")],
    key_type: Annotated[KeyTypeChoice, typer.Option(
        "--key-type", help="ec (P-256, ECDH) or rsa; auto: ec where the token can do ECDH, as "
                           "it is 10-20x cheaper on a card than an RSA decryption.")
    ] = KeyTypeChoice.auto,
    key: Annotated[KeyChoice | None, typer.Option(
        "--key", help="RSA key size (implies --key-type rsa; default rsa3072).")] = None,
    csr: Annotated[bool, typer.Option("--csr", help="Write a CSR for a site CA instead of a "
                                                    "self-signed certificate.")] = False,
    days: Annotated[int, typer.Option("--days", min=1, max=3650,
                                      help="Certificate validity in days.")] = VIEWER_DAYS,
    so_pin_source: Annotated[Path | None, typer.Option(
        "--so-pin-source", metavar="FILE",
        help="PIV cards through ykcs11: a file holding the card's management key in hex (the SO "
             "PIN); else $FUSION_SO_PIN or a prompt.")] = None,
    piv_slot: Annotated[str, typer.Option(
        "--piv-slot", help="PIV cards through ykcs11: the key slot (9d = key management, meant "
                           "for decryption).")] = "9d",
) -> None:
    """Generate a viewer key pair inside the token and export its certificate (public part)."""
    from keyservice import certs
    from keyservice.keyscheme import KeyScheme
    from keyservice.token import enroll_piv, token_kind

    name = _object_name(token)
    _refuse_existing(out)
    if key is not None and key_type is KeyTypeChoice.ec:
        raise UsageError("--key sets an RSA size; drop it for --key-type ec.")
    kind = "rsa" if key is not None else key_type.value
    bits = int((key or KeyChoice.rsa3072).value.removeprefix("rsa"))
    if token_kind(token) == "ykcs11":
        # A PIV card: fixed slots, and key generation needs the management key (SO PIN).
        kind = "ec" if kind == "auto" else kind  # every PIV card does ECDH P-256
        result = enroll_piv(token, name, so_pin=_so_pin(so_pin_source), prompt=True,
                            slot=piv_slot, bits=bits if key else 2048, days=days, csr=csr,
                            key_type=kind)
        where = f"slot {piv_slot.upper()} of the PIV card"
        use = (f" Use it as pkcs11:id=%{result.key_id.hex()} (with the card's module-path); "
               f"its label there is '{result.label}'.")
    else:
        with _open(token) as tok:
            if kind == "auto":
                kind = "ec" if tok.supports_ec_viewers() else "rsa"
            result = tok.enroll(name, bits=bits, days=days, csr=csr, key_type=kind)
        where, use = f"token '{tok.label}'", ""
    _write(out, result.pem())
    if result.oaep_hash is KeyScheme.ECDH_P256:
        scheme = "EC P-256, ECDH epoch openers"
    else:
        hash_note = ("" if result.oaep_hash is KeyScheme.RSA_OAEP_SHA256
                     else " (this token cannot do SHA-256)")
        scheme = (f"RSA-{result.key_bits}, RSA-OAEP with "
                  f"{certs.oaep_hash_name(result.oaep_hash)}{hash_note}")
    _echo(f"Enrolled '{name}' on {where}: {scheme}.{use}")
    if result.certificate is not None:
        summary = certs.summarize(result.certificate)
        _echo(f"Certificate written to {out}; fingerprint sha256:{summary.fingerprint_hex}"
                   f"; valid until {summary.not_after:%Y-%m-%d}.")
    else:
        _echo(f"CSR written to {out}; have the site CA sign it, then run "
                   "fusion-keys import-cert --token URI CERT.pem.")


@app.command("import-cert")
def import_cert(
    token: TokenOpt,
    cert_file: Annotated[Path, typer.Argument(metavar="CERT.pem",
                                              help="The certificate the site CA issued.")],
) -> None:
    """Store a CA-issued certificate on the token, next to the key it belongs to."""
    from keyservice import certs
    from keyservice.pkcs11uri import Pkcs11Uri

    try:
        data = cert_file.read_bytes()
    except OSError as exc:
        raise UsageError(f"Cannot read {cert_file} ({exc.strerror}).") from None
    cert = certs.load_certificate(data)
    with _open(token) as tok:
        result = tok.import_certificate(cert, Pkcs11Uri.parse(token).object)
    _echo(f"Stored the certificate for '{result.label}' on token '{tok.label}'.")
    if not result.recorded:
        _echo(f"Note: the CA dropped the OAEP-hash extension; this token opens "
                   f"{certs.oaep_hash_name(result.oaep_hash)}, so give '--key-scheme "
                   f"{result.oaep_hash.label}' when authorizing this viewer on the Archiver.")


@app.command("list")
def list_(token: TokenOpt) -> None:
    """List the keys on the token: key type, the OAEP hashes the token opens with each (measured;
    '*' = recorded in the certificate), expiry, fingerprint, certificate subject and issuer."""
    with _open(token) as tok:
        infos = tok.identities()
    if not infos:
        _echo(f"Token '{tok.label}' holds no identities; create one with "
                   "fusion-keys enroll.")
        return
    _echo(f"{'NAME':<20} {'KEY':<9} {'OAEP':<12} {'EXPIRES':<11} FINGERPRINT (SHA-256)")
    for info in infos:
        kind = f"{info.kind.upper()}-{info.key_bits}" if info.kind == "rsa" else "EC-P256"
        # Measured on the token; the hash the certificate records (if any) is marked '*'.
        # The OAEP hashes the token opens, short spelling (sha256,sha1), as before issue 24.
        oaep = ",".join(h.legacy_label + ("*" if h is info.oaep_hash else "")
                        for h in info.oaep_hashes) or "-"
        expires = f"{info.not_after:%Y-%m-%d}" if info.not_after else "-"
        fp = info.fingerprint_hex or "(no certificate: run fusion-keys import-cert)"
        _echo(f"{printable(info.label):<20} {kind:<9} {oaep:<12} {expires:<11} {fp}")
        if info.subject is not None:
            _echo(f"    id {info.id_hex}  subject: {info.subject}  issuer: {info.issuer}")


@app.command()
def adopt(
    token: TokenOpt,
    out: Annotated[Path, typer.Option("--output", "-o", help="Where to write the certificate PEM for "
                                                    "the Archiver.")],
    site_ca: Annotated[list[Path] | None, typer.Option(
        "--site-ca", help="The site CA the certificate must chain to (repeatable), as the "
                          "Archiver will check it.")] = None,
) -> None:
    """Use a key + certificate already on the token (e.g. a site-issued identity in PIV slot 9D).

    Checks that they match, that the certificate is a valid viewer certificate (issued by
    --site-ca), that the token decrypts with the key and with which RSA-OAEP hash; writes the
    certificate and prints the exact fusion-archiver command to authorize it.
    """
    from keyservice import certs

    _refuse_existing(out)
    cas = []
    for path in site_ca or ():
        try:
            cas.append(certs.load_certificate(path.read_bytes()))
        except OSError as exc:
            raise UsageError(f"Cannot read the site CA {path} ({exc.strerror}).") from None
    with _open(token) as tok:
        result = tok.adopt(site_ca=tuple(cas))
    _write(out, certs.certificate_pem(result.certificate))
    summary = certs.summarize(result.certificate)
    _echo(f"Adopted '{result.label}' (id {result.key_id.hex()}) on token '{tok.label}': "
               f"{'EC-P256' if result.oaep_hash.is_ec else f'RSA-{summary.key_bits}'}, "
               f"{summary.subject}, issued by "
               f"{result.certificate.issuer.rfc4514_string()}; valid until "
               f"{summary.not_after:%Y-%m-%d}; token operation {result.decrypt_ms:.1f} ms.")
    _echo(f"Certificate written to {out}; fingerprint sha256:{summary.fingerprint_hex}.")
    flag = "" if result.recorded else f" --key-scheme {result.oaep_hash.label}"
    why = ("the certificate fixes its scheme" if result.recorded else
           f"the certificate does not record its OAEP hash; this token opens "
           f"{certs.oaep_hash_name(result.oaep_hash)}")
    _echo(f"Authorize it on the Archiver ({why}):\n"
               f"  fusion-archiver viewers add {shlex.quote(str(out))}{flag} --cameras CAMERAS")


@app.command()
def export(
    token: TokenOpt,
    out: Annotated[Path, typer.Option("--output", "-o", help="Where to write the certificate PEM.")],
) -> None:
    """Write the identity's certificate (public part only) as PEM."""
    from keyservice import certs

    _refuse_existing(out)
    with _open(token) as tok:
        ident = tok.identity()
        pem = certs.certificate_pem(ident.certificate)
    _write(out, pem)
    _echo(f"Certificate of '{ident.label}' written to {out}.")


@app.command()
def selftest(token: TokenOpt) -> None:
    """Wrap a random key to the certificate in software, unwrap it on the token, compare."""
    from keyservice import certs
    from keyservice.keyscheme import KeyScheme

    with _open(token) as tok:
        result = tok.selftest()
    scheme = ("EC P-256, ECDH" if result.oaep_hash is KeyScheme.ECDH_P256 else
              f"RSA-{result.key_bits}, RSA-OAEP with "
              f"{certs.oaep_hash_name(result.oaep_hash)}")
    _echo(f"Self-test passed for '{result.label}': {scheme}, token operation "
               f"{result.decrypt_ms:.1f} ms; fingerprint sha256:{result.fingerprint_hex}.")


@app.command()
def delete(
    token: TokenOpt,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete an identity (certificate and key pair) from the token. This cannot be undone."""
    name = _object_name(token)
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError("Refusing to delete without confirmation; pass --yes.")
        typer.confirm(f"Delete '{name}' and its private key for good? Streams encrypted to "
                      "it can then never be opened", abort=True)
    with _open(token) as tok:
        count = tok.delete(name)
    _echo(f"Deleted '{name}' ({count} objects) from token '{tok.label}'.")


@app.command("softhsm-init")
def softhsm_init(
    directory: Annotated[Path, typer.Option("--dir", help="Directory for the SoftHSM config "
                                                          "and token files.")],
    label: Annotated[str, typer.Option("--label", help="Token label.")],
    pin: Annotated[str, typer.Option("--pin", help="User PIN (4-255 characters).")],
    so_pin: Annotated[str, typer.Option("--so-pin", help="Security officer PIN.")],
) -> None:
    """For developers: create a SoftHSM token in DIR and print the SOFTHSM2_CONF line to use."""
    from keyservice.softhsm import init_softhsm

    conf = init_softhsm(directory, label, pin, so_pin)
    _echo(f"Created SoftHSM token '{label}' in {conf.parent}. Use it with:", err=True)
    _echo(f"export SOFTHSM2_CONF={shlex.quote(str(conf))}")


tidy_help(app)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the fusion-keys console script."""
    run(app, "fusion-keys", argv)


if __name__ == "__main__":
    main()
