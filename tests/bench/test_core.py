"""The crypto-core micro-benchmark (python -m bench.core) runs and reports what it promises
(tiny sizes, not a timing test)."""

from __future__ import annotations

import re

import pytest

from bench import core


def test_bench_prints_ratios_and_the_machine(capsys: pytest.CaptureFixture[str]) -> None:
    assert core.main(["--sizes", "4096,65536", "--seconds", "0.02"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("machine: ") and "CPUs" in out and "cryptography" in out
    rows = re.findall(r"^\s+(\d+) KiB (\S+)\s+(\d+)\s+(\d+)\s+(\d+\.\d\d)$", out, re.MULTILINE)
    assert {(size, name) for size, name, *_ in rows} == {
        (size, name) for size in ("4", "64")
        for name in ("seal", "open", "seal+rec", "rec+open", "reader")}
    for _, _, raw, ours, ratio in rows:
        assert int(raw) > 0 and int(ours) > 0 and abs(float(ratio) - int(ours) / int(raw)) < 0.02
