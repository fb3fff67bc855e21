"""The operator's browser viewer (``fusion-client view``) as tests run it: a subprocess that
prints its one-time URL, stopped with Ctrl-C and checked to end cleanly. The browser itself is
the tests' (Playwright driving Debian's chromium)."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from pathlib import Path

__all__ = ["ViewerProcess"]


class ViewerProcess:
    """`fusion-client view --no-browser` in a subprocess; the URL is its first stdout line.
    ``tls_ca``: the site CA, given with --tls-ca (production mode)."""

    def __init__(self, archiver_url: str, token_uri: str, home: Path,
                 tls_ca: Path | None = None, browser_env: dict[str, str] | None = None) -> None:
        """browser_env: open a browser (BROWSER and TMPDIR for it) instead of --no-browser."""
        env = {k: v for k, v in os.environ.items() if k not in ("FUSION_PIN", "FUSION_TOKEN")}
        env["FUSION_CLIENT_HOME"] = str(home)
        env.update(browser_env or {})
        self.export_dir = home / "exports"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "client", "view", "--archiver", archiver_url, "--token",
             token_uri, *([] if browser_env else ["--no-browser"]), "--export-dir",
             str(self.export_dir), *(["--tls-ca", str(tls_ca)] if tls_ca is not None else [])],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env)
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], 60)
        line = self.process.stdout.readline().decode().strip() if ready else ""
        if not line.startswith("http://127.0.0.1:"):
            self.process.kill()
            _, err = self.process.communicate()
            raise AssertionError(f"no viewer URL (got {line!r}): {err.decode()}")
        self.url = line
        self.base = line[:line.index("/", len("http://"))]
        self.port = int(self.base.rsplit(":", 1)[1])

    def stop(self, how: signal.Signals = signal.SIGINT) -> str:
        """Ctrl-C (or another signal); returns stderr. The viewer must end cleanly, without a
        traceback."""
        if self.process.poll() is None:
            self.process.send_signal(how)
        try:
            _, err = self.process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, err = self.process.communicate()
            raise AssertionError(f"the viewer did not stop on {how.name}") from None
        text = err.decode(errors="replace")
        assert "Traceback" not in text, text
        assert self.process.returncode == 0, text
        assert "viewer stopped" in text
        return text
