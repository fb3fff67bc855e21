"""Known Archivers, like SSH's known_hosts: the viewer pins each Archiver's certificate.

The Archiver's signature on manifests and end records is what proves a fusion stream's origin,
so the viewer must know *which* Archiver key to trust. Three ways, in order:

1. ``--archiver-cert FILE`` pins explicitly (and records it, replacing an older pin: the user
   vouched for this certificate);
2. a pin recorded earlier for this Archiver URL must match, or ``ArchiverMismatch`` is raised
   loudly, because a changed key is exactly what an impersonator would present;
3. otherwise the certificate is trusted on first use and recorded.

With ``--site-ca`` (``FUSION_SITE_CA``) a site's Archivers need no pin: a certificate the site CA
issued for an Archiver's signing key is accepted for any Archiver URL, and nothing is pinned;
one not issued by it is refused. Pins still apply beside it: ``--archiver-cert`` and a pin
recorded for the URL must match too (see ``check_archiver``).

The file is ``known_archivers`` under ``$FUSION_CLIENT_HOME`` (or
``$XDG_CONFIG_HOME/fusion-client``, or ``~/.config/fusion-client``), a JSON document
``{"version": 1, "archivers": [{"url": ..., "sha256": ..., "subject": ...}]}`` written with
every non-ASCII and control character escaped: a subject chosen by whoever made the
certificate (newlines, U+2028, terminal escapes) cannot add or break an entry. The line format
of earlier versions (``<url> <sha256-hex> [subject]``) is read, split on ``\n`` only, and
rewritten as JSON.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from keyservice.dercert import full_certificate
from keyservice.errors import ArchiverMismatch, CertificateError, UsageError
from keyservice.identity import fingerprint
from keyservice.records import FrozenRecord

if TYPE_CHECKING:
    from cryptography import x509

__all__ = ["KNOWN_FILE", "KnownArchivers", "KnownEntry", "PinDecision", "PinOutcome",
           "archiver_key", "check_archiver", "client_home", "parse_known"]

KNOWN_FILE = "known_archivers"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def client_home(env: Mapping[str, str] | None = None) -> Path:
    """Where the viewer keeps its known Archivers (never any key material)."""
    env = os.environ if env is None else env
    if env.get("FUSION_CLIENT_HOME"):
        return Path(env["FUSION_CLIENT_HOME"])
    if env.get("XDG_CONFIG_HOME"):
        return Path(env["XDG_CONFIG_HOME"]) / "fusion-client"
    return Path.home() / ".config" / "fusion-client"


def archiver_key(url: str) -> str:
    """The name a pin is stored under: scheme://host:port[/path], normalised so that
    http://Host:80/ and http://host are the same Archiver."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise UsageError(f"The Archiver URL {url!r} is not an http:// or https:// URL.")
    try:
        port = parts.port or _DEFAULT_PORTS[scheme]
    except ValueError:
        raise UsageError(f"The Archiver URL {url!r} has an invalid port.") from None
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}{parts.path.rstrip('/')}"


class PinOutcome(Enum):
    """How an Archiver's certificate came to be trusted."""

    MATCHED = "matched the pinned certificate"
    EXPLICIT = "matched the certificate given with --archiver-cert"
    FIRST_USE = "trusted on first use and pinned"
    SITE_CA = "issued by the site CA (--site-ca)"


@dataclass(eq=False, repr=False)  # frozen, eq, hash, repr: FrozenRecord's
class PinDecision(FrozenRecord):
    """The decision on an Archiver's certificate: how, its fingerprint, where the pin lives, and
    the older pin an explicit certificate replaced."""

    outcome: PinOutcome
    fingerprint: bytes
    stored_in: Path
    replaced: bytes | None = None  # an older, different pin that --archiver-cert replaced
    subject: str = ""  # the certificate's subject (RFC 4514)


@dataclass(eq=False, repr=False)  # frozen, eq, hash, repr: FrozenRecord's
class KnownEntry(FrozenRecord):
    """One pinned Archiver: its normalized URL key, certificate fingerprint and a comment."""

    key: str
    fingerprint: bytes
    comment: str


