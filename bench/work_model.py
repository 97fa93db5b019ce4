"""Work model of the Triton path: (query, key) products issued / needed, and
the implied ceiling (needed / issued: the best fraction of the FLOP-
proportional ideal speed-up the kernel can reach), on FLUX shapes. Runs
anywhere (no GPU, no Triton): counts come from kernels/tiling.py, which
tests/test_kernel_work.py holds against the kernel itself.

    python bench/work_model.py            # markdown table for bench/README.md
"""

import argparse

from comfyui_clear.kernels import tiling

# Targets at 4K and 8K (issue 9): issued/useful at most this.
TARGETS = {(8, 1): 1.35, (16, 1): 1.45, (32, 1): 1.40, (8, 4): 1.15, (16, 4): 1.15, (32, 4): 1.15}


def rows(grids, radii, downs, text_len, head_dim, arch):
    for d in downs:
        for r in radii:
            cfg = tiling.kernel_config(head_dim, r, d, arch)
            for g in grids:
                ratio = tiling.work_ratio(text_len, (g, g), r, d, cfg)
                yield dict(pixels=g * 16, grid=g, r=r, d=d, key_block=f"{cfg['KEY_Y']}x{cfg['KEY_X']}",
                           ratio=ratio, ceiling=100 / ratio, target=TARGETS.get((r, d)) if g >= 256 else None)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grids", type=int, nargs="+", default=[64, 128, 256, 512])
    p.add_argument("--radii", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--down", type=int, nargs="+", default=[1, 4])
    p.add_argument("--text", type=int, default=512)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (tiles do not depend on it)")
    args = p.parse_args(argv)
    print("| image | r | d | key block | issued/useful | ceiling (% of ideal) | target |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    worst = []
    for row in rows(args.grids, args.radii, args.down, args.text, args.head_dim, args.arch):
        target = ""
        if row["target"] is not None:
            target = f"<= {row['target']:.2f} " + ("met" if row["ratio"] <= row["target"] else "MISSED")
        if row["target"] is not None and row["ratio"] > row["target"]:
            worst.append(row)
        print(f"| {row['pixels'] // 1024}K ({row['grid']}²) | {row['r']} | {row['d']} | {row['key_block']} | "
              f"{row['ratio']:.3f} | {row['ceiling']:.0f}% | {target} |")
    return 1 if worst else 0


if __name__ == "__main__":
    raise SystemExit(main())
