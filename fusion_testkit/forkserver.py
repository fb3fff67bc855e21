"""Our commands forked from an interpreter that has imported them already.

Starting ``python -m archiver serve`` costs about a second of CPU, three quarters of it imports
(FastAPI and its pydantic models, SQLAlchemy, the token layer), a ``fusion-client`` or
``fusion-archiver`` command 0.2-0.3 s, and a test suite runs hundreds of each on two cores. The
fork server imports those modules once; each command is then a ``fork()`` of it that runs
``python -m MODULE ARGS`` as the command line would.

The child is the real process: the installed package's code, its own pid (signals, ``kill -9``
and ``/proc/PID/fd`` act on it), its own exit status, the environment, working directory,
standard input and output files the caller gave. What it does not have is its own
``/proc/PID/cmdline`` and ``/proc/PID/environ`` (those of the fork server): a test that reads
them starts its process as a plain subprocess (``ArchiverServer(forked=False)``), and so does a
test of what a command imports.

Protocol, one JSON object per line on the fork server's stdin, one reply line on its stdout:
``{"op": "spawn", "module", "args", "env", "cwd", "stdin", "stdout", "stderr"}`` (file paths)
-> ``{"pid"}``, and ``{"op": "wait", "pid"}`` -> ``{"code"}`` (asked once the child has exited:
the caller watches it through a pidfd). At end of input the fork server kills the children still
running.

Two things keep a child cheap (measured: a `fusion-archiver grants approve` 0.33 -> 0.04 CPU-s,
16 000 -> 3 300 page faults). The preloaded objects are frozen out of the garbage collector
(``gc.freeze()``, as the gc documentation advises before forking), so the child's collections
do not walk, and so copy, the parent's pages. And the child ends as the interpreter would but
without its final teardown of every module and object, which in a forked child copies most of
the parent's memory for nothing: it waits for its non-daemon threads, runs the atexit handlers
(logging's flush, ``weakref.finalize``, temporary directories), collects its own garbage,
flushes the standard streams and leaves with ``os._exit``.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import gc
import importlib
import json
import os
import runpy
import select
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

# What `archiver serve` imports on its way to answering /healthz, and what the commands import
# lazily (each command imports only what it runs, for its own start-up).
PRELOAD = ("archiver.cli", "archiver.app", "archiver.server", "archiver.signing",
           "archiver.directory.store", "archiver.rtsp", "keyservice.token", "uvicorn",
           "uvicorn.config", "uvicorn.lifespan.on", "uvicorn.loops.auto",
           "uvicorn.protocols.http.auto", "uvicorn.protocols.http.h11_impl",
           "archiver.admin_cli", "keyservice.cli", "client.cli", "client.playback",
           "client.session", "client.player", "client.evidence", "client.grants", "httpx",
           "cryptography.x509", "pkcs11",
           # play and live import these in a thread or on first use (issue 23, start-up)
           "keyservice.reader", "client.answers")
# Whether commands and Archivers are forked (fork_commands); off: plain subprocesses.
_enabled = False
_PR_SET_PDEATHSIG = 1


def _child(request: Mapping[str, Any]) -> NoReturn:
    """In the forked child: become ``python -m MODULE ARGS`` and exit with its status."""
    code: object = 0
    try:
        # Die with the fork server (and so with the test process that owns it).
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        stdin = os.open(request.get("stdin") or os.devnull, os.O_RDONLY)
        stdout = os.open(request["stdout"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        stderr = os.open(request["stderr"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(stdin, 0)
        os.dup2(stdout, 1)
        os.dup2(stderr, 2)
        os.closerange(3, 1 << 16)  # the fork server's own descriptors stay with it
        sys.stdin = open(0, closefd=False)  # the process's stdin, never closed
        if request.get("cwd"):
            os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        if not request.get("safe_path", True):  # `python -m` without -P: the directory first
            sys.path.insert(0, os.getcwd())
        sys.argv = [request["module"], *request["args"]]
        # As in a fresh `python -m`, the module runs as __main__ and is not yet imported
        # (runpy warns on stderr otherwise, and the commands' stderr is what tests read).
        sys.modules.pop(request["module"], None)
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        code = exit_.code
    except BaseException:  # reported as the interpreter would: status 1
        traceback.print_exc()
        code = 1
    os._exit(_finish(code))


def _finish(code: object) -> int:
    """What the interpreter does at exit, less the teardown of every object (see the module's
    docstring); returns the exit status of ``SystemExit(code)``."""
    if code is not None and not isinstance(code, int):  # SystemExit("message"): printed, 1
        with contextlib.suppress(Exception):
            print(code, file=sys.stderr)
        code = 1
    for thread in threading.enumerate():  # the interpreter waits for them too
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # no public way to run them without exiting
    gc.collect()  # the child's own objects (frozen ones are not walked): files closed
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    return (code or 0) & 0xFF


def main() -> None:
    for name in PRELOAD:
        importlib.import_module(name)
    gc.freeze()
    replies = sys.stdout.buffer
    children: set[int] = set()
    replies.write(b'{"ready": true}\n')
    replies.flush()
    for line in sys.stdin.buffer:
        request = json.loads(line)
        if request["op"] == "spawn":
            pid = os.fork()
            if pid == 0:
                children.clear()
                _child(request)
            children.add(pid)
            reply: dict[str, int] = {"pid": pid}
        else:
            _, status = os.waitpid(request["pid"], 0)
            children.discard(request["pid"])
            reply = {"code": os.waitstatus_to_exitcode(status)}
        replies.write(json.dumps(reply).encode() + b"\n")
        replies.flush()
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


class ForkedProcess:
    """The part of ``subprocess.Popen`` the tests use, for a child of the fork server: the
    exit is seen through a pidfd, the status comes from the fork server, which reaps it."""

    def __init__(self, server: ForkServer, pid: int, args: Sequence[str]) -> None:
        self.pid = pid
        self.args = list(args)
        self.returncode: int | None = None
        self._server = server
        self._pidfd = os.pidfd_open(pid)
        self._closer = weakref.finalize(self, os.close, self._pidfd)

    def _exited(self, timeout: float | None) -> bool:
        return bool(select.select([self._pidfd], [], [], timeout)[0])

    def _reap(self) -> None:
        self.returncode = self._server.reap(self.pid)
        self._closer()

    def poll(self) -> int | None:
        if self.returncode is None and self._exited(0):
            self._reap()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            if not self._exited(timeout):
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
            self._reap()
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        # Until reaped, the pid is this process's (a zombie at worst), never a reused one.
        if self.returncode is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """One fork server per test process, started on first use."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._lock = threading.Lock()
        self._process = subprocess.Popen(
            [sys.executable, "-P", "-m", "fusion_testkit.forkserver"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, env=dict(env))
        ready = self._process.stdout.readline() if self._process.stdout else b""
        if not ready:
            raise RuntimeError("the fork server did not start (see the output above)")

    def _ask(self, request: Mapping[str, Any]) -> dict[str, Any]:
        assert self._process.stdin is not None and self._process.stdout is not None
        with self._lock:
            self._process.stdin.write(json.dumps(request).encode() + b"\n")
            self._process.stdin.flush()
            reply = self._process.stdout.readline()
        if not reply:
            raise RuntimeError("the fork server exited")
        return json.loads(reply)

    def kill(self) -> None:
        """End the fork server at once (SIGKILL): its children die with it."""
        self._process.kill()
        self._process.wait()

    def alive(self) -> bool:
        return self._process.poll() is None

    def spawn(self, module: str, args: Sequence[str], env: Mapping[str, str],
              cwd: Path | None, stdout: Path, stderr: Path | None = None,
              stdin: Path | None = None, safe_path: bool = True) -> ForkedProcess:
        """``python -P -m MODULE ARGS`` (``python -m`` if not ``safe_path``), its output
        appended to ``stdout`` (and ``stderr``, by default the same file), its input ``stdin``
        (by default /dev/null)."""
        reply = self._ask({"op": "spawn", "module": module, "args": list(args), "env": dict(env),
                           "cwd": str(cwd) if cwd else None, "stdout": str(stdout),
                           "stderr": str(stderr or stdout), "safe_path": safe_path,
                           "stdin": str(stdin) if stdin else None})
        return ForkedProcess(self, reply["pid"], [sys.executable, "-m", module, *args])

    def reap(self, pid: int) -> int:
        return self._ask({"op": "wait", "pid": pid})["code"]


_servers: dict[int, ForkServer] = {}


def fork_commands(on: bool = True) -> None:
    """Fork ArchiverServer's Archivers and ``run``'s commands from now on (a test suite that
    runs many turns it on; each costs a fraction of a fresh interpreter)."""
    global _enabled
    _enabled = on


def enabled() -> bool:
    return _enabled


def fork_server(env: Mapping[str, str]) -> ForkServer:
    """This process's fork server (a new one if it is not running)."""
    server = _servers.get(os.getpid())
    if server is None or not server.alive():
        server = _servers[os.getpid()] = ForkServer(env)
    return server


def _module_of(args: Sequence[str], cwd: object) -> tuple[str, list[str], bool] | None:
    """``[sys.executable, (-P,) -m, MODULE, *rest]`` -> (MODULE, rest, -P given); None for
    anything else, and for ``-m`` without ``-P`` in another directory (whose own packages would
    come before the ones the fork server has imported)."""
    args = [str(a) for a in args]
    if not args or args[0] != sys.executable:
        return None
    if args[1:3] == ["-P", "-m"] and len(args) > 3:
        return args[3], args[4:], True
    if args[1:2] == ["-m"] and len(args) > 2 and cwd is None:
        return args[2], args[3:], False
    return None


def run(args: Sequence[str], *, capture_output: bool = False, text: bool = False,
        timeout: float | None = None, env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None, stdin: int | None = None, input: str | bytes | None = None,
        check: bool = False, **other: Any) -> subprocess.CompletedProcess[Any]:
    """``subprocess.run`` for ``python -m MODULE ...`` with its output captured: forked from the
    fork server when forking is on, else (or for anything else) ``subprocess.run`` itself."""
    target = _module_of(args, cwd)
    if (not _enabled or target is None or not capture_output or other
            or stdin not in (None, subprocess.DEVNULL)):
        return subprocess.run(args, capture_output=capture_output, text=text, timeout=timeout,
                              env=env, cwd=cwd, stdin=stdin, input=input, check=check, **other)
    module, rest, safe_path = target
    with tempfile.TemporaryDirectory(prefix="fork-run-") as scratch:
        out, err, given = (Path(scratch) / name for name in ("out", "err", "in"))
        out.touch()
        err.touch()
        if input is not None:
            given.write_bytes(input.encode() if isinstance(input, str) else input)
        process = fork_server(os.environ).spawn(
            module, rest, os.environ if env is None else env, Path(cwd) if cwd else None,
            out, err, given if input is not None else None, safe_path)
        try:
            code = process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise subprocess.TimeoutExpired(list(args), timeout or 0, out.read_bytes(),
                                            err.read_bytes()) from None
        stdout, stderr = out.read_bytes(), err.read_bytes()
    if text:  # as subprocess's text mode reads: the locale's encoding, universal newlines
        decoded = [data.decode().replace("\r\n", "\n").replace("\r", "\n")
                   for data in (stdout, stderr)]
        result = subprocess.CompletedProcess(list(args), code, decoded[0], decoded[1])
    else:
        result = subprocess.CompletedProcess(list(args), code, stdout, stderr)
    if check:
        result.check_returncode()
    return result


if __name__ == "__main__":
    main()
