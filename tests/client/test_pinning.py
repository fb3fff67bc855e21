"""Known Archivers: explicit pins, trust on first use, and a loud error when the key changes."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

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
    assert f"http://127.0.0.1:8080 {fingerprint(a).hex()} CN=site A" in text
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
