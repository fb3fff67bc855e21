from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from keyservice.token import Token, TokenIdentity
from tests.fixtures.tokens import enroll_viewer


@dataclass
class Viewer:
    name: str
    pem: Path
    identity: TokenIdentity


@pytest.fixture
def make_viewer(softhsm_token_factory: Callable[[], object]) -> Callable[[str], Viewer]:
    """A viewer enrolled on its own fresh SoftHSM token (RSA-2048 for speed)."""

    def make(name: str) -> Viewer:
        token = softhsm_token_factory()
        pem = enroll_viewer(token, name, bits=2048)
        return Viewer(name, pem, Token.open(token.uri).identity(name))

    return make
