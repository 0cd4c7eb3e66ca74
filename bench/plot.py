"""cm against each peer per scenario, both storages, from bench_peers.py's JSON.

    python bench/plot.py [RESULTS.json [OUT.png]]   (default docs/benchmarks.json -> docs/benchmarks.png)

Each bar is one peer's median time divided by cm's (`cmsync --wait`) in the
same run: above 1, cm was faster. The bar's label is the ratio.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs"
PEERS = ["rsync", "fpsync", "rclone", "cp", "tcp"]
LABELS = {"rsync": "rsync -a (daemon)", "fpsync": "fpsync (2 jobs)", "rclone": "rclone sync (4 transfers)",
          "cp": "cp -r (local floor)", "tcp": "1 TCP stream (network floor)"}
SCENARIOS = {"a": "(a) 1 file\n{big}", "b": "(b) {small} files\n4-12 KiB", "c": "(c) re-sync of (b)\nno change",
             "d": "(d) {nbig} x {mbig}\n+ {msmall} files"}


def main() -> int:
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else DOCS / "benchmarks.json"
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else DOCS / "benchmarks.png"
    res = json.loads(src.read_text())
    sz = res["sizes"]
    names = {k: v.format(big=f"{sz['big'] >> 20} MiB", small=f"{sz['small']:,}", nbig=sz["mixed_big_n"],
                         mbig=f"{sz['mixed_big'] >> 20} MiB", msmall=f"{sz['mixed_small']:,}")
             for k, v in SCENARIOS.items()}
    storages = list(res["storage"])
    fig, axes = plt.subplots(len(storages), 1, figsize=(13, 4.2 * len(storages)), squeeze=False)
    width = 0.8 / len(PEERS)
    for ax, label in zip(axes[:, 0], storages):
        times = res["storage"][label]["times"]
        for i, peer in enumerate(PEERS):
            xs, ys = [], []
            for j, scen in enumerate("abcd"):
                if peer in times[scen] and times[scen][peer]:
                    xs.append(j + (i - (len(PEERS) - 1) / 2) * width)
                    ys.append(statistics.median(times[scen][peer]) / statistics.median(times[scen]["cm"]))
            bars = ax.bar(xs, ys, width, label=LABELS[peer] + (" MISSING" if peer in res.get("missing", {}) else ""))
            ax.bar_label(bars, labels=[f"{y:.2f}" for y in ys], fontsize=7, padding=1)
        ax.axhline(1, color="black", linewidth=1)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(ticker.FormatStrFormatter("%g"))
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_xticks(range(4), [names[s] for s in "abcd"])
        ax.set_ylabel("peer time / cm time\n(> 1: cm faster)")
        ax.set_title(f"cmsync --wait against its peers on {label} ({res['date']}, {res['machine']['cpus']} CPUs, "
                     f"median of {res['reps']} runs"
                     + (f", load average {res['machine']['load_before']} before" if 'load_before' in res['machine']
                        else "") + ")")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"plot: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
