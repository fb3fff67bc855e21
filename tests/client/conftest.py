"""Fixtures shared by the viewer's end-to-end tests: the fusion-client command and viewers
enrolled on their own SoftHSM tokens."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from fusion_testkit.client_cli import Client, Viewer
from tests.fixtures.tokens import TokenHandle, enroll_viewer


@pytest.fixture
def client(tmp_path: Path) -> Client:
    return Client(tmp_path / "client-home")


@pytest.fixture
def make_viewer(softhsm_token_factory: Callable[[], TokenHandle]) -> Callable[[str], Viewer]:
    def make(name: str) -> Viewer:
        token = softhsm_token_factory()
        pem = enroll_viewer(token, name)
        return Viewer(name, token, token.object_uri(name), pem)
    return make
