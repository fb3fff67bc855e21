"""The benchmark's Archiver launcher: ``fusion-archiver serve`` as the CLI runs it, except that
it can switch on the plaintext baseline.

    python -m bench.server --data DIR --port 8181 --key-period 60 [--plaintext-baseline]

The baseline (segments archived durably and indexed, but neither encrypted nor signed) exists
only to measure what encryption costs. Settings can turn it on only when built in Python; the
product's CLI and HTTP API cannot, and this launcher refuses anything but loopback.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from archiver.app import create_app
from archiver.server import serve
from archiver.settings import Settings

LOOPBACK = "127.0.0.1"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.server",
                                     description="Benchmark-only Archiver launcher (loopback).")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--key-period", type=int, default=60)
    parser.add_argument("--plaintext-baseline", action="store_true",
                        help="archive plaintext (measurement baseline only)")
    args = parser.parse_args(argv)
    # Same logging and uvicorn options as `fusion-archiver serve`, so the two modes compare
    # like for like with the product.
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings(data_dir=args.data.resolve(), host=LOOPBACK, port=args.port,
                        key_period_s=args.key_period,
                        benchmark_plaintext_baseline=args.plaintext_baseline,
                        # The benchmarks measure capacity, with many requests per viewer and
                        # address: the per-client limits (issue 12) would measure themselves.
                        login_rate=1e6, login_burst=1_000_000, viewer_concurrency=100_000,
                        viewer_streams=100_000,
                        viewer_rate=1e6, viewer_burst=1_000_000,
                        # Archives of simulated past days (bench.generate) must not expire
                        # under the benchmark, nor go for the disk watermark.
                        retention_days=36500, min_free_bytes=0)
    if settings.benchmark_plaintext_baseline:
        logging.getLogger("bench").warning("PLAINTEXT BASELINE: this Archiver does not encrypt; "
                                           "for measurement only")
    serve(create_app(settings), settings)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
