"""Plot benchmark results, a PNG next to the JSON.

attention (bench/attention.py): speed-up over dense attention vs image size,
ours vs FlexAttention and the peers (sol_attn, NATTEN) vs the FLOP-
proportional ideal and the work-model ceiling, one panel per (r, d).
step (bench/flux_step.py): time and peak memory of one FLUX step per size,
dense vs CLEAR, with and without token chunking.

    python bench/plot.py bench/results/attention-<device>-<date>.json
    python bench/plot.py bench/results/flux_step-<device>-<date>.json --kind step
"""

import argparse
import json
import os
import sys


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help="JSON written by bench/attention.py")
    p.add_argument("--out", help="PNG path (default: the JSON's path with .png)")
    p.add_argument("--kind", choices=["attention", "step"], help="default: from the JSON's rows")
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
    kind = args.kind or ("attention" if rows and "window" in rows[0] and "ours_ms" in rows[0] else "step")
    smoke = " - CPU SMOKE RUN, NOT A BENCHMARK" if data.get("cpu_smoke_run") else ""
    title = f"{env['device']}, {env['date'][:10]}, {env['commit'][:8]}{smoke}"
    out = args.out or os.path.splitext(args.results)[0] + ".png"
    if kind == "step":
        return plot_step(plt, rows, title, out)
    windows = sorted({r["window"] for r in rows})
    downs = sorted({r["down_factor"] for r in rows})
    # one panel per (r, d): a row per down factor, a column per radius
    fig, axes = plt.subplots(len(downs), len(windows), figsize=(4.2 * len(windows), 3.4 * len(downs)),
                             squeeze=False, sharey=True)
    for ax, (down, window) in zip(axes.flat, [(d, w) for d in downs for w in windows]):
        sel = sorted((r for r in rows if (r["window"], r["down_factor"]) == (window, down)), key=lambda r: r["grid"])
        px = [r["image_px"] for r in sel]
        ax.plot(px, [r["flop_ratio"] for r in sel], "k--", label="ideal (FLOP ratio)")
        if all("work_model_ceiling_pct" in r for r in sel):
            ax.plot(px, [r["flop_ratio"] * r["work_model_ceiling_pct"] / 100 for r in sel], "k:",
                    label="work-model ceiling")
        ax.plot(px, [r["speedup_vs_dense"] for r in sel], "o-", label="ours")
        for peer, marker in (("sol", "^-"), ("natten", "v-")):
            pts = [(r["image_px"], r["dense_ms"] / r[f"{peer}_ms"]) for r in sel if r.get(f"{peer}_ms")]
            if pts:
                label = {"sol": "sol_attn (approximate)", "natten": "NATTEN na2d (image only)"}[peer]
                ax.plot(*zip(*pts), marker, label=label, alpha=0.7)
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
    fig.suptitle(f"CLEAR attention, {title}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print("wrote", out)
    return out


def plot_step(plt, rows, title, out):
    """Bars per image size (and model code: ComfyUI's Flux or the standalone
    blocks): step time (left) and peak memory (right) of each variant."""
    names = [n for n in ("dense", "clear", "dense_chunked", "clear_chunked") if any(f"{n}_ms" in r for r in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [j + i * width for j in range(len(rows))]
        axes[0].bar(xs, [(r.get(f"{name}_ms") or 0) / 1e3 for r in rows], width, label=name.replace("_", " + "))
        peaks = [r.get(f"{name}_peak_gib") or 0 for r in rows]
        axes[1].bar(xs, peaks, width, label=name.replace("_", " + "))
    for ax, ylabel in zip(axes, ("one step (s)", "peak GPU memory (GiB)")):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))],
                      [f"{r['image_px']}px\n({r.get('blocks', 'full')} blocks)"
                       + (f"\n{r['impl']}" if "impl" in r else "") for r in rows])
        ax.set_ylabel(ylabel)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"FLUX.1-dev-sized step, r={rows[0].get('window')}, {title}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print("wrote", out)
    return out


if __name__ == "__main__":
    main()
