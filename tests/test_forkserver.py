"""The suite's Archivers are forked from a pre-imported interpreter (fusion_testkit/forkserver.py).
What the tests rely on holds for a forked one as for a subprocess: it is its own process (the pid
answers signals: SIGSTOP freezes it, SIGKILL ends it with -9), it writes its log where it is told,
it dies with the fork server, and a refused start exits with the command's own status."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx

from fusion_testkit.forkserver import ForkedProcess, ForkServer, fork_server
from fusion_testkit.server import ArchiverServer, free_port, server_env
from keyservice.exitcodes import ExitCode
from tests.fixtures.procfs import stop_process


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _answers(server: ArchiverServer) -> bool:
    try:
        return httpx.get(f"{server.url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_forked_archiver_is_its_own_process_and_obeys_signals(tmp_path: Path) -> None:
    server = ArchiverServer(tmp_path / "data", forked=True).start()
    process = server.process
    assert isinstance(process, ForkedProcess)
    try:
        assert _parent(process.pid) != os.getpid()  # the fork server's child, not ours
        assert process.poll() is None
        stop_process(process.pid)
        assert not _answers(server)  # frozen: the pid is the Archiver's
        os.kill(process.pid, signal.SIGCONT)
        assert _answers(server)
        process.kill()
        assert process.wait(30) == -signal.SIGKILL
        assert process.poll() == -signal.SIGKILL
        process.kill()  # reaped: nothing is signalled any more (the pid may be reused)
    finally:
        server.stop()
    assert f"Started server process [{process.pid}]" in server.log()


def test_a_forked_archiver_stops_on_sigint_and_logs_where_told(tmp_path: Path) -> None:
    server = ArchiverServer(tmp_path / "data", forked=True).start()
    server.stop()
    assert server.process is not None and server.process.returncode is not None
    assert "Finished server process" in server.log()
    # Restarted on the same data directory: the token made by the first start opens.
    with ArchiverServer(tmp_path / "data", forked=True) as again:
        assert _answers(again)


def test_a_refused_start_exits_with_the_commands_status(tmp_path: Path) -> None:
    log = tmp_path / "refused.log"
    process = fork_server(server_env()).spawn(
        "archiver", ["serve", "--data", str(tmp_path / "d"), "--port", str(free_port()),
                     "--host", "0.0.0.0"], server_env(), None, log)
    assert process.wait(60) == ExitCode.USAGE == 2
    assert "Traceback" not in log.read_text()
    assert "without TLS" in log.read_text()


def _gone(pid: int) -> bool:
    try:  # a zombie until whoever inherits it reaps it: dead either way
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_the_forked_archivers_die_with_the_fork_server(tmp_path: Path) -> None:
    own = ForkServer(server_env())  # not this process's shared one
    (tmp_path / "log").touch()
    try:
        child = own.spawn("archiver", ["serve", "--data", str(tmp_path / "d"), "--port",
                                       str(free_port())], server_env(), None, tmp_path / "log")
        deadline = time.monotonic() + 120
        while "Application startup complete" not in (tmp_path / "log").read_text():
            assert time.monotonic() < deadline and child.poll() is None
            time.sleep(0.1)
    finally:
        own.kill()  # the fork server dies without a word
    deadline = time.monotonic() + 30
    while not _gone(child.pid):
        assert time.monotonic() < deadline, "the Archiver outlived its fork server"
        time.sleep(0.1)
