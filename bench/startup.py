"""Start-up (issue 23, item 3): how long each command takes from process start, against real
parts, with the interpreter's own start as the floor.

    python -m bench.startup                                  # this checkout, 15 runs each
    python -m bench.startup --baseline-venv ../before/.venv  # and another checkout, interleaved

Measured, each as the user runs it (the virtualenv's console scripts), N times, median and min
of the wall time and the median CPU time (user + system of the child, which depends far less
on a busy neighbour than wall time does):

- ``python -c pass``: the interpreter's start, the floor of every command;
- play's libraries imported, nothing else: the third-party modules ``play`` loaded (listed by a
  run of it before measuring) imported by a bare interpreter, without this project's code: the
  floor of ``play`` with these libraries;
- ``fusion-client --help``;
- ``fusion-keys list --token URI``: a SoftHSM token with one viewer key;
- ``fusion-archiver cameras list``: over HTTPS against a running Archiver (its data directory
  gives the admin token);
- ``fusion-client play ... -o -``: from process start to the first decrypted byte on its
  standard output (RSA-2048 viewer key on SoftHSM, HTTPS under a site CA, the Archiver's
  certificate pinned by an earlier run); also that time less the time its main thread spent
  runnable but waiting for a core (Linux schedstat, read at the first byte): on a shared
  machine the closest figure to an idle one's, since what a busy neighbour adds to a
  process's wall time is mostly that wait;
- ``fusion-archiver serve``: from process start until ``/healthz`` answers (a restart on an
  existing data directory: the signing token exists).

With ``--baseline-venv DIR`` every command also runs from that virtualenv (another checkout
installed in it, e.g. main: ``git worktree add ../before main``, ``python -m venv
../before/.venv``, ``../before/.venv/bin/pip install -e '../before[archiver]'``); its runs
alternate with ours, so both see the same load. The Archiver that answers ``cameras list`` and
``play`` is this checkout's in both cases: what differs is the command's own start.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.common import machine_info, machine_line, median
from fusion_testkit.client_cli import chunk, put
from fusion_testkit.pki import SiteCa
from fusion_testkit.server import ArchiverServer, free_port, production_archiver, server_env
from fusion_testkit.tokens import EnrolledViewer, SoftHsmStore
from keyservice.timespec import format_ms

# Compiles the installed packages' bytecode (writes it whatever PYTHONDONTWRITEBYTECODE says).
COMPILE = ("import compileall, os, archiver, client, keyservice\n"
           "for m in (archiver, client, keyservice):\n"
           "    compileall.compile_dir(os.path.dirname(m.__file__), quiet=2)\n")
# Runs fusion-client's main() as its console script does, then writes the names of the
# third-party modules the process loaded (not this project's) to the file FLOOR_OUT names.
PLAY_MODULES = ("import json, os, sys\n"
                "sys.argv = ['fusion-client', *sys.argv[1:]]\n"
                "from client.cli import main\n"
                "try:\n    main()\nexcept SystemExit:\n    pass\n"
                "mods = [m for m, v in sys.modules.items() if v is not None\n"
                "        and m.split('.')[0] not in ('client', 'keyservice', 'archiver')]\n"
                "open(os.environ['FLOOR_OUT'], 'w').write(json.dumps(mods))\n")
# Imports exactly those modules and nothing of this project: play's floor with its libraries.
# httpx's own command line refused first, as the client package does for the process (else
# httpx alone would load click, rich and pygments, which play does not).
IMPORT_LIBRARIES = ("import importlib, json, os, sys\n"
                    "sys.modules.setdefault('httpx._main', None)\n"
                    "for m in json.load(open(os.environ['FLOOR_OUT'])):\n"
                    "    try:\n        importlib.import_module(m)\n"
                    "    except ImportError:\n        pass\n")
# A command's measure: wall seconds, or (wall seconds, wall less the wait for a core or None).
Measured = float | tuple[float, float | None]
COMMANDS = ("python -c pass", "play's libraries imported, nothing else", "fusion-client --help",
            "fusion-keys list",
            "fusion-archiver cameras list", "fusion-client play -o - (first byte)",
            "fusion-archiver serve (to /healthz)")


@dataclass
class Code:
    """One installed checkout: the virtualenv whose console scripts run it."""

    name: str
    bin_dir: Path

    def script(self, name: str) -> str:
        return str(self.bin_dir / name)

    @property
    def python(self) -> str:
        return str(self.bin_dir / "python")


@dataclass
class Timings:
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    # Wall time less the main thread's wait for a core (only commands that measure it).
    unqueued: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        result = {"wall_median_ms": median(self.wall) * 1000,
                  "wall_min_ms": min(self.wall) * 1000,
                  "cpu_median_ms": median(self.cpu) * 1000, "runs": len(self.wall)}
        if self.unqueued:
            result["unqueued_median_ms"] = median(self.unqueued) * 1000
            result["unqueued_min_ms"] = min(self.unqueued) * 1000
        return result


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _timed(run: Callable[[], Measured]) -> tuple[Measured, float]:
    """(what ``run`` reports, CPU seconds of the children it waited for)."""
    before = _children_cpu()
    measured = run()
    return measured, _children_cpu() - before


def _runqueue_wait(pid: int) -> float | None:
    """Seconds the main thread of process ``pid`` has spent runnable, waiting for a core
    (Linux /proc/PID/task/PID/schedstat, second field); None where it is not available."""
    try:
        with open(f"/proc/{pid}/task/{pid}/schedstat") as stat:
            return int(stat.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None


def _run(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, stdin=subprocess.DEVNULL,
                          timeout=120, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])}... failed ({done.returncode}): "
                           f"{done.stderr.decode(errors='replace')[-2000:]}")
    return wall


def _first_byte(argv: list[str], env: dict[str, str]) -> tuple[float, float | None]:
    """Seconds from the start of ``argv`` to the first byte on its standard output, and that
    less its main thread's wait for a core until then (then it runs to its end, which must be
    a success). The command is still running when the wait is read: more than a pipe's worth
    of video follows the first byte."""
    start = time.perf_counter()
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               stdin=subprocess.DEVNULL)
    assert process.stdout is not None
    first = process.stdout.read(1)
    wall = time.perf_counter() - start
    waited = _runqueue_wait(process.pid)
    _, err = process.communicate(timeout=120)
    if process.returncode != 0 or not first:
        raise RuntimeError(f"fusion-client play failed ({process.returncode}): "
                           f"{err.decode(errors='replace')[-2000:]}")
    return wall, (wall - waited if waited is not None else None)


def _serve_to_health(code: Code, data: Path, tls: tuple[Path, Path], ca: Path,
                     env: dict[str, str]) -> float:
    """Seconds from the start of ``fusion-archiver serve`` to its first /healthz answer; then
    it is stopped (SIGINT, as systemd would)."""
    port = free_port()
    argv = [code.script("fusion-archiver"), "serve", "--data", str(data), "--port", str(port),
            "--key-period", "60", "--tls-cert", str(tls[0]), "--tls-key", str(tls[1])]
    url = f"https://127.0.0.1:{port}/healthz"
    with open(data.parent / f"{data.name}-serve.log", "ab") as log:
        start = time.perf_counter()
        process = subprocess.Popen(argv, env=server_env(env), stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        with httpx.Client(verify=str(ca), timeout=1) as http:
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"the Archiver exited at start ({process.returncode}); "
                                       f"log {data.parent / (data.name + '-serve.log')}")
                try:
                    if http.get(url).status_code == 200:
                        return time.perf_counter() - start
                except httpx.TransportError:
                    pass
                if time.perf_counter() - start > 60:
                    raise RuntimeError("the Archiver did not answer /healthz within 60 s")
                time.sleep(0.01)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run(runs: int, codes: list[Code], workdir: Path) -> dict[str, Any]:
    print(machine_line(), flush=True)
    site_ca = SiteCa.create(workdir / "site-ca")
    store = SoftHsmStore.create(workdir / "softhsm")
    viewer = EnrolledViewer.enrol(store.new_token("startup"), "viewer")
    server: ArchiverServer = production_archiver(site_ca, workdir / "archiver",
                                                 key_period_s=60)
    server.start(timeout=120)
    try:
        camera = "startup"
        ingest = server.add_camera(camera)
        server.add_viewer(viewer.certificate, [camera])
        first = time.time_ns() // 1_000_000
        put(server, camera, ingest, *(chunk(f"seg{i}", 64 * 1024) for i in range(4)))
        last = time.time_ns() // 1_000_000
        env = {k: v for k, v in os.environ.items() if k not in ("FUSION_PIN", "FUSION_TOKEN")}
        env.update(store.env, FUSION_TLS_CA=str(site_ca.path))
        tls = site_ca.issue_tls_server(workdir / "serve-tls")
        commands: dict[str, Callable[[Code], Measured]] = {}
        homes = {c.name: workdir / f"client-home-{c.name}" for c in codes}
        serve_dirs = {c.name: workdir / f"serve-{c.name}" for c in codes}

        def client_env(code: Code) -> dict[str, str]:
            return {**env, "FUSION_CLIENT_HOME": str(homes[code.name])}

        commands["python -c pass"] = lambda c: _run([c.python, "-c", "pass"], env)
        # The third-party modules play loads (listed once per checkout, below), imported
        # without any of this project's code: how much of play is its libraries' imports.
        floors = {c.name: workdir / f"play-modules-{c.name}.json" for c in codes}
        commands["play's libraries imported, nothing else"] = lambda c: _run(
            [c.python, "-P", "-c", IMPORT_LIBRARIES], {**env, "FLOOR_OUT": str(floors[c.name])})
        commands["fusion-client --help"] = lambda c: _run(
            [c.script("fusion-client"), "--help"], env)
        commands["fusion-keys list"] = lambda c: _run(
            [c.script("fusion-keys"), "list", "--token", viewer.token.uri], env)
        commands["fusion-archiver cameras list"] = lambda c: _run(
            [c.script("fusion-archiver"), "cameras", "list", "--archiver", server.url,
             "--data", str(server.data_dir)], env)
        commands["fusion-client play -o - (first byte)"] = lambda c: _first_byte(
            [c.script("fusion-client"), "play", "--archiver", server.url, "--token", viewer.uri,
             "--camera", camera, "--from", format_ms(first - 1000), "--to",
             format_ms(last + 1000), "-o", "-", "-q"], client_env(c))
        commands["fusion-archiver serve (to /healthz)"] = lambda c: _serve_to_health(
            c, serve_dirs[c.name], tls, site_ca.path, env)

        # Warm-up, unmeasured: compiled bytecode (as an installed program has it: pip compiles
        # at install; PYTHONDONTWRITEBYTECODE would otherwise make every run compile the
        # checkout's modules again), page cache, the pin of the Archiver's certificate (trust
        # on first use), each serve data directory's signing token.
        for code in codes:
            # -P: without the working directory on the import path, or a checkout run from
            # would be compiled in place of the baseline's (which then compiled every module
            # from source on every run, PYTHONDONTWRITEBYTECODE being set).
            _run([code.python, "-P", "-c", COMPILE], env)
            _run([code.python, "-P", "-c", PLAY_MODULES, "play", "--archiver", server.url,
                  "--token", viewer.uri, "--camera", camera, "--from", format_ms(first - 1000),
                  "--to", format_ms(last + 1000), "-o", str(workdir / "floor-video.ts"), "-q"],
                 {**client_env(code), "FLOOR_OUT": str(floors[code.name])})
            for command in commands.values():
                command(code)
        results: dict[str, dict[str, Timings]] = {n: {c.name: Timings() for c in codes}
                                                  for n in commands}
        load = [os.getloadavg()[0]]
        for _ in range(runs):
            for name, command in commands.items():
                for code in codes:  # alternated: both see the same moment's load
                    measured, cpu = _timed(lambda command=command, code=code: command(code))
                    timings = results[name][code.name]
                    wall, unqueued = measured if isinstance(measured, tuple) else (
                        measured, None)
                    timings.wall.append(wall)
                    timings.cpu.append(cpu)
                    if unqueued is not None:
                        timings.unqueued.append(unqueued)
            load.append(os.getloadavg()[0])
    finally:
        server.stop()
        store.close()
    return {"machine": machine_info(), "runs": runs,
            "load_average_during": [round(min(load), 2), round(max(load), 2)],
            "commands": {n: {c: t.summary() for c, t in per.items()}
                         for n, per in results.items()}}


def report(result: dict[str, Any], codes: list[Code]) -> None:
    names = [c.name for c in codes]
    head = " | ".join(f"{n}: wall median (min), CPU" for n in names)
    print(f"\n{result['runs']} runs each; load average {result['load_average_during'][0]}-"
          f"{result['load_average_during'][1]} during the runs")
    print(f"| command | {head} |" + (" ratio (CPU) |" if len(codes) == 2 else ""))
    floor = result["commands"]["python -c pass"]
    for name, per in result["commands"].items():
        cells = []
        for n in names:
            s = per[n]
            over_floor = s["cpu_median_ms"] / floor[n]["cpu_median_ms"]
            cells.append(f"{s['wall_median_ms']:.0f} ms ({s['wall_min_ms']:.0f}), "
                         f"{s['cpu_median_ms']:.0f} ms; {over_floor:.1f}x floor")
        ratio = ""
        if len(codes) == 2:
            ratio = f" {per[names[1]]['cpu_median_ms'] / per[names[0]]['cpu_median_ms']:.2f} |"
        print(f"| {name} | " + " | ".join(cells) + " |" + ratio)
        if all("unqueued_median_ms" in per[n] for n in names):
            cells = [f"{per[n]['unqueued_median_ms']:.0f} ms ({per[n]['unqueued_min_ms']:.0f})"
                     for n in names]
            ratio = ""
            if len(codes) == 2:
                before, after = (per[n]["unqueued_median_ms"] for n in names)
                ratio = f" {after / before:.2f} |"
            print(f"| {name}, less the wait for a core | " + " | ".join(cells) + " |" + ratio)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.startup",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15, help="runs of each command (default 15)")
    parser.add_argument("--baseline-venv", type=Path,
                        help="a virtualenv with another checkout installed: run from it too")
    parser.add_argument("--results", type=Path, help="write every figure as JSON here")
    parser.add_argument("--workdir", type=Path, help="keep tokens, archives and logs here "
                                                     "(default: a temporary directory)")
    args = parser.parse_args(argv)
    codes = [Code("this", Path(sys.executable).parent)]
    if args.baseline_venv is not None:
        codes.insert(0, Code("baseline", args.baseline_venv.resolve() / "bin"))
    for code in codes:
        for script in ("python", "fusion-client", "fusion-keys", "fusion-archiver"):
            if not (code.bin_dir / script).exists():
                parser.error(f"{code.bin_dir / script} does not exist: is it a virtualenv with "
                             "fusion-keyservice installed?")
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        result = run(args.runs, codes, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
            result = run(args.runs, codes, Path(tmp))
    result.update(command="python -m bench.startup " + " ".join(argv or sys.argv[1:]),
                  started_utc=started)
    report(result, codes)
    if args.results is not None:
        args.results.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
