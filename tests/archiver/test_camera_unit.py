"""Cameras that push over HTTPS (issue 20, item 3): how a camera checks the Archiver's
certificate, and what brings it back after an Archiver restart.

- ffmpeg's HLS muxer (Debian 12, ffmpeg 5.1) does not check the certificate: its segment uploads
  never get the TLS options (proved below: a wrong CA still pushes), while the same options on a
  single PUT output are in force.
- The camera units of deploy/ check it instead: ffmpeg pushes to a local socat forwarder
  (fusion-camera-forwarder.service) that verifies chain and name; ffmpeg is restarted by systemd
  (fusion-camera@.service, Restart=always). These tests run the units' own ExecStart lines."""

from __future__ import annotations

import codecs
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from fusion_testkit.pki import SiteCa
from tests.fixtures.camera import requires_ffmpeg
from tests.fixtures.server import ArchiverServer, free_port

ROOT = Path(__file__).resolve().parents[2]
FORWARDER = ROOT / "deploy" / "fusion-camera-forwarder.service"
CAMERA = ROOT / "deploy" / "fusion-camera@.service"
SITE_CA = "/etc/fusion-camera/site-ca.pem"  # where the forwarder unit reads the site CA
LOCAL_PORT = "8081"  # where the forwarder listens and the camera unit pushes

pytestmark = [
    requires_ffmpeg,
    pytest.mark.skipif(shutil.which("socat") is None, reason="socat is not installed "
                       "(scripts/setup.sh installs it)"),
]


def unit_settings(path: Path) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in path.read_text().replace("\\\n", " ").splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def exec_start(path: Path, env: dict[str, str], instance: str = "") -> list[str]:
    """The unit's ExecStart as systemd runs it: quotes, C escapes (\\r\\n), ``${VAR}`` inside
    a word, ``$VAR`` alone split into words, ``%i``."""
    words: list[str] = []
    for word in shlex.split(unit_settings(path)["ExecStart"][0], posix=True):
        if re.fullmatch(r"\$[A-Z_]+", word):
            words += env[word[1:]].split()
            continue
        word = re.sub(r"\$\{([A-Z_]+)\}", lambda m: env[m.group(1)], word)
        words.append(codecs.decode(word.replace("%i", instance), "unicode_escape"))
    return words


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_accepts_the_camera_units(tmp_path: Path) -> None:
    forwarder = tmp_path / FORWARDER.name
    forwarder.write_text(FORWARDER.read_text())
    camera = tmp_path / "fusion-camera@cam1.service"
    camera.write_text(CAMERA.read_text())
    result = subprocess.run(["systemd-analyze", "verify", str(forwarder), str(camera)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "fusion-camera" not in result.stdout + result.stderr, result.stdout + result.stderr
    camera_unit = unit_settings(CAMERA)
    assert camera_unit["Restart"] == ["always"] and camera_unit["StartLimitIntervalSec"] == ["0"]
    assert camera_unit["Requires"] == [FORWARDER.name]


def _source(tmp_path: Path, seconds: int = 8) -> Path:
    path = tmp_path / "source.ts"
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                    "testsrc=size=320x240:rate=25", "-t", str(seconds), "-c:v", "libx264",
                    "-g", "25", "-f", "mpegts", str(path)], check=True)
    return path


def _segments(server: ArchiverServer, camera: str = "cam1") -> int:
    return next(c["segments"] for c in server.admin("GET", "/v1/admin/cameras", expect=200)
                if c["name"] == camera)


def _ffmpeg(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "verbose", *args],
                          capture_output=True, text=True, timeout=180)


def _opened(result: subprocess.CompletedProcess[str]) -> int:
    return len(set(re.findall(r"Opening '[^']*/([^/']+\.ts)' for writing", result.stderr)))


def _settle(server: ArchiverServer, count: int, timeout: float = 20) -> int:
    deadline = time.monotonic() + timeout
    while _segments(server) < count and time.monotonic() < deadline:
        time.sleep(0.2)
    return _segments(server)


