"""Start-up (issue 23, item 3): each CLI command imports what it uses and nothing else.

Every command runs in a subprocess, as its console script does (``PROG.main()``), and reports
which modules it loaded; a named heavy package (cryptography, httpx, the token layer, the web
framework, PyAV, rich, pydantic) that the command does not need must not be among them. Help is
asked of each CLI; ``fusion-keys list``, ``fusion-archiver cameras list`` and ``fusion-client
play ... -o -`` run for real (SoftHSM token, HTTPS Archiver under a site CA). No timing is
asserted: the benchmark (``python -m bench.startup``) measures; this proves the cause.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
import typer.main

from client.logins import login, open_identity
from client.pinning import KnownArchivers
from client.session import ArchiverSession
from client.site import Site, trust_followed
from fusion_testkit.client_cli import chunk, iso, now_ms, put
from fusion_testkit.server import ArchiverServer
from fusion_testkit.tokens import EnrolledViewer
from keyservice.cli_support import only_invoked
from keyservice.dercert import DerCertificate
from keyservice.exitcodes import ExitCode
from keyservice.tls import trust as tls_trust

# Runs one CLI's main() as its console script does, then writes the names of the modules the
# process loaded (sys.modules, refused imports left out) to the file FUSION_PROBE_OUT names:
# stdout is the command's (video, for play).
PROBE = """
import importlib, json, os, sys
prog, *args = sys.argv[1:]
module = {"fusion-client": "client.cli", "fusion-keys": "keyservice.cli",
          "fusion-archiver": "archiver.cli"}[prog]
sys.argv = [prog, *args]
code = 0
try:
    importlib.import_module(module).main()
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else 1
loaded = sorted(name for name, mod in sys.modules.items() if mod is not None)
with open(os.environ["FUSION_PROBE_OUT"], "w") as out:
    json.dump({"code": code, "modules": loaded}, out)
sys.exit(code)
"""

# What building a CLI (help, usage errors) never needs.
HEAVY = ("cryptography", "httpx", "httpcore", "pkcs11", "asn1crypto", "av", "fastapi",
         "starlette", "uvicorn", "pydantic", "rich", "pygments", "sqlite3", "zipfile",
         "prometheus_client")


def loaded_by(tmp_path: Path, prog: str, *args: str, env: dict[str, str] | None = None,
              expect: int = 0) -> set[str]:
    """The modules ``prog args`` loaded, run in a subprocess; its exit code must be ``expect``."""
    out = tmp_path / f"probe-{prog}-{len(list(tmp_path.glob('probe-*')))}.json"
    run_env = {**(env if env is not None else os.environ), "FUSION_PROBE_OUT": str(out),
               "COLUMNS": "100"}
    # -P: as a console script, without the working directory on sys.path (a test's data
    # directory named "archiver" would be imported as a namespace package).
    done = subprocess.run([sys.executable, "-P", "-c", PROBE, prog, *args], capture_output=True,
                          env=run_env, timeout=120, stdin=subprocess.DEVNULL, cwd=tmp_path)
    stderr = done.stderr.decode(errors="replace")
    assert "Traceback" not in stderr, stderr
    assert done.returncode == expect, f"{prog} {' '.join(args)}: exit {done.returncode}: {stderr}"
    return set(json.loads(out.read_text())["modules"])


def heavy_in(modules: set[str], names: Sequence[str] = HEAVY) -> list[str]:
    """The packages of ``names`` that ``modules`` holds (a package or any of its submodules)."""
    return sorted({m.split(".")[0] for m in modules} & set(names))


HELP = [("fusion-client", "--help"), ("fusion-client", "play", "--help"),
        ("fusion-client", "live", "--help"), ("fusion-client", "evidence", "verify", "--help"),
        ("fusion-client", "grants", "play", "--help"), ("fusion-client", "view", "--help"),
        ("fusion-keys", "--help"), ("fusion-keys", "list", "--help"),
        ("fusion-keys", "enroll", "--help"), ("fusion-archiver", "--help"),
        ("fusion-archiver", "serve", "--help"), ("fusion-archiver", "cameras", "list", "--help"),
        ("fusion-archiver", "check", "--help")]


@pytest.mark.parametrize("argv", HELP, ids=[" ".join(a) for a in HELP])
def test_help_loads_no_heavy_package(tmp_path: Path, argv: tuple[str, ...]) -> None:
    modules = loaded_by(tmp_path, *argv)
    assert "typer" in modules  # the probe sees what the command loaded
    assert heavy_in(modules) == [], f"{' '.join(argv)} loaded {heavy_in(modules)}"
    # The library behind the commands stays out until a command runs.
    assert not {"client.viewer", "client.session", "keyservice.token", "keyservice.reader",
                "archiver.admin_client", "archiver.app"} & modules


def test_a_usage_error_loads_no_heavy_package(tmp_path: Path) -> None:
    """A mistyped command is refused (exit 2) as cheaply as help is shown."""
    modules = loaded_by(tmp_path, "fusion-client", "play", "--camera", "x", expect=2)
    assert heavy_in(modules) == []


def test_the_probe_sees_heavy_packages(tmp_path: Path) -> None:
    """The check can fail: a command that does load cryptography is seen to (``fusion-client
    open`` verifies a file offline: the certificate of --archiver-cert is loaded first)."""
    cert = tmp_path / "not-a-cert.pem"
    cert.write_text("not a certificate")
    modules = loaded_by(tmp_path, "fusion-client", "open", str(cert), "-o", "-", "--token",
                        "pkcs11:token=none", "--archiver-cert", str(cert), expect=30)
    assert "cryptography" in heavy_in(modules)


def test_help_shows_the_librarys_own_bounds() -> None:
    """The defaults and bounds help shows are written beside the options (so that building the
    CLI imports no library): they are the library's values."""
    from client import options, session
    from keyservice import certs, cli, request_policy

    assert options.MAX_LIVE_S == session.MAX_LIVE_S
    assert options.DEFAULT_CLOCK_SKEW_S * 1000 == request_policy.DEFAULT_MAX_SKEW_MS
    assert cli.VIEWER_DAYS == certs.VIEWER_DAYS


