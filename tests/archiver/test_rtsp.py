"""RTSP pull: the Archiver supervises ffmpeg, which pushes into the Archiver's own ingest.

ffmpeg cannot serve RTSP, so the source here is a file URL, allowed only by this in-process
server's settings (the default allows rtsp:// and rtsps:// only); the supervision (start, exit,
restart with backoff, ingest under a process-local token) is the same code path.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import uvicorn

from archiver.app import create_app
from archiver.settings import Settings
from keyservice.token import Token
from tests.fixtures.camera import make_source, requires_ffmpeg
from tests.fixtures.server import free_port


@requires_ffmpeg
def test_pulled_camera_is_supervised_and_restarted(tmp_path: Path, softhsm_token) -> None:
    signer = Token.open(softhsm_token.uri).ensure_signer("archiver", "Test Archiver")
    port = free_port()
    settings = Settings(data_dir=tmp_path / "data", port=port, key_period_s=2,
                        pull_schemes=("rtsp", "rtsps", "file"))
    app = create_app(settings, signer=signer)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        admin = {"Authorization": f"Bearer {(settings.admin_token_path).read_text().strip()}"}
        url = f"http://127.0.0.1:{port}"
        refused = httpx.post(f"{url}/v1/admin/cameras", headers=admin,
                             json={"name": "x", "rtsp_url": "http://example.invalid/"})
        assert refused.status_code == 422 and refused.json()["error"] == "bad_rtsp_url"

        source = make_source(tmp_path / "source.ts", seconds=3)
        created = httpx.post(f"{url}/v1/admin/cameras", headers=admin,
                             json={"name": "door", "rtsp_url": f"file:{source}"})
        assert created.status_code == 201, created.text
        supervisor = app.state.services.rtsp
        deadline = time.monotonic() + 60
        segments = 0
        while time.monotonic() < deadline:
            segments = httpx.get(f"{url}/v1/admin/cameras", headers=admin).json()[0]["segments"]
            if segments >= 3 and supervisor.restarts("door") >= 1:
                break
            time.sleep(0.5)
        # The 3-second source ends, ffmpeg exits, the supervisor starts it again.
        assert supervisor.restarts("door") >= 1
        assert segments >= 3
        assert httpx.delete(f"{url}/v1/admin/cameras/door", headers=admin).status_code == 204
        assert supervisor.restarts("door") == 0  # stopped and forgotten
    finally:
        server.should_exit = True
        thread.join(20)
