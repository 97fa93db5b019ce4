"""Benchmark: CLEAR attention (ours) vs dense flash attention vs FlexAttention
with the CLEAR block mask (how the reference implementation runs CLEAR), on
FLUX shapes, side by side in one run.

    python bench/attention.py                    # GPU: grids 64..512, r 8/16/32, d 1/4
    python bench/attention.py --grids 512 --radii 16 --down 1
    python bench/attention.py --quick            # CPU smoke run (not a benchmark)

Prints a table and writes JSON to bench/results/. See bench/README.md.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import clear_flops, dense_flops, environment, time_ms, write_results  # noqa: E402

from comfyui_clear.kernels import clear_attention, pool_image_tokens  # noqa: E402


def flex_clear(q, k, v, text_len, grid, window, down_factor, compiled):
    """CLEAR through FlexAttention: pooled keys appended after the sequence and
    a mask_mod with the spec's pattern (block mask built once per shape)."""
    from torch.nn.attention.flex_attention import create_block_mask

    T, (h, w), r = text_len, grid, window
    L = q.shape[2]
    if down_factor > 1:
        k = torch.cat([k, pool_image_tokens(k[:, :, T:], grid, down_factor).to(k.dtype)], 2)
        v = torch.cat([v, pool_image_tokens(v[:, :, T:], grid, down_factor).to(v.dtype)], 2)

    def mask_mod(b, hh, q_idx, kv_idx):
        qi, ki = q_idx - T, kv_idx - T
        local = (qi // w - ki // w) ** 2 + (qi % w - ki % w) ** 2 < r * r
        text_row = (q_idx < T) & (kv_idx < L)
        image_row = (q_idx >= T) & ((kv_idx < T) | (kv_idx >= L) | local)
        return text_row | image_row

    block_mask = create_block_mask(mask_mod, None, None, L, k.shape[2], device=q.device)
    return lambda: compiled(q, k, v, block_mask=block_mask)


def dense(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.FLASH_ATTENTION] if q.is_cuda else [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION]
    with sdpa_kernel(backends):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grids", type=int, nargs="+", default=[64, 128, 256, 512], help="token grid sides (image px / 16)")
    p.add_argument("--radii", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--down", type=int, nargs="+", default=[1, 4])
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--text", type=int, default=512)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    p.add_argument("--flex-max-grid", type=int, default=512, help="largest grid to run FlexAttention at")
    p.add_argument("--check-max-grid", type=int, default=128, help="largest grid to check correctness at")
    p.add_argument("--quick", action="store_true", help="CPU smoke run: tiny shapes")
    p.add_argument("--out", help="JSON path (default bench/results/attention-<device>-<date>.json)")
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    if args.quick or not cuda:
        args.grids = [g for g in args.grids if g <= 16] or [8, 16]
        args.radii = [r for r in args.radii if r <= 4] or [2, 4]
        args.heads, args.head_dim, args.text, args.dtype = 2, 64, 16, "float32"
        args.no_flex = args.no_flex or not cuda  # compiling Flex for the CPU takes minutes
        print("CPU SMOKE RUN: tiny shapes, torch path; not a benchmark (needs a CUDA GPU)", flush=True)
    device = "cuda" if cuda else "cpu"
    dtype = getattr(torch, args.dtype)
    compiled_flex = None
    if not args.no_flex:
        from torch.nn.attention.flex_attention import flex_attention
        compiled_flex = torch.compile(flex_attention, dynamic=False)

    env = environment()
    rows = []
    header = f"{'grid':>5} {'r':>3} {'d':>2} | {'dense ms':>9} {'flex ms':>9} {'ours ms':>9} | {'ours TF/s':>9} {'x dense':>8} {'x flex':>7} {'ideal x':>8} {'% ideal':>7} | {'err':>8}"
    print(header)
    for g in args.grids:
        T, B, H, D = args.text, 1, args.heads, args.head_dim
        L = T + g * g
        gen = torch.Generator(device=device).manual_seed(g)
        q, k, v = (torch.randn(B, H, L, D, device=device, dtype=dtype, generator=gen) for _ in range(3))
        dense_ms = time_ms(lambda: dense(q, k, v), args.repeats)
        for d in args.down:
            for r in args.radii:
                row = {"grid": g, "image_px": 16 * g, "window": r, "down_factor": d, "heads": H, "head_dim": D,
                       "text_len": T, "dtype": args.dtype, "dense_ms": dense_ms,
                       "dense_flops": dense_flops(B, H, D, T, g, g), "clear_flops": clear_flops(B, H, D, T, g, g, r, d)}
                ours = lambda: clear_attention(q, k, v, text_len=T, grid=(g, g), window=r, down_factor=d)  # noqa: E731
                row["ours_ms"] = time_ms(ours, args.repeats)
                row["flex_ms"] = None
                if compiled_flex is not None and g <= args.flex_max_grid:
                    try:
                        run_flex = flex_clear(q, k, v, T, (g, g), r, d, compiled_flex)
                        row["flex_ms"] = time_ms(run_flex, args.repeats)
                        if g <= args.check_max_grid:
                            row["flex_vs_ours_rel_err"] = ((run_flex().float() - ours().float()).norm()
                                                           / ours().float().norm()).item()
                    except Exception as exc:  # out of memory at large grids: say so, keep going
                        row["flex_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                        torch.cuda.empty_cache() if cuda else None
                if g <= args.check_max_grid:
                    exact = clear_attention(q.float(), k.float(), v.float(), text_len=T, grid=(g, g), window=r,
                                            down_factor=d, backend="torch")
                    row["rel_err_vs_torch_path"] = ((ours().float() - exact).norm() / exact.norm()).item()
                row["ours_tflops"] = row["clear_flops"] / row["ours_ms"] / 1e9
                row["speedup_vs_dense"] = dense_ms / row["ours_ms"]
                row["flop_ratio"] = row["dense_flops"] / row["clear_flops"]
                row["percent_of_ideal"] = 100 * row["speedup_vs_dense"] / row["flop_ratio"]
                row["speedup_vs_flex"] = row["flex_ms"] / row["ours_ms"] if row["flex_ms"] else None
                rows.append(row)
                flex = f"{row['flex_ms']:9.3f}" if row["flex_ms"] else f"{'-':>9}"
                xflex = f"{row['speedup_vs_flex']:7.2f}" if row["speedup_vs_flex"] else f"{'-':>7}"
                err = row.get("rel_err_vs_torch_path")
                print(f"{g:5d} {r:3d} {d:2d} | {dense_ms:9.3f} {flex} {row['ours_ms']:9.3f} | "
                      f"{row['ours_tflops']:9.1f} {row['speedup_vs_dense']:8.2f} {xflex} {row['flop_ratio']:8.1f} "
                      f"{row['percent_of_ideal']:7.1f} | {err if err is None else f'{err:8.1e}'}", flush=True)
        del q, k, v
    payload = {"environment": env, "cpu_smoke_run": not cuda or args.quick, "args": vars(args), "rows": rows}
    path = write_results("attention", payload, args.out)
    print("wrote", os.path.relpath(path))
    return payload


if __name__ == "__main__":
    main()