@pytest.mark.parametrize("package", ["client", "keyservice.crypto", "keyservice.token"])
def test_lazy_packages_keep_their_public_names(package: str) -> None:
    """client, keyservice.crypto (deprecated re-exports) and keyservice.token import their
    names on first use: each name of ``__all__`` is there, the owner's very object, and listed
    by dir(); an unknown name is an AttributeError."""
    module = importlib.import_module(package)
    for name in module.__all__:
        value = getattr(module, name)
        assert value is not None, name
        assert name in dir(module), name
    with pytest.raises(AttributeError):
        module.no_such_name
    if package == "keyservice.crypto":
        from keyservice.crypto.segments import PeriodKey

        assert module.MinuteKey is PeriodKey and module.PeriodKey is PeriodKey


def test_importing_a_package_loads_only_what_is_asked_for(tmp_path: Path) -> None:
    """``import client`` (and one submodule of keyservice.crypto or keyservice.token) does not
    load the rest: httpx, the token layer and the other protocols wait for their first use."""
    code = ("import sys, json\n"
            "import client, keyservice.crypto.segments, keyservice.token\n"
            "print(json.dumps(sorted(m for m, v in sys.modules.items() if v is not None)))\n")
    done = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True,
                          timeout=120, check=True, cwd=tmp_path)
    modules = set(json.loads(done.stdout))
    assert heavy_in(modules, ("httpx", "pkcs11", "asn1crypto")) == []
    assert not {"client.viewer", "client.session", "keyservice.crypto.login",
                "keyservice.crypto.ratchet", "keyservice.token.provisioning",
                "keyservice.token.runtime"} & modules