def test_ffmpeg_hls_uploads_do_not_check_the_archivers_certificate(
        https_archiver: ArchiverServer, tmp_path: Path) -> None:
    """The limitation the forwarder exists for. If a later ffmpeg checks, this fails: then
    docs/cameras.md can offer the direct push with -tls_verify 1 -ca_file."""
    token = https_archiver.add_camera("cam1")
    wrong = SiteCa.create(tmp_path / "other-ca")
    source = _source(tmp_path, 4)
    header = ["-headers", f"Authorization: Bearer {token}\r\n"]
    tls = ["-tls_verify", "1", "-ca_file", str(wrong.path)]
    # A single PUT (the mpegts muxer, the CLI opens the output): the TLS options are in force.
    single = _ffmpeg("-i", str(source), "-c", "copy", "-f", "mpegts", "-method", "PUT", *header,
                     *tls, f"{https_archiver.url}/ingest/cam1/one.ts")
    assert single.returncode != 0 and "failed verification" in single.stderr
    assert _segments(https_archiver) == 0
    # The HLS muxer: the same options as output options, and through -http_opts: still pushed.
    for options in (tls, ["-http_opts", f"tls_verify=1:ca_file={wrong.path}"]):
        before = _segments(https_archiver)
        hls = _ffmpeg("-i", str(source), "-c", "copy", "-f", "hls", "-hls_time", "2",
                      "-method", "PUT", *header, *options,
                      f"{https_archiver.url}/ingest/cam1/index.m3u8")
        assert hls.returncode == 0, hls.stderr[-2000:]
        assert _settle(https_archiver, before + _opened(hls)) == before + _opened(hls) > before


def _listens(pid: int, port: int) -> bool:
    """Whether process ``pid`` itself holds a socket listening on 127.0.0.1:``port`` (not
    another process that took the port between free_port() and socat's bind)."""
    sockets = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().name
        except OSError:
            continue
        if target.startswith("socket:["):
            sockets.add(target[8:-1])
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == f"0100007F:{port:04X}" and fields[3] == "0A" and fields[9] in sockets:
            return True
    return False


@contextmanager
def forwarder(server: ArchiverServer, site_ca: Path, host: str = "127.0.0.1") -> Iterator[str]:
    """The forwarder unit's ExecStart (its CA file and port moved for the test); yields the
    local port once socat listens on it, and on exit leaves its log in ``forwarder.log`` beside
    the CA. A port taken by a parallel test before socat bound it is given up for another."""
    log = site_ca.parent / "forwarder.log"
    for _attempt in range(3):
        port = free_port()
        command = [word.replace(SITE_CA, str(site_ca)).replace(LOCAL_PORT, str(port), 1)
                   if word.startswith(("OPENSSL:", "TCP-LISTEN:")) else word
                   for word in exec_start(FORWARDER, {"FUSION_ARCHIVER_HOST": host,
                                                      "FUSION_ARCHIVER_PORT": str(server.port)})]
        with open(log, "ab") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 10
            while process.poll() is None and time.monotonic() < deadline:
                if _listens(process.pid, port):
                    yield str(port)
                    return
                time.sleep(0.05)
        finally:
            process.terminate()
            process.wait(10)
    raise AssertionError(f"socat never listened; its log:\n{log.read_text()}")


def _push_via(port: str, token: str, source: Path) -> subprocess.CompletedProcess[str]:
    # Four times real time: each segment is still its own PUT through the forwarder (what is
    # tested: which Archiver it reaches, and that all arrive); when they arrive does not matter.
    env = {"FUSION_CAMERA_TOKEN": token,
           "FUSION_CAMERA_INPUT": f"-readrate 4 -i {source} -c copy"}
    command = exec_start(CAMERA, env, "cam1")
    command = [w.replace(f":{LOCAL_PORT}/", f":{port}/") for w in command]
    return _ffmpeg(*[w for w in command[1:] if w not in ("-loglevel", "warning")])


