"""What the Archiver shows to whom (issue 12, finding 8): /metrics (ingest counts are a motion
side channel) needs the metrics or the admin token unless --public-metrics; the API's map
(/docs, /redoc, /openapi.json) is served only with --api-docs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fixtures.server import ArchiverServer
from tests.fixtures.viewer import login


@pytest.fixture
def open_server(tmp_path: Path) -> Iterator[ArchiverServer]:
    server = ArchiverServer(tmp_path / "open", extra_args=("--public-metrics", "--api-docs"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_metrics_need_a_token_and_docs_are_off_by_default(archiver_server: ArchiverServer,
                                                          make_viewer) -> None:
    server = archiver_server
    viewer = make_viewer("alice")
    camera_token = server.add_camera("cam1")
    server.add_viewer(viewer.pem, ["cam1"])
    assert server.put_segment("cam1", camera_token, b"x" * 100) == 201
    session = login(server.url, viewer.identity)
    metrics_token = (server.data_dir / "metrics-token").read_text().strip()
    assert (server.data_dir / "metrics-token").stat().st_mode & 0o777 == 0o600

    def scrape(token: str | None) -> httpx.Response:
        return httpx.get(f"{server.url}/metrics",
                         headers={"Authorization": f"Bearer {token}"} if token else {})

    anonymous = scrape(None)
    assert (anonymous.status_code, anonymous.json()["error"]) == (401, "unauthenticated")
    assert "fusion_ingest" not in anonymous.text
    for wrong in ("garbage", camera_token, session):
        refused = scrape(wrong)
        assert (refused.status_code, refused.json()["error"]) == (403, "forbidden")
    for right in (metrics_token, server.admin_token):
        allowed = scrape(right)
        assert allowed.status_code == 200 and "fusion_ingest_segments_total 1.0" in allowed.text
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(f"{server.url}{path}").status_code == 404


def test_metrics_and_docs_can_be_exposed(open_server: ArchiverServer) -> None:
    assert "fusion_ingest_segments_total" in httpx.get(f"{open_server.url}/metrics").text
    assert httpx.get(f"{open_server.url}/docs").status_code == 200
    assert "/v1/sessions" in httpx.get(f"{open_server.url}/openapi.json").json()["paths"]