def test_play_leaves_the_reader_for_the_logins_wait(tmp_path: Path) -> None:
    """What play imports before it logs in holds neither the stream's reader nor the crypto
    core: play imports them in a thread while the login waits for the Archiver
    (client.preload.import_in_background), and the Player takes them when it is made."""
    code = ("import sys, json\n"
            "import client.playback, client.player, client.site, client.logins\n"
            "print(json.dumps(sorted(m for m, v in sys.modules.items() if v is not None)))\n")
    done = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True,
                          timeout=120, check=True, cwd=tmp_path)
    modules = set(json.loads(done.stdout))
    assert "client.player" in modules
    assert not {"keyservice.reader", "keyservice.crypto.segments", "keyservice.crypto.chains",
                "keyservice.crypto.ratchet", "keyservice.framing"} & modules


# --- commands that run for real -------------------------------------------------------------
def test_fusion_keys_list_loads_only_the_token_layer(
        tmp_path: Path, fusion_viewer_factory: Callable[..., EnrolledViewer]) -> None:
    viewer = fusion_viewer_factory("startup-keys")
    modules = loaded_by(tmp_path, "fusion-keys", "list", "--token", viewer.token.uri,
                        env={**os.environ, **viewer.env})
    assert {"pkcs11", "keyservice.token.provisioning"} <= modules  # it did open the token
    assert heavy_in(modules, ("httpx", "fastapi", "starlette", "uvicorn", "av", "rich",
                              "pygments", "pydantic", "zipfile")) == []
    assert "keyservice.token.piv" not in modules


