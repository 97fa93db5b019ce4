"""Benchmark: CLEAR attention (ours) vs dense attention (SDPA flash = FA2,
SDPA cuDNN, FA3 where importable: the fastest is the comparison) vs FlexAttention
with the CLEAR block mask (how the reference implementation runs CLEAR), on
FLUX shapes, side by side in one run; optionally beside comfy-kitchen's
``sol_attn`` and NATTEN's ``na2d`` (``--peers``: other computations, timed
for speed only).

    python bench/attention.py                    # GPU: grids 64..512, r 8/16/32, d 1/4
    python bench/attention.py --grids 512 --radii 16 --down 1
    python bench/attention.py --peers sol natten --budget-s 180
    python bench/attention.py --quick            # CPU smoke run (not a benchmark)

Prints a table and writes JSON to bench/results/. See bench/README.md.
"""

import argparse
import math
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (SMOKE_NOTE, clear_flops, dense_flops, environment, flex_mask_bytes, time_ms,  # noqa: E402
                    write_results)

from comfyui_clear.kernels import clear_attention, pool_image_tokens, tiling  # noqa: E402
from comfyui_clear.kernels.flex import clear_mask_mod  # noqa: E402


def flex_clear(q, k, v, text_len, grid, window, down_factor, flex, make_block_mask):
    """CLEAR through FlexAttention as the reference implementation runs it:
    pooled keys appended after the sequence, a mask_mod with the spec's
    pattern, the block mask built once per shape (not timed). Returns
    (run, block-mask info)."""
    T, r = text_len, window
    L = q.shape[2]
    if down_factor > 1:
        k = torch.cat([k, pool_image_tokens(k[:, :, T:], grid, down_factor).to(k.dtype)], 2)
        v = torch.cat([v, pool_image_tokens(v[:, :, T:], grid, down_factor).to(v.dtype)], 2)

    mask_mod = clear_mask_mod(T, grid, r, L)  # the same mask_mod as the Flex backend

    before = torch.cuda.memory_allocated() if q.is_cuda else 0
    if q.is_cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    block_mask = make_block_mask(mask_mod, None, None, L, k.shape[2], device=q.device)
    info = {"flex_mask_build_s": time.perf_counter() - t0,
            "flex_mask_est_mib": flex_mask_bytes(L, k.shape[2]) / 2**20,
            "flex_mask_build_peak_mib": (torch.cuda.max_memory_allocated() - before) / 2**20 if q.is_cuda else None}
    return (lambda: flex(q, k, v, block_mask=block_mask)), info


class Peers:
    """The other attention libraries timed beside ours, each optional: its
    status says what ran ("comfy-kitchen 0.2.40", "not installed: ...", or, in
    dry runs, a dense SDPA stand-in that exercises the same layout and
    bookkeeping without importing the package)."""

    def __init__(self, names, device, standin=False):
        self.status, self.fns = {}, {}
        for name in names:
            loader = {"sol": self._load_sol, "natten": self._load_natten}.get(name)
            if loader is None:
                raise SystemExit(f"unknown peer {name!r}: choose from sol, natten")
            if standin:
                self.fns[name] = {"sol": _standin_sol, "natten": _standin_na2d}[name]
                self.status[name] = "dry stand-in (dense SDPA, same layout)"
                continue
            try:
                self.fns[name], self.status[name] = loader(device)
            except Exception as exc:  # ImportError, a build without kernels for this GPU, ...
                self.status[name] = f"not installed: {type(exc).__name__}: {str(exc).strip()[:200]}"
            print(f"peer {name}: {self.status[name]}", flush=True)

    @staticmethod
    def _load_sol(device):
        import importlib.metadata

        import comfy_kitchen
        if not comfy_kitchen.sol_attn_is_available(torch.device(device)):
            raise RuntimeError(f"comfy_kitchen.sol_attn has no kernel for {device} in this build")
        return comfy_kitchen.sol_attn, f"comfy-kitchen {importlib.metadata.version('comfy-kitchen')}"

    @staticmethod
    def _load_natten(device):
        import natten
        if torch.device(device).type != "cuda":
            raise RuntimeError("NATTEN is timed on CUDA only")
        na2d = getattr(natten, "na2d", None) or natten.functional.na2d  # [B, X, Y, heads, D]
        return na2d, f"natten {getattr(natten, '__version__', '?')}"


