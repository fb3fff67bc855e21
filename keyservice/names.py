"""The camera-name rule, one definition for the format, the Archiver's API and both CLIs.

A camera name ends up in file paths (CAMERA/DAY.fsa) and URLs, so: 1 to 64 characters from
``A-Za-z0-9._-``, and never '.' or '..'.                                                [pure]
"""

from __future__ import annotations

import functools
import re

from keyservice.errors import FormatError, KeyServiceError, UsageError

NAME_MAX = 64
# The character rule alone, for declarative checks (OpenAPI patterns); '.' and '..' match it,
# so whatever accepts a name also calls validate_camera_name or is_camera_name.
CAMERA_NAME_PATTERN = rf"^[A-Za-z0-9._-]{{1,{NAME_MAX}}}$"
_NAME = re.compile(CAMERA_NAME_PATTERN, re.ASCII)
CAMERA_NAME_RULE = (f"1 to {NAME_MAX} characters from A-Z, a-z, 0-9, '.', '_' and '-' "
                    "(not '.' or '..')")


def is_camera_name(name: object) -> bool:
    return isinstance(name, str) and _valid(name)


@functools.lru_cache(maxsize=1024)  # names repeat on every record
def _valid(name: str) -> bool:
    return bool(_NAME.fullmatch(name)) and name not in (".", "..")


def validate_camera_name(name: object) -> str:
    """``name`` if it is a camera name, else UsageError with the rule: a name someone typed or
    sent (a CLI option, an admin request) is a wrong value, not a malformed stream."""
    return _checked(name, UsageError)


def camera_name_in_record(name: object) -> str:
    """The same rule for a name decoded from (or put into) a fusion-stream record, where a bad
    name means the bytes are not a well-formed stream: FormatError."""
    return _checked(name, FormatError)


def _checked(name: object, error: type[KeyServiceError]) -> str:
    if not isinstance(name, str):
        raise error(f"Invalid camera name {name!r}: a name is a string.")
    if not _valid(name):
        raise error(f"Invalid camera name {name!r}: use {CAMERA_NAME_RULE}.")
    return name
