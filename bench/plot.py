"""The capacity plot: Archiver capacity versus authorized viewers, ours next to Genetec's
published figures.

    python -m bench.plot bench-results.json -o docs/capacity.png

Genetec (Security Center, fusion stream encryption): 300 cameras without encryption, 210 with
one certificate, and each further certificate costs 4 % more (compounded: 210 x 0.96^(n-1), so
96 cameras at 20 certificates), with "no more than 20 certificates per Archiver".
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench import ingest

GENETEC_BASE = 300
GENETEC_LIMIT = 20
TICKS = [0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 10000]


def genetec_cameras(certificates: int) -> float:
    """Genetec's published Archiver capacity with ``certificates`` encryption certificates."""
    if certificates <= 0:
        return GENETEC_BASE
    return 210 * 0.96 ** (certificates - 1)


def plot(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    rows = ingest.summary(results.get("ingest", {}))
    if not rows:
        raise ValueError("The results hold no ingest figures to plot.")
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 6.2))
    g_x = list(range(GENETEC_LIMIT + 1))
    left.plot(g_x, [genetec_cameras(n) / GENETEC_BASE for n in g_x], "o-", color="tab:red",
              markersize=3, label="Genetec (published): 300 cameras, 210 at 1, -4 %/certificate")
    right.plot(g_x, [genetec_cameras(n) for n in g_x], "o-", color="tab:red", markersize=3,
               label="Genetec Archiver (published)")
    for axis in (left, right):
        axis.axvline(GENETEC_LIMIT, color="tab:red", linestyle=":", linewidth=1)
    left.text(GENETEC_LIMIT * 1.08, 1.03, "Genetec: \"no more than 20\"", color="tab:red",
              fontsize=8)
    # One line per key period and phase: windows right after viewers were added (every camera
    # starts a key chain wrapped for every viewer) and, with --steady, the next key period's.
    lines = sorted({(r["key_period_s"], r.get("phase", "")) for r in rows},
                   key=lambda k: (-k[0], k[1]))
    colors = ["tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:olive"]
    for color, (period, phase) in zip(colors, lines, strict=False):
        mine = sorted((r for r in rows if r["key_period_s"] == period
                       and r.get("phase", "") == phase), key=lambda r: r["viewers"])
        xs = [r["viewers"] for r in mine]
        if phase == "steady":
            label = f"ours, key period {period} s, steady (chains step, nothing wrapped)"
        elif phase.startswith("next period"):
            label = f"ours, key period {period} s, {phase} after the change"
        elif period >= 30:
            label = (f"ours, key period {period} s, window with the authorization change "
                     "(new chains wrapped for every viewer)")
        else:
            label = f"ours, key period {period} s (stress: {60 / period:g}x the rotations)"
        left.plot(xs, [r["ratio"] for r in mine], "s-", color=color, label=label)
        if phase == "steady" and all("cpu_bound_ratio" in r for r in mine):
            left.plot(xs, [r["cpu_bound_ratio"] for r in mine], ":", color=color, linewidth=1.5,
                      label=f"key period {period} s, steady, if CPU-bound: the baselines' "
                            "CPU per MB plus only AES-GCM's, SHA-256's and the signature's")
        right.plot(xs, [r["cameras"] for r in mine], "s-", color=color, label=label)
        if not phase.startswith(("steady", "next period")):  # one baseline line per block
            right.axhline(mine[0]["baseline_cameras"], color=color, linestyle="--",
                          linewidth=1, label=f"ours, plaintext baseline ({period} s block)")
    left.axhline(0.95, color="grey", linestyle="--", linewidth=0.8)
    left.axhline(0.90, color="grey", linestyle="--", linewidth=0.8)
    left.text(0.99, 0.955, "goal 0.95 (1 viewer)", fontsize=7, color="grey", ha="right",
              transform=left.get_yaxis_transform())
    left.text(0.99, 0.895, "goal 0.90 (10 000 viewers)", fontsize=7, color="grey", ha="right",
              transform=left.get_yaxis_transform(), va="top")
    for axis in (left, right):
        axis.set_xscale("symlog", linthresh=1)
        axis.set_xlim(-0.1, 15000)
        axis.set_xticks(TICKS, [str(t) for t in TICKS])
        axis.set_xlabel("authorized viewers (certificates)")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13))
    left.set_ylim(0, 1.12)
    left.set_ylabel("capacity / capacity without encryption")
    left.set_title("Relative capacity")
    right.set_ylabel("camera-equivalents (4 Mbit/s)")
    right.set_ylim(bottom=0)
    right.set_title("Absolute: Genetec's Archiver vs this machine")
    machine = results.get("machine", {})
    fig.suptitle(f"Archiver capacity vs authorized viewers; ours measured on {machine.get('cpu', '?')}"
                 f", {machine.get('cores', '?')} cores, {results.get('started_utc', '')}",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.plot")
    parser.add_argument("results", type=Path, help="the JSON written by python -m bench")
    parser.add_argument("-o", "--output", type=Path, default=Path("docs/capacity.png"))
    args = parser.parse_args(argv)
    print(plot(json.loads(args.results.read_text()), args.output))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