def test_cameras_list_and_play_load_no_web_framework(
        tmp_path: Path, https_archiver: ArchiverServer,
        fusion_viewer_factory: Callable[..., EnrolledViewer]) -> None:
    """``fusion-archiver cameras list`` and ``fusion-client play ... -o -`` against a real
    HTTPS Archiver: each does its work (exit 0, the camera listed, the video decrypted) and
    loads neither the web framework nor PyAV nor rich; play loads no web page, evidence
    verifier or grants code."""
    assert https_archiver.tls_ca is not None
    camera = "startup-cam"
    viewer = fusion_viewer_factory("startup-viewer")
    ingest = https_archiver.add_camera(camera)
    https_archiver.add_viewer(viewer.certificate, [camera])
    start = now_ms() - 1000
    put(https_archiver, camera, ingest, chunk("one"), chunk("two"))
    env = {k: v for k, v in os.environ.items() if k not in ("FUSION_PIN", "FUSION_TOKEN")}
    env.update(viewer.env, FUSION_TLS_CA=str(https_archiver.tls_ca),
               FUSION_CLIENT_HOME=str(tmp_path / "client-home"))
    never = ("fastapi", "starlette", "uvicorn", "av", "rich", "pygments", "pydantic",
             "prometheus_client")

    admin = loaded_by(tmp_path, "fusion-archiver", "cameras", "list", "--archiver",
                      https_archiver.url, "--data", str(https_archiver.data_dir), "--json",
                      env=env)
    assert "httpx" in admin and heavy_in(admin, never) == []
    assert heavy_in(admin, ("pkcs11", "asn1crypto")) == []

    home = tmp_path / "client-home"
    # (This login, the first, pins the Archiver for the play below, which then takes the
    # pinned path: no X.509 parse.) Where the range was recorded costs play one round trip,
    # not two: the placements answer names the Archiver that answered, so its name is not
    # asked for separately (GET /v1/archiver); the plan is the same one (one part, the
    # entry's own).
    asked: list[str] = []

    class Counting(httpx.HTTPTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            asked.append(request.url.path)
            return super().handle_request(request)

    trust = tls_trust(https_archiver.tls_ca)
    with (ArchiverSession(https_archiver.url, trust=trust,
                          transport=Counting(verify=trust)) as session,
          open_identity(viewer.uri) as identity):
        assert isinstance(identity.certificate, DerCertificate)
        logged = login(session, identity, known=KnownArchivers(home / "known_archivers"))
        assert isinstance(logged.result.archiver_certificate, DerCertificate)
        asked.clear()
        with Site(session, logged, identity, check=trust_followed(
                KnownArchivers(home / "known_archivers"), ())) as site:
            parts = site.parts(camera, start, now_ms())
            assert asked == [f"/v1/cameras/{camera}/placements"]
            assert [(p.entry, p.archiver) for p in parts] == [(True, session.name())]
            assert site.entry_name == session.name()

    video = tmp_path / "video.ts"
    played = loaded_by(tmp_path, "fusion-client", "play", "--archiver", https_archiver.url,
                       "--token", viewer.uri, "--camera", camera, "--from", iso(start),
                       "--to", iso(now_ms() + 1000), "-o", str(video), "-q", env=env)
    assert b"one|" in video.read_bytes() and b"two|" in video.read_bytes()
    assert heavy_in(played, never) == []
    assert not {"client.web", "client.web.server", "keyservice.evidence.verify",
                "keyservice.evidence.build", "client.evidence_zip", "keyservice.grants",
                "keyservice.token.piv", "keyservice.token.provisioning"} & played
    # Nor the whole viewer library (grants, evidence, whole-range results), a redundant
    # camera's copies, or statistics: play goes through client.logins.
    assert not {"client.viewer", "client.copies", "client.across", "statistics"} & played
    assert "client.preload" in played  # the token's module was loaded beside the imports
    # Nor what only a PIN prompt or keyservice's listed surface (keyservice.__all__) uses.
    assert not {"getpass", "pkgutil"} & played
    # Nor an X.509 parser: the certificates on the way to the first byte (the viewer's on the
    # token, the Archiver's in the login challenge and in the stream's header) are read as DER
    # bytes and the key of exactly those bytes (keyservice.dercert); the full parse waits for
    # a check that needs it (--site-ca, first use, --archiver-cert). Nor the classes of
    # answers and keys play does not use (client.answers, keyservice.software_keys).
    assert not {"cryptography.x509", "keyservice.certs", "client.answers",
                "keyservice.software_keys"} & played
    assert "keyservice.dercert" in played

    # The same path still refuses: a wrong PIN is one sentence and its own exit code (the
    # token is asked once, never again), and an Archiver whose signing certificate is not the
    # pinned one is refused; neither writes any video.
    def refused(output: str, token_uri: str, home: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-P", "-m", "client", "play", "--archiver", https_archiver.url,
             "--camera", camera, "--from", iso(start), "--to", iso(now_ms() + 1000),
             "-o", str(tmp_path / output), "--token", token_uri],
            env={**env, "FUSION_CLIENT_HOME": str(home)}, capture_output=True, text=True,
            timeout=120)

    pin = f"pin-value={viewer.token.pin}"
    assert pin in viewer.uri
    other = ("0" if viewer.token.pin[0] != "0" else "1") + viewer.token.pin[1:]
    done = refused("wrong-pin.ts", viewer.uri.replace(pin, f"pin-value={other}"),
                   tmp_path / "client-home")
    assert done.returncode == ExitCode.PIN_INCORRECT, done.stderr
    assert len(done.stderr.splitlines()) == 1 and "is wrong" in done.stderr, done.stderr
    other_home = tmp_path / "other-home"
    KnownArchivers(other_home / "known_archivers").remember(https_archiver.url, bytes(32))
    done = refused("mismatch.ts", viewer.uri, other_home)
    assert done.returncode == ExitCode.ARCHIVER_MISMATCH, done.stderr
    assert not list(tmp_path.glob("wrong-pin.ts*")) and not list(tmp_path.glob("mismatch.ts*"))



# --- the token's module loaded in a thread, first thing (client/preload.py) ------------------
# Reads the PIN from a pin-source that never answers: a named pipe without a writer. Opening it
# to read would block the thread for good.
PRELOAD = """
import os, sys
from client.preload import preload_token_module
thread = preload_token_module(sys.argv[1])
thread.join(60)
print("alive" if thread.is_alive() else "done", "pkcs11" in sys.modules)
from keyservice.token import RuntimeToken
token = RuntimeToken.open(sys.argv[2])
print(token.identity().label)
token.close()
"""


