"""The longer hardening runs that docs/security.md quotes, as reproducible commands.

    python -m tests.hardening.longrun crash     # >= 20 SIGKILLs during concurrent ingest
    python -m tests.hardening.longrun soak      # 50 cameras, 20 live viewers, 10 minutes
    python -m tests.hardening.longrun fuzz      # schemathesis, 200 examples per operation
    python -m tests.hardening.longrun all

They are the CI tests of tests/hardening, scaled up through FUSION_HARDENING_* variables (CI
runs the same code with small values). Figures (kills, segments, RSS peak, seeds) are printed;
pytest's own per-test timeout is lifted for these runs only. Extra arguments go to pytest.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

RUNS: dict[str, tuple[dict[str, str], str]] = {
    "crash": ({"FUSION_HARDENING_CRASH_CYCLES": "25"},
              "tests/hardening/test_crash.py::"
              "test_sigkill_during_concurrent_ingest_loses_nothing_acknowledged"),
    "soak": ({"FUSION_HARDENING_SOAK_S": "600"},
             "tests/hardening/test_load.py"),
    "fuzz": ({"FUSION_HARDENING_FUZZ_EXAMPLES": "200"},
             "tests/hardening/test_api_attack.py::"
             "test_schemathesis_finds_no_server_error_for_any_role"),
}


def run(name: str, extra: list[str]) -> int:
    variables, target = RUNS[name]
    print(f"== {name}: {' '.join(f'{k}={v}' for k, v in variables.items())} pytest {target}",
          flush=True)
    started = time.monotonic()
    # Its own base directory, kept after the run: pytest's default one rotates away (other
    # test runs on the machine), and a failure's data directory is the evidence.
    basetemp = tempfile.mkdtemp(prefix=f"fusion-longrun-{name}-")
    print(f"== {name}: data under {basetemp}", flush=True)
    result = subprocess.run(
        # -n0: in this process, so that -s shows the figures (xdist workers' output is not).
        [sys.executable, "-m", "pytest", target, "-n0", "-s", "-q", "-p", "no:cacheprovider",
         "--timeout", "7200", "--basetemp", basetemp, *extra],
        cwd=REPO, env={**os.environ, **variables}, check=False)
    print(f"== {name}: {'passed' if result.returncode == 0 else 'FAILED'} in "
          f"{time.monotonic() - started:.0f} s", flush=True)
    return result.returncode


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in (*RUNS, "all"):
        print(__doc__)
        return 2
    names = list(RUNS) if argv[0] == "all" else [argv[0]]
    return max(run(name, argv[1:]) for name in names)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
