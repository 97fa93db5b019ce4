"""Communication volume of the CLEAR Multi-GPU Split, and of Ulysses, per
attention layer per GPU; modelled times on PCIe 4.0 and NVLink next to the
modelled compute per GPU.

    python bench/band_volume.py            # the tables of bench/README.md

The band split's bytes are what ``kernels/band.py`` reads from other workers
(tests/test_band_split.py holds this model against the exchange's counters):

- halo (and pooling-completion) rows of k and v in the activation dtype;
- the pooled keys and values other workers own, float32 (they stay exact);
- every other worker's text partial: T x D outputs and T log-sum-exps, float32.

Ulysses (sequence parallelism by head all-to-all) moves q, k, v and the
output: each GPU sends and receives (P-1)/P of its L/P tokens' 4 tensors.
"""

import argparse
import math

from comfyui_clear.kernels.band import band_needs, band_rows


def band_bytes(parts, grid, text_len, window, down_factor=1, batch=1, heads=24, head_dim=128, itemsize=2,
               exact_itemsize=4):
    """Bytes each worker receives per attention layer: a list, one per worker.
    ``exact_itemsize``: pooled keys and text partials travel in float32 (float64
    for float64 activations)."""
    h, w = grid
    bands = band_rows(h, parts)
    row = batch * heads * head_dim * w * itemsize  # one token row of k (or v)
    wp = -(-w // down_factor)
    owners = [band_needs(b, h, window, down_factor)[1] for b in bands]
    out = []
    for rank, band in enumerate(bands):
        (lo, hi), _ = band_needs(band, h, window, down_factor)
        total = 0
        for src, (s0, s1) in enumerate(bands):
            if src != rank:
                total += 2 * max(0, min(hi, s1) - max(lo, s0)) * row
        if down_factor > 1:
            for src, (b0, b1) in enumerate(owners):
                if src != rank:
                    total += 2 * (b1 - b0) * wp * batch * heads * head_dim * exact_itemsize
        if text_len > 0:
            total += (len(bands) - 1) * batch * heads * text_len * (head_dim + 1) * exact_itemsize
        out.append(total)
    return out


def ulysses_bytes(parts, grid, text_len, batch=1, heads=24, head_dim=128, itemsize=2):
    """Bytes one GPU receives per attention layer in Ulysses (q, k, v, o all-to-all)."""
    L = text_len + grid[0] * grid[1]
    return 4 * batch * L * heads * head_dim * itemsize / parts * (parts - 1) / parts


def layer_flops(grid, text_len, window, down_factor=1, heads=24, head_dim=128, hidden=3072, mlp=12288, parts=1):
    """Modelled FLOPs one GPU spends on one single-stream block (the most common
    block of FLUX.1) over its band: linear layers plus CLEAR attention (disc of
    pi r^2 keys, text and pooled keys; halo query rows and the band call's
    discarded text rows included)."""
    h, w = grid
    rows = -(-h // parts)
    n = rows * w + text_len
    linear = 2 * n * hidden * (3 * hidden + mlp) + 2 * n * (hidden + mlp) * hidden
    pooled = math.ceil(h / down_factor) * math.ceil(w / down_factor) if down_factor > 1 else 0
    q_img = (rows + (2 * (window - 1) if parts > 1 else 0)) * w
    keys = math.pi * window ** 2 + text_len + pooled
    attn = 4 * heads * head_dim * (q_img * keys + text_len * (h * w / parts + text_len))
    if parts > 1:  # the band call's own text rows, over text and band keys, discarded (the merged partials win)
        attn += 4 * heads * head_dim * text_len * (text_len + q_img)
    return linear + attn


LINKS = {"PCIe 4.0 x16 (~25 GB/s)": 25e9, "NVLink 4 (~450 GB/s)": 450e9}
GPU_FLOPS = {"RTX 4090 (~165 TFLOP/s bf16 dense)": 165e12, "H100 SXM (~990 TFLOP/s bf16 dense)": 990e12}
SIZES = {"4K (4096x4096)": (256, 256), "8K (8192x8192)": (512, 512)}


def tables(text_len=512, efficiency=0.5):
    lines = ["| image | GPUs | Ulysses q,k,v,o | bands r=8 | bands r=16 | bands r=32 | bands r=16, d=4 |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, grid in SIZES.items():
        for P in (2, 4, 8):
            cells = [f"{ulysses_bytes(P, grid, text_len) / 1e6:,.0f} MB"]
            for r, d in ((8, 1), (16, 1), (32, 1), (16, 4)):
                cells.append(f"{max(band_bytes(P, grid, text_len, r, d)) / 1e6:,.0f} MB")
            lines.append(f"| {name} | {P} | " + " | ".join(cells) + " |")
    lines += ["", "Per layer, busiest GPU, r=16, d=1; 57 layers per step. Compute at "
              f"{efficiency:.0%} of peak, one single-stream block as the unit.", "",
              "| image | GPUs | comm. PCIe 4.0 | comm. NVLink | compute RTX 4090 | compute H100 |",
              "| --- | --- | --- | --- | --- | --- |"]
    for name, grid in SIZES.items():
        for P in (1, 2, 4, 8):
            b = max(band_bytes(P, grid, text_len, 16)) if P > 1 else 0
            comm = [f"{b / bw * 1e3:.1f} ms" for bw in LINKS.values()]
            comp = [f"{layer_flops(grid, text_len, 16, parts=P) / (f * efficiency) * 1e3:.1f} ms"
                    for f in GPU_FLOPS.values()]
            lines.append(f"| {name} | {P} | " + " | ".join(comm + comp) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", type=int, default=512)
    ap.add_argument("--efficiency", type=float, default=0.5, help="share of peak FLOP/s the GPU reaches")
    args = ap.parse_args()
    print(tables(args.text, args.efficiency))
