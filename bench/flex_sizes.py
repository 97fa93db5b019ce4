"""FlexAttention fallback on a GPU: many image sizes in one process.

    python bench/flex_sizes.py                  # 12 grids 32..512 (0.5K-8K), r 16, d 1 and 4, bf16
    python bench/flex_sizes.py --grids 64 96 --down 4

Per grid: the BlockMask build time, the Flex call time, the relative error
against the torch path (grids up to --check-max), whether out.transpose(1, 2)
is contiguous. At the end: Dynamo's compiled frames (one per variant expected,
whatever the number of sizes) and peak memory. Exits non-zero on a wrong
result, a recompile per size or an error (FlexUnavailable included).
"""

import argparse
import sys
import time

import torch


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grids", type=int, nargs="+",
                   default=[32, 40, 64, 72, 96, 120, 128, 160, 192, 256, 384, 512])
    p.add_argument("--radius", type=int, default=16)
    p.add_argument("--down", type=int, nargs="+", default=[1, 4])
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--check-max", type=int, default=128, help="largest grid compared with the torch path")
    a = p.parse_args()

    import torch._dynamo.utils
    from comfyui_clear.kernels import flex, pool_image_tokens
    from comfyui_clear.kernels.reference import clear_attention_torch

    dev, T, D, bad = torch.device("cuda"), 512, 128, 0
    for i, g in enumerate(a.grids):
        grid = (g, g + (i % 3))  # not all square
        for d in a.down:
            L = T + grid[0] * grid[1]
            q, k, v = (torch.randn(1, a.heads, L, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
            pk = pv = None
            if d > 1:
                pk, pv = (pool_image_tokens(x[:, :, T:], grid, d) for x in (k, v))
            t0 = time.perf_counter()
            flex.clear_block_mask(T, grid, a.radius, dev)
            mask_s = time.perf_counter() - t0
            kw = dict(text_len=T, grid=grid, window=a.radius, pooled_k=pk, pooled_v=pv, scale=D ** -0.5)
            out = flex.clear_attention_flex(q, k, v, **kw)  # first call (compile at the first size)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = flex.clear_attention_flex(q, k, v, **kw)
            torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) * 1e3
            err = None
            if g <= a.check_max:
                ref = clear_attention_torch(q, k, v, **kw).float()
                err = ((out.float() - ref).norm() / ref.norm()).item()
                bad += not err < 2e-2
            bad += not out.transpose(1, 2).is_contiguous()
            print(f"grid {grid} d {d}: mask {mask_s:.3f} s, flex {ms:.2f} ms, rel err {err}, "
                  f"frames {torch._dynamo.utils.counters['stats']['unique_graphs']}", flush=True)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    print(f"compiled frames: {frames} (one per variant expected: {len(a.down)}), "
          f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    bad += frames > len(a.down)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