def _standin_sol(q, k, v, **_):
    return dense(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _standin_na2d(q, k, v, kernel_size):  # noqa: ARG001 (a dense stand-in ignores the window)
    shape = q.shape
    flat = [t.flatten(1, 2).transpose(1, 2) for t in (q, k, v)]  # (B, H, X*Y, D)
    return dense(*flat).transpose(1, 2).reshape(shape)


def sol_run(fn, q, k, v, text_len):
    """Sol-Attn (comfy-kitchen) on the whole [text | image] sequence as
    ComfyUI's sparse attention runs FLUX: (B, L, H, 128) layout, text key
    blocks exact for every query (sink_blocks), text query blocks exact over
    all keys (sink_q); tau 1.0. It routes key blocks by score, so it is a
    different (approximate) computation: its speed is shown, not compared."""
    qs, ks, vs = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    text_blocks = -(-text_len // 64)
    return lambda: fn(qs, ks, vs, tau=1.0, sink_blocks=[0, text_blocks], sink_q=[0, text_blocks])


def natten_kernel(window, grid):
    """The odd square window with about as many keys as CLEAR's disc
    (pi r^2), capped at the grid: the same local work per query."""
    side = max(3, round(math.sqrt(math.pi) * window))
    side = side if side % 2 else side + 1
    cap = grid if grid % 2 else grid - 1
    return min(side, cap)


def natten_run(fn, q, k, v, text_len, grid, kernel):
    """NATTEN na2d over the image tokens only, (B, X, Y, H, D) layout, a
    kernel x kernel neighbourhood: no text or pooled keys, no text rows."""
    B, H, _, D = q.shape
    qs, ks, vs = (t[:, :, text_len:].transpose(1, 2).reshape(B, grid, grid, H, D).contiguous() for t in (q, k, v))
    return lambda: fn(qs, ks, vs, kernel_size=(kernel, kernel))


def format_row(row):
    def cell(key, fmt, width):
        value = row.get(key)
        return f"{'-':>{width}}" if value is None else f"{value:{width}{fmt}}"
    return (f"{row['grid']:5d} {row['window']:3d} {row['down_factor']:2d} | {cell('dense_ms', '.3f', 9)} "
            f"{cell('flex_ms', '.3f', 9)} {cell('ours_ms', '.3f', 9)} | {cell('ours_tflops', '.1f', 9)} "
            f"{cell('speedup_vs_dense', '.2f', 8)} {cell('speedup_vs_flex', '.2f', 7)} {cell('flop_ratio', '.1f', 8)} "
            f"{cell('percent_of_ideal', '.1f', 7)} {cell('percent_of_ceiling', '.1f', 6)} | "
            f"{cell('sol_ms', '.3f', 8)} {cell('natten_ms', '.3f', 9)} | {cell('rel_err_vs_torch_path', '.1e', 8)} "
            f"{cell('flex_vs_ours_rel_err', '.1e', 8)}")


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def dense(q, k, v):
    """Dense attention through SDPA's flash backend (FA2): the reference for the FLOP ratio and the peers'
    stand-ins."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.FLASH_ATTENTION] if q.is_cuda else [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION]
    with sdpa_kernel(backends):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


DENSE = {"flash": "SDPA flash (FA2)", "cudnn": "SDPA cuDNN attention", "fa3": "FlashAttention-3 (flash_attn_interface)"}


def dense_baselines(names, q):
    """{name: fn(q, k, v)} of the dense attentions that run here on q's shape and dtype,
    and {name: status} ("ok" or why not) for each name."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(backend):
        def run(q, k, v):
            with sdpa_kernel([backend]):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return run

    fns, status = {}, {}
    for name in names:
        try:
            if name == "flash":
                fn = dense
            elif name == "cudnn":
                if not hasattr(SDPBackend, "CUDNN_ATTENTION"):
                    raise RuntimeError("this torch has no cuDNN SDPA backend")
                fn = sdpa(SDPBackend.CUDNN_ATTENTION)
            elif name == "fa3":
                import flash_attn_interface  # FA3's Hopper build; (B, L, H, D) layout

                def fn(q, k, v, fa=flash_attn_interface.flash_attn_func):
                    out = fa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
                    return (out[0] if isinstance(out, tuple) else out).transpose(1, 2)
            else:
                raise SystemExit(f"unknown dense baseline {name!r}: choose from {', '.join(DENSE)}")
            probe = q[:, :, :256]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fn(probe, probe, probe)  # refuses here: a RuntimeError (no kernel for this GPU, dtype, head_dim)
            fns[name], status[name] = fn, "ok"
        except ImportError as exc:
            status[name] = f"not importable: {exc}"
        except Exception as exc:  # RuntimeError mostly: no kernel for this GPU, dtype or head_dim
            lines = str(exc).strip().splitlines()
            status[name] = f"unavailable: {lines[0][:200] if lines else type(exc).__name__}"
    return fns, status


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
    p.add_argument("--flex-radii", type=int, nargs="+", help="radii to run FlexAttention at (default: all)")
    p.add_argument("--flex-down", type=int, nargs="+", help="down factors to run FlexAttention at (default: all)")
    p.add_argument("--peers", nargs="*", default=[], choices=["sol", "natten"],
                   help="also time comfy-kitchen sol_attn / NATTEN na2d (skipped, with the reason, if not installed)")
    p.add_argument("--standin-peers", action="store_true",
                   help="dry runs: each peer is replaced by a dense SDPA stand-in (labelled) so its code runs")
    p.add_argument("--budget-s", type=float, help="start no new grid after this many seconds (the first always "
                   "runs; the rest are listed under 'skipped'); the JSON is rewritten after every row")
    p.add_argument("--dense", nargs="+", default=["flash", "cudnn", "fa3"], choices=list(DENSE),
                   help="dense baselines timed per grid; the fastest is the comparison (x dense, %% ideal)")
    p.add_argument("--check-max-grid", type=int, default=128, help="largest grid to check correctness at")
    p.add_argument("--quick", action="store_true", help="CPU smoke run: tiny shapes")
    p.add_argument("--out", help="JSON path (default bench/results/attention-<device>-<date>.json)")
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    smoke = args.quick or not cuda
    notes = []
    if smoke:
        args.grids = [g for g in args.grids if g <= 16] or [8, 16]
        args.radii = [r for r in args.radii if r <= 4] or [2, 4]
        args.heads, args.head_dim, args.text, args.dtype = 2, 64, 16, "float32"
        args.repeats = min(args.repeats, 4)
        notes.append(SMOKE_NOTE)
        print(f"*** {SMOKE_NOTE.upper()} ***\nCPU smoke run: tiny shapes, ours = the torch path, FlexAttention "
              "eager (uncompiled); checks the scripts and masks, times nothing meaningful", flush=True)
    device = "cuda" if cuda else "cpu"
    ours_backend = "triton" if cuda else "torch"
    dtype = getattr(torch, args.dtype)
    flex = make_block_mask = None
    if not args.no_flex:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        if cuda:  # as the reference implementation: both compiled (an eager mask costs L^2 bytes)
            torch._dynamo.config.recompile_limit = 256  # one compile per (grid, r, d) mask_mod
            flex = torch.compile(flex_attention, dynamic=False)
            make_block_mask = torch.compile(create_block_mask)
        else:  # compiling for the CPU takes minutes; eager is exact and fine at smoke sizes
            flex, make_block_mask = flex_attention, create_block_mask
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    probe = torch.zeros(1, args.heads, 256, args.head_dim, device=device, dtype=dtype)
    dense_fns, dense_status = dense_baselines(args.dense, probe)
    for name, status in dense_status.items():
        print(f"dense {name} ({DENSE[name]}): {status}", flush=True)
    if not dense_fns:
        sys.exit(f"no dense baseline runs here: {dense_status}")

    env = environment()
    peers = Peers(args.peers, device, standin=args.standin_peers)
    arch = torch.cuda.get_device_capability()[0] * 10 + torch.cuda.get_device_capability()[1] if cuda else None
    rows, skipped = [], []
    t_start = time.perf_counter()

    def save():
        payload = {"environment": env, "cpu_smoke_run": smoke, "notes": notes, "args": vars(args),
                   "peers": peers.status, "dense": dense_status, "rows": rows, "skipped": skipped}
        return payload, write_results("attention", payload, args.out)

    print(f"{'grid':>5} {'r':>3} {'d':>2} | {'dense ms':>9} {'flex ms':>9} {'ours ms':>9} | {'ours TF/s':>9} "
          f"{'x dense':>8} {'x flex':>7} {'ideal x':>8} {'% ideal':>7} {'% ceil':>6} | {'sol ms':>8} "
          f"{'natten ms':>9} | {'err':>8} {'flex err':>8}")
    for g in args.grids:  # the budget is checked per grid (the first always runs): its configs share q, k, v
        if rows and args.budget_s is not None and time.perf_counter() - t_start > args.budget_s:
            skipped += [{"grid": g, "window": r, "down_factor": d} for d in args.down for r in args.radii]
            continue
        T, B, H, D = args.text, 1, args.heads, args.head_dim
        L = T + g * g
        gen = torch.Generator(device=device).manual_seed(g)
        q, k, v = (torch.randn(B, H, L, D, device=device, dtype=dtype, generator=gen) for _ in range(3))
        dense_each = {}
        for name, fn in dense_fns.items():
            try:
                dense_each[name] = time_ms(lambda fn=fn: fn(q, k, v), args.repeats)
            except RuntimeError as exc:  # e.g. out of memory at one size: the others still compare
                print(f"NOTE: dense {name} failed at grid {g}: {str(exc).strip()[:200]}", flush=True)
        if not dense_each:
            sys.exit(f"no dense baseline ran at grid {g}")
        dense_backend = min(dense_each, key=dense_each.get)  # the fastest is the comparison
        dense_ms = dense_each[dense_backend]
        peer_ms = {}  # sol per grid, natten per (grid, kernel)

        def peer_time(key, make):
            if key not in peer_ms:
                try:
                    peer_ms[key] = (time_ms(make(), args.repeats), None)
                except Exception as exc:  # a shape the peer refuses, out of memory: record it, go on
                    peer_ms[key] = (None, f"{type(exc).__name__}: {str(exc).strip()[:200]}")
                    print(f"NOTE: {key[0]} failed at grid {g}: {peer_ms[key][1]}", flush=True)
            return peer_ms[key]

        for d in args.down:
            for r in args.radii:
                cfg = tiling.kernel_config(D, r, d, arch)
                ratio = tiling.work_ratio(T, (g, g), r, d, cfg)
                row = {"grid": g, "image_px": 16 * g, "window": r, "down_factor": d, "heads": H, "head_dim": D,
                       "text_len": T, "dtype": args.dtype, "ours_backend": ours_backend, "dense_ms": dense_ms,
                       "dense_backend": dense_backend, **{f"dense_{n}_ms": ms for n, ms in dense_each.items()},
                       "dense_flops": dense_flops(B, H, D, T, g, g), "clear_flops": clear_flops(B, H, D, T, g, g, r, d),
                       "kernel_config": cfg, "issued_over_useful": ratio, "work_model_ceiling_pct": 100 / ratio}
                if "sol" in peers.fns:
                    row["sol_ms"], row["sol_error"] = peer_time(("sol",), lambda: sol_run(peers.fns["sol"], q, k, v, T))
                if "natten" in peers.fns:
                    kern = natten_kernel(r, g)
                    row["natten_kernel"] = kern
                    row["natten_ms"], row["natten_error"] = peer_time(
                        ("natten", kern), lambda: natten_run(peers.fns["natten"], q, k, v, T, g, kern))
                ours = lambda: clear_attention(q, k, v, text_len=T, grid=(g, g), window=r, down_factor=d,  # noqa: E731
                                               backend=ours_backend)
                row["ours_ms"] = time_ms(ours, args.repeats)
                row["flex_ms"] = None
                if (flex is not None and g <= args.flex_max_grid and (not args.flex_radii or r in args.flex_radii)
                        and (not args.flex_down or d in args.flex_down)):
                    row["flex_mode"] = "compiled" if cuda else "eager (cpu smoke)"
                    try:
                        run_flex, info = flex_clear(q, k, v, T, (g, g), r, d, flex, make_block_mask)
                        row.update(info)
                        row["flex_ms"] = time_ms(run_flex, args.repeats)
                        if g <= args.check_max_grid:
                            row["flex_vs_ours_rel_err"] = rel_err(run_flex(), ours())
                        del run_flex
                    except Exception as exc:  # e.g. out of memory at large grids: record it, go on
                        row["flex_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                        print(f"NOTE: FlexAttention failed at grid {g}, r={r}, d={d}: {row['flex_error']}", flush=True)
                        if cuda:
                            torch.cuda.empty_cache()
                if g <= args.check_max_grid:
                    exact = clear_attention(q.float(), k.float(), v.float(), text_len=T, grid=(g, g), window=r,
                                            down_factor=d, backend="torch")
                    row["rel_err_vs_torch_path"] = rel_err(ours(), exact)
                    del exact
                row["ours_tflops"] = row["clear_flops"] / row["ours_ms"] / 1e9
                row["speedup_vs_dense"] = dense_ms / row["ours_ms"]
                row["flop_ratio"] = row["dense_flops"] / row["clear_flops"]
                row["percent_of_ideal"] = 100 * row["speedup_vs_dense"] / row["flop_ratio"]
                row["speedup_vs_flex"] = row["flex_ms"] / row["ours_ms"] if row["flex_ms"] else None
                row["percent_of_ceiling"] = 100 * row["percent_of_ideal"] / row["work_model_ceiling_pct"]
                for peer in ("sol", "natten"):
                    if row.get(f"{peer}_ms"):
                        row[f"speedup_vs_{peer}"] = row[f"{peer}_ms"] / row["ours_ms"]
                rows.append(row)
                print(format_row(row), flush=True)
                save()
        q = k = v = None  # free this grid's inputs before the next one's
        if cuda:
            torch.cuda.empty_cache()
    if flex is not None:
        notes.append(f"FlexAttention {'compiled' if cuda else 'eager'}; block mask built once per config, not timed "
                     "(flex_mask_build_s, flex_mask_build_peak_mib, flex_mask_est_mib in each row)")
    if peers.status:
        notes.append("sol_attn (comfy-kitchen) routes key blocks by score: approximate, a different computation, "
                     "timed for speed only; NATTEN na2d: image tokens only, an odd square window with about "
                     "pi r^2 keys (natten_kernel), no text or pooled keys")
    if skipped:
        notes.append(f"time budget of {args.budget_s} s reached: {len(skipped)} configurations skipped")
        print("NOTE:", notes[-1], flush=True)
    payload, path = save()
    print("wrote", os.path.relpath(path))
    return payload


if __name__ == "__main__":
    main()
