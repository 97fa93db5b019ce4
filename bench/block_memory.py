"""Peak memory and time of one full-width FLUX block (hidden 3072, 24 heads),
ComfyUI's own block vs the token-chunked one, on the CPU, each run in its own
process; compared with the memory model of nodes/token_chunking.py.

    COMFYUI_PATH=/path/to/ComfyUI python bench/block_memory.py            # 2K, chunks of 4096 tokens
    COMFYUI_PATH=... python bench/block_memory.py --grid 128 --chunk 4096 --repeats 2

Per run: anonymous resident memory (RSS minus file-backed pages, which a busy
machine may evict) just before the block call (weights, inputs) and its peak
while the block runs, sampled every ms; the difference is the block's
activation peak. Children run with MALLOC_MMAP_THRESHOLD_=65536 so freed
activations leave the RSS (glibc otherwise keeps some on its heap). Attention
is PyTorch's SDPA (ComfyUI's --use-pytorch-cross-attention), which holds no
L x L scores. Times: the block call, CPU time of the calling thread (torch runs inline with
--threads 1) and wall time;
the speed ratio takes each mode's fastest of --repeats runs, interleaved, so
load from other processes hits both alike.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time

HIDDEN, HEADS, MLP, TEXT = 3072, 24, 12288, 512


def _anon_rss_bytes():
    """Resident anonymous memory (resident - file-backed): the machine may evict
    library pages under memory pressure, which would move plain RSS."""
    with open("/proc/self/statm") as f:
        _, resident, shared = f.read().split()[:3]
    return (int(resident) - int(shared)) * os.sysconf("SC_PAGE_SIZE")


class _PeakSampler(threading.Thread):
    """Samples the anonymous RSS every ms while the block runs (torch ops release the GIL)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.running = _anon_rss_bytes(), True

    def run(self):
        while self.running:
            self.peak = max(self.peak, _anon_rss_bytes())
            time.sleep(0.001)


def child(kind, mode, grid, chunk, threads, comfyui):
    sys.path.insert(0, comfyui)
    import comfy.options
    comfy.options.enable_args_parsing(False)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    comfy.cli_args.args.use_pytorch_cross_attention = True
    import torch
    import comfy.ldm.flux.layers as layers
    import comfy.ops
    from comfyui_clear.nodes import token_chunking

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    ops = comfy.ops.disable_weight_init
    with torch.no_grad():
        if kind == "double":
            block = layers.DoubleStreamBlock(HIDDEN, HEADS, MLP / HIDDEN, qkv_bias=True, operations=ops)
        else:
            block = layers.SingleStreamBlock(HIDDEN, HEADS, MLP / HIDDEN, operations=ops)
        for p in block.parameters():  # in place: no init temporaries above the baseline
            p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5) if p.dim() > 1 else p.fill_(1.0)
        n = grid * grid
        img = torch.randn(1, n, HIDDEN)
        txt = torch.randn(1, TEXT, HIDDEN)
        vec = torch.randn(1, HIDDEN)
        ids = torch.zeros(1, TEXT + n, 3)
        ids[0, TEXT:, 1] = (torch.arange(n) // grid).float()
        ids[0, TEXT:, 2] = (torch.arange(n) % grid).float()
        pe = layers.EmbedND(dim=HIDDEN // HEADS, theta=10000, axes_dim=[16, 56, 56])(ids)
        x = torch.cat((txt, img), 1) if kind == "single" else None
        if kind == "double":
            args = {"img": img, "txt": txt, "vec": vec, "pe": pe, "transformer_options": {}}
        else:
            del img, txt
            args = {"img": x, "vec": vec, "pe": pe, "transformer_options": {}}
        before = _anon_rss_bytes()
        sampler = _PeakSampler()
        sampler.start()
        start, cpu_start = time.perf_counter(), time.thread_time()
        if mode == "dense" and kind == "double":
            out = block(**args)
        elif mode == "dense":
            out = block(x, vec=vec, pe=pe, transformer_options={})
        elif kind == "double":
            out = token_chunking.double_block(block, args, chunk)
        else:
            out = token_chunking.single_block(block, args, chunk)
        seconds, cpu_seconds = time.perf_counter() - start, time.thread_time() - cpu_start
        sampler.running = False
        sampler.join()
        del out
    peak = sampler.peak
    return {"kind": kind, "mode": mode, "grid": grid, "chunk": chunk, "anon_rss_before": before, "anon_rss_peak": peak,
            "max_rss_getrusage": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "activation_peak": peak - before, "seconds": seconds, "cpu_seconds": cpu_seconds, "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", type=int, default=128, help="image tokens per side (128 = 2K)")
    parser.add_argument("--chunk", type=int, default=4096, help="tokens per chunk")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time is not inflated by "
                        "threads waiting on each other on a busy machine)")
    parser.add_argument("--kinds", default="double,single")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "MODE"), help=argparse.SUPPRESS)
    a = parser.parse_args()
    comfyui = os.environ.get("COMFYUI_PATH")
    if not comfyui:
        sys.exit("set COMFYUI_PATH to a ComfyUI checkout")
    if a.child:
        print(json.dumps(child(*a.child, a.grid, a.chunk, a.threads, comfyui)))
        return

    from comfyui_clear.nodes.token_chunking import block_activation_bytes

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    rows = []
    for kind in a.kinds.split(","):
        for _ in range(a.repeats):
            for mode in ("dense", "chunked"):
                cmd = [sys.executable, os.path.abspath(__file__), "--grid", str(a.grid), "--chunk", str(a.chunk),
                       "--threads", str(a.threads), "--child", kind, mode]
                out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
                row = json.loads(out.strip().splitlines()[-1])
                row["modelled"] = block_activation_bytes(kind, TEXT + a.grid * a.grid, 4, None if mode == "dense" else a.chunk)
                rows.append(row)
                print(f"{kind:6s} {mode:7s} measured {row['activation_peak'] / 2**30:6.2f} GiB  modelled "
                      f"{row['modelled'] / 2**30:6.2f} GiB  ({row['modelled'] / row['activation_peak'] - 1:+.1%})  "
                      f"{row['cpu_seconds']:.1f} s CPU ({row['seconds']:.1f} s wall)", flush=True)
    print()
    for kind in a.kinds.split(","):
        for clock in ("cpu_seconds", "seconds"):
            best = {m: min(r[clock] for r in rows if r["kind"] == kind and r["mode"] == m) for m in ("dense", "chunked")}
            print(f"{kind}: chunked / dense {clock} = {best['chunked'] / best['dense']:.3f}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"command": sys.argv, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
