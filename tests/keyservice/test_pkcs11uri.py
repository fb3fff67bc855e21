"""RFC 7512 PKCS#11 URIs (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keyservice.errors import UsageError
from keyservice.pkcs11uri import Pkcs11Uri


def test_parse_full_example_from_the_issue() -> None:
    uri = Pkcs11Uri.parse("pkcs11:token=viewers;object=alice"
                          "?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-value=1234")
    assert uri.token == "viewers"
    assert uri.object == "alice"
    assert uri.module_path == "/usr/lib/softhsm/libsofthsm2.so"
    assert uri.pin_value == "1234"
    assert uri.id is None and uri.serial is None and uri.pin_source is None


def test_percent_decoding_of_strings_and_id() -> None:
    uri = Pkcs11Uri.parse("PKCS11:token=my%20viewers;object=%C3%A9mile;id=%01%02%ff;"
                          "serial=0123abc;type=private")
    assert uri.token == "my viewers"
    assert uri.object == "émile"
    assert uri.id == b"\x01\x02\xff"
    assert uri.serial == "0123abc"


def test_vendor_attributes_are_ignored() -> None:
    assert Pkcs11Uri.parse("pkcs11:token=a;x-vendor=1").token == "a"


@pytest.mark.parametrize(("text", "needle"), [
    ("token=a", "pkcs11:"),
    ("pkcs11:token=a;model=foo", "'model' is not supported"),
    ("pkcs11:token=a;token=b", "twice"),
    ("pkcs11:token", "has no '='"),
    ("pkcs11:token=", "empty"),
    ("pkcs11:token=a%2", "% escape"),
    ("pkcs11:token=a b", "invalid character"),
    ("pkcs11:token=%ff", "UTF-8"),
    ("pkcs11:token=a#frag", "'#'"),
    ("pkcs11:token=a;type=banana", "type 'banana' is unknown"),
    ("pkcs11:token=a?pin-value=1&pin-source=file:/x", "both pin-value and pin-source"),
    ("pkcs11:token=a?pin-source=%7Ccat%20/etc/pin", "commands"),
    ("pkcs11:token=a?module-name=softhsm2", "module-path"),
    ("pkcs11:token=a?foo=bar", "'foo' is not supported"),
    ("pkcs11:token=a?pin-value=1&pin-value=2", "twice"),
])
def test_malformed_uris_raise_usage_error_with_a_reason(text: str, needle: str) -> None:
    with pytest.raises(UsageError) as info:
        Pkcs11Uri.parse(text)
    assert needle in str(info.value)
    assert UsageError.exit_code == 2


def test_error_messages_never_echo_a_pin() -> None:
    for text in ("pkcs12:token=a?pin-value=s3cr3tPIN", "pkcs11:token=a?pin-value=x&s3cr3tPIN"):
        with pytest.raises(UsageError) as info:
            Pkcs11Uri.parse(text)
        assert "s3cr3tPIN" not in str(info.value)


def test_with_object_replaces_object_and_drops_id() -> None:
    uri = Pkcs11Uri.parse("pkcs11:token=v;object=a;id=%01?pin-value=9")
    other = uri.with_object("bob")
    assert (other.object, other.id, other.token, other.pin_value) == ("bob", None, "v", "9")
    assert uri.object == "a"  # frozen: the original is unchanged
    with pytest.raises(UsageError):
        uri.with_object("")


def test_redacted_repr_and_str_hide_the_pin() -> None:
    uri = Pkcs11Uri.parse("pkcs11:token=v;object=a?module-path=/m.so&pin-value=4711x")
    assert "4711x" not in uri.redacted()
    assert "4711x" not in repr(uri)
    assert "4711x" not in str(uri)
    assert "4711x" not in f"{uri}"
    assert "pin-value=4711x" in uri.to_uri()
    assert Pkcs11Uri.parse(uri.redacted()).token == "v"


def test_pin_source_path_forms() -> None:
    assert Pkcs11Uri.parse("pkcs11:token=a?pin-source=file:/etc/pin").pin_source_path() == \
        "/etc/pin"
    assert Pkcs11Uri.parse("pkcs11:token=a?pin-source=file:///etc/pin").pin_source_path() == \
        "/etc/pin"
    assert Pkcs11Uri.parse("pkcs11:token=a?pin-source=pin.txt").pin_source_path() == "pin.txt"
    assert Pkcs11Uri.parse("pkcs11:token=a").pin_source_path() is None
    with pytest.raises(UsageError):
        Pkcs11Uri.parse("pkcs11:token=a?pin-source=file://host/etc/pin").pin_source_path()


_text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20)


@given(token=_text, obj=st.none() | _text, ident=st.none() | st.binary(min_size=1, max_size=8),
       module=st.none() | _text, pin=st.none() | _text)
def test_to_uri_round_trips(token: str, obj: str | None, ident: bytes | None,
                            module: str | None, pin: str | None) -> None:
    uri = Pkcs11Uri(token=token, object=obj, id=ident, module_path=module, pin_value=pin)
    assert Pkcs11Uri.parse(uri.to_uri()) == uri


@given(pin=st.text(st.characters(whitelist_categories=("Nd", "Lu", "Ll")), min_size=6,
                   max_size=12))
def test_redacted_never_contains_the_pin(pin: str) -> None:
    uri = Pkcs11Uri(token="tok", object="alice", pin_value=pin)
    # Everything but the PIN is kept, and the PIN's place holds only the fixed marker (a PIN
    # such as "REDACT" is a substring of the marker, so compare the whole value).
    shown = Pkcs11Uri.parse(uri.redacted())
    assert shown.pin_value == "REDACTED" and (shown.token, shown.object) == ("tok", "alice")
