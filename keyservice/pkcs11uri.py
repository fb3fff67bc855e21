"""RFC 7512 PKCS#11 URIs: how tokens and objects are named (the OpenSSL/GnuTLS/p11-kit convention).

    pkcs11:token=viewers;object=alice?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-value=1234

Only the attributes this project acts on are accepted; any other filter attribute is refused
rather than silently ignored, because ignoring a filter could select the wrong token or key.
This module is pure: it never reads the PIN file or the environment (``keyservice.token`` does).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from urllib.parse import quote, unquote_to_bytes

from keyservice.errors import UsageError
from keyservice.records import FrozenRecord

# Used when the URI has no module-path; env FUSION_PKCS11_MODULE overrides (see keyservice.token).
DEFAULT_MODULE = "/usr/lib/softhsm/libsofthsm2.so"

_PATH_ATTRS = {"token", "object", "id", "serial", "type"}
_OBJECT_TYPES = {"private", "public", "cert", "secret-key", "data"}
_QUERY_ATTRS = {"module-path", "pin-value", "pin-source"}
_PCT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_PATH_BAD = re.compile(r"[\s\"<>\\^`{}#]")
# Characters left unescaped when formatting; everything else is percent-encoded.
_SAFE_PATH = "-._~:@!$'()*+,"
_SAFE_QUERY = _SAFE_PATH + "/?|"


def _decode(name: str, raw: str) -> bytes:
    if _PATH_BAD.search(raw) or _PCT.search(raw):
        raise UsageError(f"The PKCS#11 URI attribute {name!r} has an invalid character or "
                         "% escape; percent-encode special characters (e.g. %20 for a space).")
    return unquote_to_bytes(raw)


def _text(name: str, raw: str) -> str:
    try:
        value = _decode(name, raw).decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"The PKCS#11 URI attribute {name!r} is not valid UTF-8.") from None
    if not value:
        raise UsageError(f"The PKCS#11 URI attribute {name!r} is empty; give a value or leave "
                         "it out.")
    return value


@dataclass(eq=False, repr=False)  # frozen, eq, hash, repr: FrozenRecord's
class Pkcs11Uri(FrozenRecord):
    """A parsed PKCS#11 URI. ``repr``/``str`` never show the PIN; ``to_uri()`` does."""

    token: str | None = None
    object: str | None = None
    id: bytes | None = None
    serial: str | None = None
    module_path: str | None = None
    pin_value: str | None = field(default=None, repr=False)
    pin_source: str | None = None

    @classmethod
    def parse(cls, text: str) -> Pkcs11Uri:
        text = text.strip()
        if not text[:7].lower() == "pkcs11:":
            # The text is not echoed: a mistyped URI may still carry a PIN.
            raise UsageError("The token must be a PKCS#11 URI starting with 'pkcs11:', e.g. "
                             "pkcs11:token=viewers;object=alice.")
        rest = text[7:]
        if "#" in rest:
            raise UsageError("A PKCS#11 URI cannot contain '#'; percent-encode it as %23.")
        path, _, query = rest.partition("?")
        values: dict[str, object] = {}
        for part in filter(None, path.split(";")):
            name, eq, raw = part.partition("=")
            name = name.lower()
            if not eq:
                raise UsageError(f"The PKCS#11 URI part {name!r} has no '='; write name=value.")
            if name in values:
                raise UsageError(f"The PKCS#11 URI names {name!r} twice; give it once.")
            if name.startswith("x-"):
                continue  # RFC 7512 vendor extensions: not for us
            if name not in _PATH_ATTRS:
                raise UsageError(
                    f"The PKCS#11 URI attribute {name!r} is not supported; use token, object, id, "
                    "serial or type (and module-path, pin-value, pin-source after '?').")
            if name == "id":
                value: object = _decode(name, raw)
                if not value:
                    raise UsageError("The PKCS#11 URI attribute 'id' is empty.")
            else:
                value = _text(name, raw)
            if name == "type" and value not in _OBJECT_TYPES:
                raise UsageError(f"The PKCS#11 URI type {value!r} is unknown; use one of "
                                 f"{', '.join(sorted(_OBJECT_TYPES))}.")
            values[name] = value
        for part in filter(None, query.split("&")):
            name, eq, raw = part.partition("=")
            name = name.lower()
            if not eq:
                # Not echoed: a query part without '=' may be a stray PIN.
                raise UsageError("A PKCS#11 URI query part has no '='; write name=value.")
            if name in values:
                raise UsageError(f"The PKCS#11 URI names {name!r} twice; give it once.")
            if name == "module-name":
                raise UsageError("module-name is not supported; give the module file with "
                                 "module-path=/path/to/module.so.")
            if name not in _QUERY_ATTRS:
                raise UsageError(f"The PKCS#11 URI query attribute {name!r} is not supported; use "
                                 "module-path, pin-value or pin-source.")
            values[name] = _text(name, raw)
        if "pin-value" in values and "pin-source" in values:
            raise UsageError("The PKCS#11 URI has both pin-value and pin-source; keep only one.")
        source = values.get("pin-source")
        if isinstance(source, str) and source.startswith("|"):
            # Running a command named in a URI would let whoever writes the URI run code.
            raise UsageError("pin-source commands ('|...') are not supported; point pin-source at "
                             "a file holding the PIN (pin-source=file:/path/to/pin).")
        return cls(
            token=_str_or_none(values.get("token")),
            object=_str_or_none(values.get("object")),
            id=values.get("id") if isinstance(values.get("id"), bytes) else None,  # type: ignore[arg-type]
            serial=_str_or_none(values.get("serial")),
            module_path=_str_or_none(values.get("module-path")),
            pin_value=_str_or_none(values.get("pin-value")),
            pin_source=_str_or_none(source),
        )

    def with_object(self, name: str) -> Pkcs11Uri:
        """The same token, naming object ``name`` (and no id, which could name another key)."""
        if not name:
            raise UsageError("An object name cannot be empty.")
        return replace(self, object=name, id=None)

    def pin_source_path(self) -> str | None:
        """The file named by pin-source (``file:`` URI or plain path), or None."""
        if self.pin_source is None:
            return None
        source = self.pin_source
        if source.lower().startswith("file://"):
            source = source[7:]
            if not source.startswith("/"):  # file://host/path: only the local host makes sense
                raise UsageError("pin-source must be a local file, e.g. file:/etc/fusion/pin.")
        elif source.lower().startswith("file:"):
            source = source[5:]
        return source

    def to_uri(self, *, include_pin: bool = True) -> str:
        """Format as a URI string. Contains the PIN when it has one: never log this."""
        path = []
        if self.token is not None:
            path.append("token=" + quote(self.token, safe=_SAFE_PATH))
        if self.serial is not None:
            path.append("serial=" + quote(self.serial, safe=_SAFE_PATH))
        if self.object is not None:
            path.append("object=" + quote(self.object, safe=_SAFE_PATH))
        if self.id is not None:
            path.append("id=" + "".join(f"%{b:02X}" for b in self.id))
        query = []
        if self.module_path is not None:
            query.append("module-path=" + quote(self.module_path, safe=_SAFE_QUERY))
        if self.pin_source is not None:
            query.append("pin-source=" + quote(self.pin_source, safe=_SAFE_QUERY))
        if self.pin_value is not None:
            query.append("pin-value=" + (quote(self.pin_value, safe=_SAFE_PATH) if include_pin
                                         else "REDACTED"))
        return "pkcs11:" + ";".join(path) + ("?" + "&".join(query) if query else "")

    def redacted(self) -> str:
        """For logs and messages: the URI with the PIN replaced by REDACTED."""
        return self.to_uri(include_pin=False)

    def __str__(self) -> str:
        return self.redacted()


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None
