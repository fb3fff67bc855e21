"""``python -m bench``: run the benchmarks, print them, save the figures as JSON, draw the plot.

    python -m bench                              # all of it, about 10 minutes on 2 cores
    python -m bench --quick                      # tiny sizes, about 30 s
    python -m bench --only ingest --viewers 0,1,1000 --periods 60 --sizes 1M,4M
    python -m bench --results out.json --plot docs/capacity.png
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from bench import ingest, raw, rotation, viewer
from bench.common import MiB, Report, parse_ints, parse_sizes

BENCHMARKS = ("raw", "rotation", "ingest", "viewer")


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and short windows (keeps the code working; the figures "
                             "mean little)")
    parser.add_argument("--only", default=",".join(BENCHMARKS),
                        help=f"comma-separated subset of {', '.join(BENCHMARKS)}")
    parser.add_argument("--sizes", help="ingest segment sizes: uniform between the smallest and "
                                        "the largest (default 1M,4M); raw figures for each")
    parser.add_argument("--viewers", help="viewer counts for ingest (default 0,1,20,100,1000)")
    parser.add_argument("--periods", help="key periods in s for ingest (default 60,5)")
    parser.add_argument("--cameras", type=int, help="simulated cameras (default 100)")
    parser.add_argument("--concurrency", type=int, help="concurrent uploads (default 16)")
    parser.add_argument("--seconds", type=float, help="measured seconds per ingest window "
                                                      "(default 8)")
    parser.add_argument("--rotation", help="CAMERASxVIEWERS for the rotation cost "
                                           "(default 100x1000)")
    parser.add_argument("--revoke", action="store_true",
                        help="ingest: after the most viewers' windows, revoke one viewer on "
                             "every camera and measure its key period and the next ones")
    parser.add_argument("--steady", type=int, nargs="?", const=1, default=0, metavar="N",
                        help="ingest: after each window that follows adding viewers (every camera "
                             "starts a key chain), N more (default 1), each in the next key "
                             "period; the last is the steady state (chains only step)")
    parser.add_argument("--long-seconds", type=float,
                        help="measured seconds of an ingest window with >= 500 viewers and a long "
                             "key period (default 55)")
    parser.add_argument("--no-tpm", action="store_true", help="skip the software TPM")
    parser.add_argument("--profile", type=Path,
                        help="record py-spy profiles (--gil) of the Archivers during each ingest "
                             "window into this directory (needs py-spy)")
    parser.add_argument("--workdir", type=Path,
                        help="where archives and tokens go (default: a temporary directory, "
                             "removed afterwards); the disk figures are for this file system")
    parser.add_argument("--results", type=Path, default=Path("bench-results.json"),
                        help="JSON file for every figure (default bench-results.json)")
    parser.add_argument("--plot", type=Path, help="draw the capacity plot to this PNG "
                                                  "(needs matplotlib and the ingest benchmark)")
    args = parser.parse_args(argv)
    unknown = set(args.only.split(",")) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    only = set(args.only.split(","))
    quick = args.quick
    sizes = parse_sizes(args.sizes) if args.sizes else (
        [64 * 1024, 256 * 1024] if quick else [1 * MiB, 4 * MiB])
    raw_sizes = sorted(set(sizes) | ({2 * MiB} if not quick and not args.sizes else set()))
    cams, viewers_n = (args.rotation or ("5x20" if quick else "100x1000")).lower().split("x")
    ingest_params = ingest.Params(
        viewers=parse_ints(args.viewers) if args.viewers else ([0, 1, 20] if quick else
                                                                [0, 1, 20, 100, 1000]),
        periods=parse_ints(args.periods) if args.periods else ([1] if quick else [60, 5]),
        cameras=args.cameras or (4 if quick else 100),
        concurrency=args.concurrency or (2 if quick else 16),
        seconds=args.seconds or (0.5 if quick else 8.0),
        long_seconds=args.long_seconds or (2.0 if quick else 55.0),
        steady=args.steady,
        revoke=args.revoke,
        warmup=0.2 if quick else 1.0,
        sizes=sizes,
        profile_dir=args.profile,
        writepath_segments=4 if quick else 40)
    viewer_params = viewer.Params(use_tpm=not args.no_tpm) if not quick else viewer.Params(
        day_hours=2, day_segment_s=60, day_segment_bytes=4096, big_segments=4,
        big_segment_bytes=256 * 1024, seek_repeats=1, live_segments=2,
        live_segment_bytes=64 * 1024, live_interval_s=0.1, use_tpm=not args.no_tpm)
    temporary = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="fusion-bench-")) if temporary else args.workdir
    report = Report()
    report.data["quick"] = quick
    started = time.perf_counter()
    try:
        if "raw" in only:
            raw.run(report, workdir / "raw", raw_sizes, 0.2 if quick else 1.5)
        if "rotation" in only:
            rotation.run(report, workdir / "rotation", int(cams), int(viewers_n))
        if "ingest" in only:
            ingest.run(report, workdir / "ingest", ingest_params)
        if "viewer" in only:
            viewer.run(report, workdir / "viewer", viewer_params)
    finally:
        report.data["elapsed_s"] = time.perf_counter() - started
        args.results.write_text(json.dumps(report.data, indent=1))
        if temporary:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nall figures: {args.results} ({report.data['elapsed_s']:.0f} s)")
    if args.plot is not None:
        from bench.plot import plot

        print(f"plot: {plot(report.data, args.plot)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
