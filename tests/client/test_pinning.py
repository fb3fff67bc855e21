"""Known Archivers: explicit pins, trust on first use, and a loud error when the key changes."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from client.pinning import (
    KnownArchivers,
    PinOutcome,
    archiver_key,
    check_archiver,
    client_home,
    parse_known,
)
from keyservice.certs import build_archiver_certificate
from keyservice.errors import ArchiverMismatch, UsageError
from keyservice.identity import fingerprint

URL = "http://127.0.0.1:8080"


def archiver_cert(name: str = "archiver") -> x509.Certificate:
    return build_archiver_certificate(ec.generate_private_key(ec.SECP256R1()), name,
                                      now=dt.datetime.now(dt.UTC))


@pytest.fixture
def store(tmp_path: Path) -> KnownArchivers:
    return KnownArchivers(tmp_path / "home" / "known_archivers")


def test_first_use_then_matched(store: KnownArchivers) -> None:
    cert = archiver_cert()
    first = check_archiver(URL, cert, store=store)
    assert first.outcome is PinOutcome.FIRST_USE
    assert first.fingerprint == fingerprint(cert)
    assert store.lookup(URL) == fingerprint(cert)
    # The same Archiver under an equivalent spelling of its URL is the same pin.
    again = check_archiver("HTTP://127.0.0.1:8080/", cert, store=store)
    assert again.outcome is PinOutcome.MATCHED
    assert (store.path.parent.stat().st_mode & 0o777) == 0o700


def test_changed_key_is_loud(store: KnownArchivers) -> None:
    old, new = archiver_cert(), archiver_cert()
    check_archiver(URL, old, store=store)
    with pytest.raises(ArchiverMismatch) as info:
        check_archiver(URL, new, store=store)
    message = str(info.value)
    assert "CHANGED" in message and fingerprint(new).hex() in message
    assert fingerprint(old).hex() in message and "--archiver-cert" in message
    assert info.value.exit_code == 31
    assert store.lookup(URL) == fingerprint(old)  # the pin is not silently replaced


def test_other_url_is_independent(store: KnownArchivers) -> None:
    a, b = archiver_cert(), archiver_cert()
    check_archiver(URL, a, store=store)
    assert check_archiver("http://127.0.0.1:9090", b, store=store).outcome is PinOutcome.FIRST_USE
    assert store.lookup(URL) == fingerprint(a)


def test_explicit_pin(store: KnownArchivers) -> None:
    old, new = archiver_cert(), archiver_cert()
    check_archiver(URL, old, store=store)
    with pytest.raises(ArchiverMismatch, match="--archiver-cert"):
        check_archiver(URL, new, store=store, explicit=old)
    # A legitimate key change: the user vouches for the new certificate explicitly.
    decision = check_archiver(URL, new, store=store, explicit=new)
    assert decision.outcome is PinOutcome.EXPLICIT
    assert decision.replaced == fingerprint(old)
    assert store.lookup(URL) == fingerprint(new)
    assert check_archiver(URL, new, store=store).outcome is PinOutcome.MATCHED


def test_offline_needs_a_known_archiver(store: KnownArchivers) -> None:
    cert = archiver_cert()
    with pytest.raises(UsageError, match="--archiver-cert"):
        check_archiver(None, cert, store=store)
    with pytest.raises(UsageError, match="No Archiver certificate is pinned"):
        check_archiver(URL, cert, store=store, allow_first_use=False)
    assert not store.path.exists()
    assert check_archiver(None, cert, store=store, explicit=cert).outcome is PinOutcome.EXPLICIT
    assert not store.path.exists()  # no URL, nothing to record


def test_file_format_and_forget(store: KnownArchivers) -> None:
    a = archiver_cert("site A")
    check_archiver(URL, a, store=store)
    text = store.path.read_text()
    assert json.loads(text)["archivers"] == [
        {"url": "http://127.0.0.1:8080", "sha256": fingerprint(a).hex(), "subject": "CN=site A"}]
    assert [e.fingerprint for e in parse_known(text)] == [fingerprint(a)]
    assert store.forget(URL) is True
    assert store.forget(URL) is False
    assert store.lookup(URL) is None
    assert not [p for p in store.path.parent.iterdir() if p.name.startswith(".known")]


def test_malformed_file_is_an_error_not_first_use(store: KnownArchivers) -> None:
    store.path.parent.mkdir(parents=True)
    store.path.write_text(f"# comment\n{URL} not-a-fingerprint\n")
    with pytest.raises(UsageError, match="Line 2"):
        check_archiver(URL, archiver_cert(), store=store)


# A subject an attacker chose for its certificate, meant to forge a pin for another Archiver
# (U+2028 is a line break for str.splitlines) or to break the file for every later command.
EVIL = "evil\u2028http://bank.example:443 " + "ab" * 32 + "\n\u0085\x1b[2J\r{\"x"
OTHER = "https://bank.example:443"


def test_an_injected_subject_cannot_forge_or_break_a_pin(store: KnownArchivers) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "archiver"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, EVIL)])
    now = dt.datetime.now(dt.UTC)
    evil = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256()))
    assert check_archiver(URL, evil, store=store).outcome is PinOutcome.FIRST_USE
    text = store.path.read_text(encoding="utf-8")
    assert all(ch == "\n" or 0x20 <= ord(ch) < 0x7f for ch in text)  # escaped, every one
    # Exactly one pin, for URL, whose subject is the whole subject; no pin for the other URL.
    entries = parse_known(text)
    assert [(e.key, e.fingerprint) for e in entries] == [(URL, fingerprint(evil))]
    assert entries[0].comment == evil.subject.rfc4514_string()
    assert store.lookup(OTHER) is None
    # ... and every later command still reads the file.
    good = archiver_cert("good")
    assert check_archiver(OTHER, good, store=store).outcome is PinOutcome.FIRST_USE
    assert check_archiver(URL, evil, store=store).outcome is PinOutcome.MATCHED


def test_old_line_format_is_migrated_without_the_injection(store: KnownArchivers) -> None:
    """A file an older version wrote, with the injected subject raw in it: read as one entry
    (split on \\n only, not on U+2028) and rewritten as JSON."""
    evil = archiver_cert("x")
    store.path.parent.mkdir(parents=True)
    old = (f"# fusion-client known Archivers: <url> <sha256 of the certificate> [subject]\n"
           f"{URL} {fingerprint(evil).hex()} CN=evil\u2028{OTHER} {'ab' * 32}\n")
    store.path.write_text(old, encoding="utf-8")
    assert len(old.splitlines()) == 3  # what the old reader saw: a forged second pin
    assert store.lookup(OTHER) is None
    assert store.lookup(URL) == fingerprint(evil)
    migrated = json.loads(store.path.read_text())
    assert [a["url"] for a in migrated["archivers"]] == [URL]
    assert migrated["archivers"][0]["subject"] == f"CN=evil\u2028{OTHER} {'ab' * 32}"


def test_malformed_json_is_an_error(store: KnownArchivers) -> None:
    store.path.parent.mkdir(parents=True)
    for text in ('{"archivers": [{"url": "http://h", "sha256": "zz"}]}', "{not json",
                 '{"version": 1}'):
        store.path.write_text(text)
        with pytest.raises(UsageError, match="malformed"):
            check_archiver(URL, archiver_cert(), store=store)


@pytest.mark.parametrize(("url", "key"), [
    ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
    ("http://Example.ORG", "http://example.org:80"),
    ("https://example.org/", "https://example.org:443"),
    ("https://example.org:8443/fusion/", "https://example.org:8443/fusion"),
    ("http://[::1]:8080", "http://[::1]:8080"),
])
def test_archiver_key(url: str, key: str) -> None:
    assert archiver_key(url) == key


@pytest.mark.parametrize("url", ["ftp://example.org", "example.org", "http://", "http://h:99999"])
def test_archiver_key_refuses(url: str) -> None:
    with pytest.raises(UsageError):
        archiver_key(url)


def test_client_home(tmp_path: Path) -> None:
    assert client_home({"FUSION_CLIENT_HOME": str(tmp_path)}) == tmp_path
    assert client_home({"XDG_CONFIG_HOME": str(tmp_path)}) == tmp_path / "fusion-client"
    assert client_home({}) == Path(os.path.expanduser("~")) / ".config" / "fusion-client"
