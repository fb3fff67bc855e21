"""Fixtures for developers testing against fusion stream encryption with real parts: SoftHSM
tokens, enrolled viewers, a real Archiver (uvicorn, the installed code) and ffmpeg as the camera.

Registered through the ``pytest11`` entry point of the installed package: installing it makes
these fixtures available, and nothing runs unless a test asks for a fixture (none is autouse).
The process's environment is never changed for the session: each SoftHSM store is its own
SoftHSM instance, and a subprocess is given ``token.env`` (or ``viewer.env``) explicitly.

- ``softhsm_store``: a private SoftHSM directory for this test (its own softhsm2.conf).
- ``softhsm_token_factory``: ``factory(label=None) -> TokenHandle``, a fresh token each call.
- ``softhsm_token``: one fresh token.
- ``softhsm_environ``: SOFTHSM2_CONF of ``softhsm_store`` in os.environ for this one test
  (restored after it), for code that runs commands inheriting the environment.
- ``fusion_viewer``: an ``EnrolledViewer`` (RSA-2048 by default; parametrise indirectly with
  "rsa" or "ec"); ``fusion_viewer_factory(name, key_type="rsa")`` for more.
- ``fusion_site_ca``: a site CA (issues the Archiver's TLS certificate).
- ``fusion_archiver``: a started ``ArchiverServer``, HTTPS under ``fusion_site_ca`` (clients
  verify against ``fusion_archiver.tls_ca``); parametrise indirectly with "http" for plain HTTP.
- ``fusion_camera``: ``push(archiver, camera, seconds=4) -> CameraPush``: adds the camera,
  pushes a synthetic H.264 stream with ffmpeg, waits until the Archiver archived it, and gives
  the source's per-frame MD5s and the time range to request.
- ``postgres_cluster``: a real PostgreSQL server (initdb and pg_ctl, as the postgres user when
  run as root) on 127.0.0.1, one per test session (per xdist worker), stopped at its end.
  Skips where PostgreSQL is not installed, except under CI=true, where that fails.
- ``postgres_url``: a new, empty database on ``postgres_cluster`` for this test (its URL).
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fusion_testkit.camera import CameraPush, frame_hashes, make_source, push
from fusion_testkit.pki import SiteCa
from fusion_testkit.postgres import PostgresCluster, find_postgres_bin
from fusion_testkit.server import ArchiverServer, production_archiver
from fusion_testkit.tokens import EnrolledViewer, SoftHsmStore, TokenHandle, softhsm_available

__all__ = ["fusion_archiver", "fusion_camera", "fusion_site_ca", "fusion_viewer",
           "fusion_viewer_factory", "postgres_cluster", "postgres_url", "softhsm_environ",
           "softhsm_store", "softhsm_token", "softhsm_token_factory"]


# --- SoftHSM ------------------------------------------------------------------------------
@pytest.fixture
def softhsm_store(tmp_path: Path) -> Iterator[SoftHsmStore]:
    """A SoftHSM store of this test's own (closed, C_Finalize, after it)."""
    if not softhsm_available():
        pytest.skip("SoftHSM (softhsm2) is not installed")
    store = SoftHsmStore.create(tmp_path / "softhsm")
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
def softhsm_token_factory(softhsm_store: SoftHsmStore) -> Callable[..., TokenHandle]:
    """``factory(label=None)``: a fresh token (random PINs) in this test's store."""
    return softhsm_store.new_token


@pytest.fixture
def softhsm_token(softhsm_token_factory: Callable[..., TokenHandle]) -> TokenHandle:
    return softhsm_token_factory()


@pytest.fixture
def softhsm_environ(softhsm_store: SoftHsmStore,
                    monkeypatch: pytest.MonkeyPatch) -> SoftHsmStore:
    """For a test whose commands inherit the environment: SOFTHSM2_CONF names this test's store
    until the test ends (then the previous value is back)."""
    for key, value in softhsm_store.env.items():
        monkeypatch.setenv(key, value)
    return softhsm_store


