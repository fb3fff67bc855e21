"""RTSP pull: the Archiver runs and supervises one ffmpeg per RTSP camera, which pushes HLS
segments into our own ingest endpoint, so pulled and pushed cameras share one write path.

Each ffmpeg gets an ingest token that exists only in this process's memory; the camera's
admin-issued token is never stored in a form we could hand to ffmpeg.
"""

from __future__ import annotations

import logging
import re
import subprocess
import threading
from dataclasses import dataclass, field

from archiver.auth import digest, new_secret, secret_matches

log = logging.getLogger("archiver.rtsp")
BACKOFF_START_S = 1.0
BACKOFF_MAX_S = 60.0


def redact(url: str) -> str:
    """Drop credentials from a URL before logging it."""
    return re.sub(r"//[^/@]*@", "//***@", url)


@dataclass
class _Puller:
    camera: str
    url: str
    stop: threading.Event = field(default_factory=threading.Event)
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0


class RtspSupervisor:
    def __init__(self, ingest_base_url: str, ffmpeg: str = "ffmpeg") -> None:
        self._base = ingest_base_url
        self._ffmpeg = ffmpeg
        self._pullers: dict[str, _Puller] = {}
        self._tokens: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def accepts(self, camera: str, token: str) -> bool:
        expected = self._tokens.get(camera)
        return expected is not None and secret_matches(token, expected)

    def start(self, camera: str, url: str) -> None:
        self.stop(camera)
        token = new_secret()
        puller = _Puller(camera, url)
        with self._lock:
            self._tokens[camera] = digest(token)
            self._pullers[camera] = puller
        threading.Thread(target=self._run, args=(puller, token), daemon=True,
                         name=f"rtsp-{camera}").start()

    def stop(self, camera: str) -> None:
        with self._lock:
            puller = self._pullers.pop(camera, None)
            self._tokens.pop(camera, None)
        if puller is not None:
            puller.stop.set()
            if puller.process is not None and puller.process.poll() is None:
                puller.process.terminate()

    def stop_all(self) -> None:
        for camera in list(self._pullers):
            self.stop(camera)

    def restarts(self, camera: str) -> int:
        puller = self._pullers.get(camera)
        return puller.restarts if puller else 0

    def _command(self, puller: _Puller, token: str) -> list[str]:
        source = ["-rtsp_transport", "tcp"] if puller.url.startswith("rtsp") else ["-re"]
        return [self._ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", *source,
                "-i", puller.url, "-c", "copy", "-f", "hls", "-hls_time", "2",
                "-hls_list_size", "5", "-method", "PUT",
                "-headers", f"Authorization: Bearer {token}\r\n",
                f"{self._base}/ingest/{puller.camera}/index.m3u8"]

    def _run(self, puller: _Puller, token: str) -> None:
        backoff = BACKOFF_START_S
        while not puller.stop.is_set():
            log.info("camera %s: pulling %s", puller.camera, redact(puller.url))
            puller.process = subprocess.Popen(
                self._command(puller, token), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            _, stderr = puller.process.communicate()
            if puller.stop.is_set():
                break
            puller.restarts += 1
            last = stderr.decode(errors="replace").strip().splitlines()[-1:] or ["(no message)"]
            log.warning("camera %s: ffmpeg exited with %s (%s); restarting in %.0f s",
                        puller.camera, puller.process.returncode, redact(last[0]), backoff)
            puller.stop.wait(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)
