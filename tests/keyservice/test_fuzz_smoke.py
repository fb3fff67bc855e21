"""A short run of the atheris fuzz target (tests/fuzz/fuzz_reader.py), seeded with the vectors.

The fuzzer exits non-zero on any exception other than FormatError, IntegrityError and
NoMatchingIdentity; the longer run is documented in the target's docstring.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TARGET = ROOT / "tests" / "fuzz" / "fuzz_reader.py"


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None,
                    reason="atheris is not installed (pip install -e '.[test]' on Linux)")
def test_fuzz_target_runs_clean(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    corpus = tmp_path / "corpus"
    seeded = subprocess.run([sys.executable, str(TARGET), "--write-seeds", str(corpus)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert seeded.returncode == 0, seeded.stderr
    assert len(list(corpus.iterdir())) >= 30
    run = subprocess.run(
        [sys.executable, str(TARGET), "-atheris_runs=8000", "-max_total_time=20",
         "-max_len=12000", str(corpus)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Done" in run.stderr and "Instrumenting keyservice.reader" in run.stderr
    assert not list(tmp_path.glob("crash-*"))