def test_the_token_preload_reads_no_pin(
        tmp_path: Path, fusion_viewer_factory: Callable[..., EnrolledViewer]) -> None:
    """play and live load the token's PKCS#11 module in a thread while they import the rest:
    only the module (C_Initialize). The thread never reads the PIN, so it never logs in and
    can spend no try of a wrong one: given a pin-source that would block whoever read it, it
    finishes, and the token opens afterwards in the same process as it always did."""
    viewer = fusion_viewer_factory("startup-preload")
    pin = f"pin-value={viewer.token.pin}"
    assert pin in viewer.uri
    fifo = tmp_path / "pin-fifo"
    os.mkfifo(fifo)
    never = viewer.uri.replace(pin, f"pin-source=file:{fifo}")
    done = subprocess.run([sys.executable, "-P", "-c", PRELOAD, never, viewer.uri],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, **viewer.env})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["done", "True", "startup-preload"], done.stdout


def test_play_reports_a_token_failure_once(tmp_path: Path) -> None:
    """What the preload fails at (here a PKCS#11 module that does not exist) is reported by
    the token's open, in the main thread, as before: one sentence, the module's exit code,
    nothing from the thread, no video file; nothing is asked of the Archiver before."""
    missing = tmp_path / "no-such-module.so"
    video = tmp_path / "video.ts"
    env = {k: v for k, v in os.environ.items() if k not in ("FUSION_PIN", "FUSION_TOKEN")}
    done = subprocess.run(
        [sys.executable, "-P", "-m", "client", "play", "--archiver", "https://127.0.0.1:9",
         "--camera", "cam", "--from", "-1m", "-o", str(video), "--token",
         f"pkcs11:token=none;object=viewer?module-path={missing}&pin-value=1234"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**env, "FUSION_CLIENT_HOME": str(tmp_path / "home")})
    assert done.returncode == ExitCode.MODULE_NOT_FOUND, done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert str(missing) in done.stderr and "Traceback" not in done.stderr
    assert list(tmp_path.glob("video.ts*")) == []


# --- typer builds only the command that runs -------------------------------------------------
def _paths(app: Any) -> list[list[str]]:
    """Every command and group path of a CLI (hidden ones included), from its click group."""
    from typer.core import TyperGroup

    def walk(path: list[str], command: Any) -> Iterator[list[str]]:
        yield path
        if isinstance(command, TyperGroup):
            for name, sub in command.commands.items():
                yield from walk([*path, name], sub)

    return list(walk([], typer.main.get_command(app)))


@pytest.mark.parametrize("prog", ["fusion-client", "fusion-keys", "fusion-archiver"])
def test_only_the_invoked_command_is_built_and_it_is_the_same(
        prog: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """keyservice.cli_support.run builds only the command (or group) argv names: its help and
    a usage error read exactly as with the whole CLI built, for every command of each CLI; a
    mistyped or missing command gets the whole CLI (its suggestions, its help)."""
    app = {"fusion-client": "client.cli", "fusion-keys": "keyservice.cli",
           "fusion-archiver": "archiver.cli"}[prog]
    app = importlib.import_module(app).app
    def invoke(command: Any, args: list[str]) -> tuple[object, str, str]:
        # The click command built once (typer's test runner would build the whole CLI again
        # for each call): its exit code, standard output and standard error.
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                command.main(args=args, prog_name=prog)
            except SystemExit as exc:
                return exc.code, out.getvalue(), err.getvalue()
        raise AssertionError(f"{args} did not exit")

    monkeypatch.setenv("COLUMNS", "100")
    whole = typer.main.get_command(app)
    paths = _paths(app)
    assert len(paths) > 5
    for path in paths[1:]:
        reduced = only_invoked(app, [*path, "--help"])
        assert reduced is not app
        assert len(reduced.registered_commands) + len(reduced.registered_groups) == 1
        alone = typer.main.get_command(reduced)
        for args in ([*path, "--help"], [*path, "--no-such-option"], [*path, "--url"],
                     [*path, "--oaep-hash"]):
            assert invoke(alone, args) == invoke(whole, args), args
    for args in ([], ["--help"], ["--version"], ["no-such-command"]):
        assert only_invoked(app, args) is app