class KnownArchivers:
    """The known_archivers file. Reads on every lookup (another process may have pinned)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def default(cls) -> KnownArchivers:
        """The user's file: ``client_home()/known_archivers``."""
        return cls(client_home() / KNOWN_FILE)

    def _entries(self) -> list[KnownEntry]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"Cannot read the known-Archivers file {self.path}: {exc}.") from None
        entries = parse_known(text, self.path)
        if not _is_json(text):
            self._write(entries)  # migrate the old line format once
        return entries

    def lookup(self, url: str) -> bytes | None:
        """The fingerprint pinned for ``url``, or None."""
        key = archiver_key(url)
        return next((e.fingerprint for e in self._entries() if e.key == key), None)

    def remember(self, url: str, cert_fingerprint: bytes, comment: str = "") -> None:
        """Pin ``cert_fingerprint`` for ``url`` (replacing an older pin)."""
        key = archiver_key(url)
        entries = [e for e in self._entries() if e.key != key]
        entries.append(KnownEntry(key, cert_fingerprint, comment))
        self._write(entries)

    def forget(self, url: str) -> bool:
        """Remove the pin of ``url``; True if there was one."""
        key = archiver_key(url)
        entries = self._entries()
        kept = [e for e in entries if e.key != key]
        if len(kept) == len(entries):
            return False
        self._write(kept)
        return True

    def _write(self, entries: list[KnownEntry]) -> None:
        document = {"version": 1, "comment": "fusion-client known Archivers (pinned "
                    "certificates)", "archivers": [
                        {"url": e.key, "sha256": e.fingerprint.hex(), "subject": e.comment}
                        for e in entries]}
        # ensure_ascii: every non-ASCII character (U+2028 too) is written as an escape.
        text = json.dumps(document, indent=1, ensure_ascii=True) + "\n"
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Write a temporary file and rename: a crash never leaves a half-written pin file.
            import tempfile  # only to pin: a start with its pin already written needs none

            fd, tmp = tempfile.mkstemp(prefix=".known_archivers.", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    fh.write(text)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise UsageError(f"Cannot write the known-Archivers file {self.path}: "
                             f"{exc.strerror or exc}.") from None


def _is_json(text: str) -> bool:
    return text.lstrip().startswith("{")


def parse_known(text: str, path: Path | str = KNOWN_FILE) -> list[KnownEntry]:
    """Parse a known_archivers file (JSON, or the older line format). A malformed entry is an
    error, never skipped: skipping it would silently turn a pinned Archiver into a
    trust-on-first-use one."""
    if _is_json(text):
        return _parse_json(text, path)
    entries = []
    # Split on "\n" only: str.splitlines() also splits on U+2028, U+0085 and other separators
    # that an old version wrote unescaped inside a subject (the injection this format ends).
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw.strip(" \t\r")
        if not line or line.startswith("#"):
            continue
        fields = line.split(" ", 2)
        if len(fields) < 2 or not _HEX64.match(fields[1].lower()):
            raise UsageError(f"Line {number} of {path} is malformed; expected "
                             "'<url> <64 hex digits>'. Fix or delete that line.")
        entries.append(KnownEntry(archiver_key(fields[0]), bytes.fromhex(fields[1]),
                                  fields[2] if len(fields) > 2 else ""))
    return entries


def _parse_json(text: str, path: Path | str) -> list[KnownEntry]:
    def malformed(where: str) -> UsageError:
        return UsageError(f"{path} is malformed ({where}); fix it or delete the entry (the "
                          "Archiver is then trusted again on first use).")

    try:
        document = json.loads(text)
    except ValueError as exc:
        raise malformed(f"not valid JSON: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("archivers"), list):
        raise malformed("no list 'archivers'")
    entries = []
    for number, item in enumerate(document["archivers"], 1):
        if not (isinstance(item, dict) and isinstance(item.get("url"), str)
                and isinstance(item.get("sha256"), str) and _HEX64.match(item["sha256"])
                and isinstance(item.get("subject", ""), str)):
            raise malformed(f"entry {number}: expected url, sha256 (64 hex digits), subject")
        entries.append(KnownEntry(archiver_key(item["url"]), bytes.fromhex(item["sha256"]),
                                  item.get("subject", "")))
    return entries


def _subject(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string()


def check_archiver(url: str | None, cert: x509.Certificate, *, store: KnownArchivers,
                   explicit: x509.Certificate | None = None,
                   allow_first_use: bool = True,
                   site_ca: Sequence[x509.Certificate] = (),
                   now: datetime | None = None) -> PinDecision:
    """Decide whether ``cert`` is the Archiver at ``url``; raises ArchiverMismatch if not.

    ``url`` None (a saved stream opened offline) needs ``explicit`` or ``site_ca``.
    ``allow_first_use`` False refuses to trust an unknown Archiver (offline: there is no first
    contact to pin).

    ``site_ca`` (``--site-ca``): the certificate must be an Archiver signing certificate the
    site CA issued (``keyservice.certs.check_site_issued``), and is then accepted for any URL
    of the site without a pin, and nothing is pinned. Every check that applies must pass: a
    certificate given with ``--archiver-cert`` must still match, and a pin recorded for the
    URL must still match (a mismatch stays loud even for a site-issued certificate: a pin is
    a statement about this URL that only the user withdraws).
    """
    presented = fingerprint(cert)
    if site_ca:
        # The X.509 path validation: the certificate parsed in full (it may have come as DER
        # bytes and a key, keyservice.dercert); nothing before this needed the parser.
        from keyservice.certs import check_site_issued

        try:
            check_site_issued(full_certificate(cert), site_ca,
                              now=now if now is not None else datetime.now(UTC))
        except CertificateError as exc:
            raise ArchiverMismatch(
                str(exc), "Nothing was decrypted. Use an Archiver of your site, or check that "
                "--site-ca (FUSION_SITE_CA) is your site's CA certificate.") from None
    if explicit is not None:
        wanted = fingerprint(explicit)
        if presented != wanted:
            where = f"The Archiver at {url}" if url else "The stream's Archiver"
            raise ArchiverMismatch(
                f"{where} presented certificate sha256 {presented.hex()}, NOT the one given with "
                f"--archiver-cert (sha256 {wanted.hex()}); someone may be impersonating it.",
                "Nothing was decrypted. Check that --archiver-cert is the right file.")
        replaced = None
        if url is not None:
            old = store.lookup(url)
            if old != presented:
                store.remember(url, presented, _subject(cert))
                replaced = old
        return PinDecision(PinOutcome.EXPLICIT, presented, store.path, replaced)
    if url is None:
        if site_ca:
            return PinDecision(PinOutcome.SITE_CA, presented, store.path, subject=_subject(cert))
        raise UsageError("Give --archiver-cert FILE (or --archiver URL with a pinned Archiver, "
                         "or --site-ca FILE) to say which Archiver must have signed the stream.")
    pinned = store.lookup(url)
    if pinned is not None:
        if pinned != presented:
            site = (" It was issued by the site CA, but this URL's pin names another "
                    "certificate." if site_ca else "")
            raise ArchiverMismatch(
                f"WARNING: THE ARCHIVER'S CERTIFICATE HAS CHANGED. The Archiver at {url} "
                f"presented sha256 {presented.hex()}, but {store.path} pins sha256 "
                f"{pinned.hex()}; someone may be impersonating it.{site}",
                "Nothing was decrypted. If the admin really replaced the Archiver's key, get its "
                "new certificate from the admin and run again with --archiver-cert FILE.")
        return PinDecision(PinOutcome.MATCHED, presented, store.path)
    if site_ca:
        # Trusted through the site CA: nothing is pinned, so a certificate the site CA renews
        # or re-issues is accepted again without a false alarm.
        return PinDecision(PinOutcome.SITE_CA, presented, store.path, subject=_subject(cert))
    if not allow_first_use:
        raise UsageError(f"No Archiver certificate is pinned for {url} in {store.path}; give "
                         "--archiver-cert FILE.")
    store.remember(url, presented, _subject(cert))
    return PinDecision(PinOutcome.FIRST_USE, presented, store.path)