def test_the_forwarder_pushes_only_to_an_archiver_it_can_verify(
        site_ca: SiteCa, tmp_path: Path) -> None:
    # An Archiver whose certificate names only 127.0.0.1 (not "localhost").
    cert, key = site_ca.issue_tls_server(tmp_path / "tls", ("127.0.0.1",))
    with ArchiverServer(tmp_path / "archiver", tls_ca=site_ca.path,
                        extra_args=("--tls-cert", str(cert), "--tls-key", str(key))) as server:
        token = server.add_camera("cam1")
        source = _source(tmp_path)
        wrong = SiteCa.create(tmp_path / "other-ca")
        for ca, host in ((wrong.path, "127.0.0.1"), (site_ca.path, "localhost")):
            with forwarder(server, ca, host) as port:
                pushed = _push_via(port, token, source)
            assert _opened(pushed) >= 3
            time.sleep(1)
            assert _segments(server) == 0, (ca, host)
        log = (tmp_path / "other-ca" / "forwarder.log").read_text()
        assert "certificate verify failed" in log, log
        with forwarder(server, site_ca.path) as port:
            pushed = _push_via(port, token, source)
        assert pushed.returncode == 0, pushed.stderr[-2000:]
        # Every segment ffmpeg opened arrives (the count is the issue's: 12 of 12 figures).
        assert _settle(server, _opened(pushed)) == _opened(pushed) >= 3
        assert "No trailing CRLF" not in pushed.stderr


class Supervised:
    """The camera unit's ExecStart relaunched as systemd's Restart=always does (after
    RestartSec), with a generated live source."""

    def __init__(self, port: str, token: str, log: Path) -> None:
        self.env = {"FUSION_CAMERA_TOKEN": token, "FUSION_CAMERA_INPUT":
                    "-re -f lavfi -i testsrc=size=320x240:rate=25 -c:v libx264 -preset "
                    "ultrafast -g 25 -pix_fmt yuv420p"}
        self.command = [w.replace(f":{LOCAL_PORT}/", f":{port}/")
                        for w in exec_start(CAMERA, self.env, "cam1")]
        self.restart_s = float(unit_settings(CAMERA)["RestartSec"][0])
        self.log, self.starts, self.stopping = log, 0, False
        self.process: subprocess.Popen[bytes] | None = None

    def poll(self) -> None:
        if self.process is None or self.process.poll() is not None:
            if self.process is not None:
                time.sleep(self.restart_s)
            with open(self.log, "ab") as out:
                self.process = subprocess.Popen(self.command, stdout=out, stderr=out,
                                                stdin=subprocess.DEVNULL)
            self.starts += 1

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


def test_a_supervised_camera_resumes_after_an_archiver_restart(
        https_archiver: ArchiverServer, site_ca: SiteCa, tmp_path: Path) -> None:
    token = https_archiver.add_camera("cam1")
    with forwarder(https_archiver, site_ca.path) as port:
        camera = Supervised(port, token, tmp_path / "camera.log")
        try:
            def run_until(condition, timeout: float = 60) -> bool:
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    camera.poll()
                    if condition():
                        return True
                    time.sleep(0.2)
                return False

            assert run_until(lambda: _segments(https_archiver) >= 2), camera.log.read_text()
            https_archiver.stop()
            time.sleep(3)  # the camera's uploads fail meanwhile
            https_archiver.start()
            after_restart = _segments(https_archiver)
            assert run_until(lambda: _segments(https_archiver) >= after_restart + 3), \
                camera.log.read_text()[-3000:]
            state = next(c for c in https_archiver.admin("GET", "/v1/admin/cameras")
                         if c["name"] == "cam1")["state"]
            assert state == "receiving"
        finally:
            camera.stop()
    log = https_archiver.log()
    # The first segment after the restart is not "again" (that start never saw the camera).
    assert "camera cam1: receiving (first segment since start)" in log
    assert "Traceback" not in log
