"""Plot attention benchmark results: speed-up over dense attention vs image
size, ours vs FlexAttention vs the FLOP-proportional ideal, one panel per
(r, d). Writes a PNG next to the JSON.

    python bench/plot.py bench/results/attention-<device>-<date>.json
"""

import argparse
import json
import os
import sys


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help="JSON written by bench/attention.py")
    p.add_argument("--out", help="PNG path (default: the JSON's path with .png)")
    args = p.parse_args(argv)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        sys.exit("bench/plot.py needs matplotlib: pip install matplotlib")
    with open(args.results) as f:
        data = json.load(f)
    rows, env = data["rows"], data["environment"]
    windows = sorted({r["window"] for r in rows})
    downs = sorted({r["down_factor"] for r in rows})
    # one panel per (r, d): a row per down factor, a column per radius
    fig, axes = plt.subplots(len(downs), len(windows), figsize=(4.2 * len(windows), 3.4 * len(downs)),
                             squeeze=False, sharey=True)
    for ax, (down, window) in zip(axes.flat, [(d, w) for d in downs for w in windows]):
        sel = sorted((r for r in rows if (r["window"], r["down_factor"]) == (window, down)), key=lambda r: r["grid"])
        px = [r["image_px"] for r in sel]
        ax.plot(px, [r["flop_ratio"] for r in sel], "k--", label="ideal (FLOP ratio)")
        ax.plot(px, [r["speedup_vs_dense"] for r in sel], "o-", label="ours")
        flex = [(r["image_px"], r["dense_ms"] / r["flex_ms"]) for r in sel if r.get("flex_ms")]
        if flex:
            ax.plot(*zip(*flex), "s-", label="FlexAttention")
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set(xscale="log", yscale="log", title=f"r={window}, d={down}", xlabel="image side (px)")
        ax.set_xticks(px, [str(x) for x in px])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    for row_axes in axes:
        row_axes[0].set_ylabel("speed-up over dense attention")
    axes[0][0].legend(fontsize=8)
    smoke = " - CPU SMOKE RUN, NOT A BENCHMARK" if data.get("cpu_smoke_run") else ""
    fig.suptitle(f"CLEAR attention, {env['device']}, {env['date'][:10]}, {env['commit'][:8]}{smoke}", fontsize=9)
    fig.tight_layout()
    out = args.out or os.path.splitext(args.results)[0] + ".png"
    fig.savefig(out, dpi=120)
    print("wrote", out)
    return out


if __name__ == "__main__":
    main()