# --- viewers ------------------------------------------------------------------------------
@pytest.fixture
def fusion_viewer_factory(softhsm_token_factory: Callable[..., TokenHandle]
                          ) -> Callable[..., EnrolledViewer]:
    """``factory(name, key_type="rsa")``: a viewer enrolled on its own fresh SoftHSM token."""
    def factory(name: str, key_type: str = "rsa") -> EnrolledViewer:
        return EnrolledViewer.enrol(softhsm_token_factory(), name, key_type=key_type)
    return factory


@pytest.fixture
def fusion_viewer(request: pytest.FixtureRequest,
                  fusion_viewer_factory: Callable[..., EnrolledViewer]) -> EnrolledViewer:
    """Viewer "viewer", RSA unless parametrised: ``@pytest.mark.parametrize("fusion_viewer",
    ["rsa", "ec"], indirect=True)``."""
    key_type = getattr(request, "param", "rsa")
    if key_type not in ("rsa", "ec"):
        raise pytest.UsageError(f"fusion_viewer takes 'rsa' or 'ec', not {key_type!r}")
    return fusion_viewer_factory("viewer", key_type)


# --- the Archiver -------------------------------------------------------------------------
@pytest.fixture
def fusion_site_ca(tmp_path: Path) -> SiteCa:
    """The site's CA: it issues the Archiver's TLS certificate (and viewers' certificates)."""
    return SiteCa.create(tmp_path / "site-ca")


@pytest.fixture
def fusion_archiver(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ArchiverServer]:
    """A real Archiver (uvicorn in a subprocess, this interpreter's installed ``archiver``) on
    127.0.0.1, on its own data directory; HTTPS under ``fusion_site_ca`` unless parametrised
    with "http". Stopped after the test."""
    scheme = getattr(request, "param", "https")
    if scheme == "https":
        site_ca: SiteCa = request.getfixturevalue("fusion_site_ca")
        server = production_archiver(site_ca, tmp_path / "archiver")
    elif scheme == "http":
        server = ArchiverServer(tmp_path / "archiver")
    else:
        raise pytest.UsageError(f"fusion_archiver takes 'https' or 'http', not {scheme!r}")
    server.start()
    try:
        yield server
    finally:
        server.stop()


# --- the camera ---------------------------------------------------------------------------
def wait_for_segments(server: ArchiverServer, camera: str, count: int,
                      timeout: float = 60) -> None:
    """ffmpeg's HLS muxer does not wait for the answers to its PUTs: wait until the Archiver
    has archived ``count`` segments of ``camera``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cameras = {c["name"]: c for c in server.admin("GET", "/v1/admin/cameras", expect=200)}
        if cameras[camera]["segments"] >= count:
            return
        time.sleep(0.1)
    raise AssertionError(f"the Archiver did not archive {count} segments of {camera} within "
                         f"{timeout:.0f} s")


@pytest.fixture
def fusion_camera(tmp_path: Path) -> Callable[..., CameraPush]:
    """``push(archiver, camera, seconds=4)``: a camera pushing a synthetic stream (real
    ffmpeg, HLS PUT, in real time as a camera does), archived before it returns."""
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed")

    def push_camera(archiver: ArchiverServer, camera: str, seconds: int = 4) -> CameraPush:
        ingest_token = archiver.add_camera(camera)
        source = make_source(tmp_path / f"{camera}-source.ts", seconds)
        start_ms = time.time_ns() // 1_000_000
        push(source, archiver.url, camera, ingest_token, realtime=True, hls_time=1)
        # One segment per second (a keyframe every second, hls_time 1).
        wait_for_segments(archiver, camera, math.ceil(seconds))
        end_ms = time.time_ns() // 1_000_000 + 1
        return CameraPush(camera, source, frame_hashes(source), start_ms, end_ms)

    return push_camera


# --- PostgreSQL ---------------------------------------------------------------------------
@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """One PostgreSQL server for the session (each xdist worker has its own session)."""
    if find_postgres_bin() is None:
        message = "PostgreSQL is not installed (Debian package 'postgresql'; scripts/setup.sh)"
        if os.environ.get("CI") == "true":
            pytest.fail(message + ": CI must run the PostgreSQL tests")
        pytest.skip(message)
    cluster = PostgresCluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def postgres_url(postgres_cluster: PostgresCluster) -> str:
    """A new, empty database of this test's own on the session's PostgreSQL server."""
    return postgres_cluster.create_database()
