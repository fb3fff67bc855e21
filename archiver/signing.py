"""The Archiver's own signing key, on its own PKCS#11 token.

By default a SoftHSM token created in the data directory on first start (its PIN in a 0600
file beside it: a development default; production names an HSM by PKCS#11 URI and gives the
PIN through FUSION_PIN or pin-source). The key signs manifests and end records; viewers pin its
certificate.
"""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path

from archiver.settings import Settings
from keyservice.identity import Signer
from keyservice.pkcs11uri import DEFAULT_MODULE
from keyservice.softhsm import init_softhsm
from keyservice.token import Token

DEFAULT_LABEL = "archiver"


def open_signer(settings: Settings) -> Signer:
    uri = settings.signer_token_uri or _default_token_uri(settings.token_dir)
    token = Token.open(uri)
    return token.ensure_signer(settings.signer_label, common_name=signing_common_name())


def signing_common_name(host: str | None = None) -> str:
    """The subject CN of a new signing certificate: the host name and a random identity of
    this data directory's key. Used only when the key is made (an existing certificate keeps
    its name): two Archivers never read the same in a report, so one cannot pass for another
    by name (their fingerprints differ anyway; the name is what a person reads)."""
    host = (host if host is not None else socket.gethostname()).strip() or "localhost"
    # A CN holds at most 64 characters: "Fusion Archiver " + host + " " + 8 hex digits.
    return f"Fusion Archiver {host[:38]} {secrets.token_hex(4)}"


def _default_token_uri(token_dir: Path) -> str:
    conf = token_dir / "softhsm2.conf"
    pin_file = token_dir / "pin"
    if not conf.exists():
        token_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        pin = secrets.token_hex(16)
        # The SO PIN is not kept: nobody needs to re-initialise this token.
        conf = init_softhsm(token_dir, DEFAULT_LABEL, pin, secrets.token_hex(16))
        fd = os.open(pin_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(pin)
    # SoftHSM reads its configuration once per process, when the module is first loaded.
    os.environ["SOFTHSM2_CONF"] = str(conf)
    return (f"pkcs11:token={DEFAULT_LABEL}?module-path={DEFAULT_MODULE}"
            f"&pin-source=file:{pin_file}")
