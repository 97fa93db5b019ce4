"""ComfyUI's weight streaming on the CPU, for tests.

On a GPU, a layer whose weights are not resident (low-VRAM / dynamic-VRAM
loading) is cast on every call by ``comfy.ops.cast_bias_weight`` through one of
ComfyUI's offload streams; from 0.33 on, into that stream's one reused cast
buffer (classic path: ``model_management.get_cast_buffer``; dynamic VRAM: the
aimdo cast buffer, always at offset 0). A cast weight is valid only until the
next cast on its stream. On the CPU none of this runs: the target device is
the weights' device and there are no streams.

``weight_streaming()`` makes ComfyUI's own cast code take that path on the CPU
by faking only the target device (``cpu:0``, which differs from the weights'
``cpu``) and the offload streams (no-op objects: CPU work is synchronous).
``dynamic_vram()`` adds the dynamic-VRAM path for layers given to it: the
parts of aimdo (ComfyUI's CUDA VRAM manager) that cast_bias_weight asks, faked
as "never resident in VRAM" and a CPU byte buffer as the per-stream cast buffer.
Everything else, the cast, the buffer handling, LoRA's LowVramPatch, is
ComfyUI's.
"""

import contextlib

import torch

DEVICE = torch.device("cpu", 0)  # the "GPU"


class NoopStream:
    """Stands in for a CUDA stream: ComfyUI only enters it and orders it."""

    def __init__(self, counter):
        self.counter = counter

    def __enter__(self):
        self.counter["casts"] += 1
        return self

    def __exit__(self, *exc):
        return False

    def wait_stream(self, other):
        pass

    def synchronize(self):
        pass


@contextlib.contextmanager
def weight_streaming(streams=2):
    """Inside: every ``comfy_cast_weights`` layer casts through ComfyUI's offload
    streams (``streams`` of them, as ``--async-offload N``). Yields a dict whose
    ``"casts"`` counts the casts run on a stream."""
    import comfy.model_management as mm
    import comfy.ops
    from comfy.cli_args import args

    counter = {"casts": 0}
    real = comfy.ops.cast_bias_weight

    def cast_to_the_device(s, input=None, dtype=None, device=None, *a, **k):
        if device is None and input is not None and input.device.type == "cpu":
            device = DEVICE
        return real(s, input, dtype, device, *a, **k)

    saved = (mm.NUM_STREAMS, dict(mm.STREAMS), dict(mm.stream_counters), args.cuda_malloc)
    mm.NUM_STREAMS = streams
    mm.STREAMS[DEVICE] = [NoopStream(counter) for _ in range(streams)]
    mm.stream_counters.pop(DEVICE, None)
    args.cuda_malloc = False  # cudaMallocAsync gives every cast its own tensor; without it, the shared buffer
    comfy.ops.cast_bias_weight = cast_to_the_device
    try:
        yield counter
    finally:
        comfy.ops.cast_bias_weight = real
        for stream in mm.STREAMS[DEVICE]:
            getattr(mm, "STREAM_CAST_BUFFERS", {}).pop(stream, None)
            getattr(mm, "STREAM_AIMDO_CAST_BUFFERS", {}).pop(stream, None)
        mm.NUM_STREAMS, streams_before, counters_before, args.cuda_malloc = saved
        mm.STREAMS.clear()
        mm.STREAMS.update(streams_before)
        mm.stream_counters.clear()
        mm.stream_counters.update(counters_before)


def has_dynamic_vram():
    """ComfyUI 0.33+: cast_bias_weight has the dynamic-VRAM (aimdo) path."""
    import comfy.ops
    return hasattr(comfy.ops, "cast_modules_with_vbar")


class _CastBuffer:
    """aimdo's VRAMBuffer on the CPU: ``get(size, offset)`` hands out a slice of one growing byte buffer."""

    def __init__(self):
        self.data = torch.empty(0, dtype=torch.uint8)

    def size(self):
        return self.data.numel()

    def get(self, size, offset=0):
        if size + offset > self.data.numel():
            self.data = torch.empty(size + offset, dtype=torch.uint8)
        return (self, self.data[offset:offset + size])


@contextlib.contextmanager
def dynamic_vram(layers):
    """Inside ``weight_streaming()``: ``layers`` are dynamic-VRAM layers (``_v``)
    that never fit in VRAM, so ComfyUI's ``cast_modules_with_vbar`` stages them in
    the stream's aimdo cast buffer. Fakes aimdo's VRAM (vbar, VRAMBuffer) and
    host pinning; ComfyUI's cast code runs unchanged."""
    import comfy.model_management as mm
    import comfy.ops
    import comfy.pinned_memory

    vbar, aimdo_torch = comfy.ops.comfy_aimdo.model_vbar, comfy.ops.comfy_aimdo.torch
    buffers = {}
    is_cpu = mm.is_device_cpu
    fakes = [(mm, "is_device_cpu", lambda device: device != DEVICE and is_cpu(device)),  # the fake GPU is no CPU
             (vbar, "vbar_fault", lambda v: None),                # not resident in VRAM
             (vbar, "vbar_signature_compare", lambda a, b: False),
             (vbar, "vbar_unpin", lambda v: None),
             (aimdo_torch, "aimdo_to_tensor", lambda alloc, device: alloc[1]),
             (mm, "get_aimdo_cast_buffer", lambda stream, device: buffers.setdefault(stream, _CastBuffer())),
             (comfy.pinned_memory, "get_pin", lambda *a, **k: None),
             (comfy.pinned_memory, "pin_memory", lambda *a, **k: None)]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in fakes]
    for owner, name, fake in fakes:
        setattr(owner, name, fake)
    for layer in layers:
        layer._v, layer._v_signature, layer._pin_state = object(), None, {"fast_disk": False}
        layer.comfy_cast_weights = True  # as the dynamic ModelPatcher leaves every layer
    try:
        yield buffers
    finally:
        for owner, name, real in saved:
            setattr(owner, name, real)
        for layer in layers:
            for name in ("_v", "_v_signature", "_pin_state", "_v_weight", "_v_bias", "comfy_cast_weights"):
                if name in layer.__dict__:
                    delattr(layer, name)
