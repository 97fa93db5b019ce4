"""Memory probes for the attention tests: live tensor bytes (exact, any
platform) and resident-set peaks (what a user sees; Linux /proc)."""

import ctypes
import gc
import weakref

import torch
from torch.utils._pytree import tree_leaves
from torch.utils._python_dispatch import TorchDispatchMode


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storage allocated while active and still alive.

    Every op's new output storage is counted until its last tensor (view or
    not) is freed; views of memory that existed before (the inputs) are not.
    Composite ops run as their aten parts here, so their temporaries count.
    """

    def __init__(self):
        super().__init__()
        self.refs = {}  # storage address -> [nbytes, live tensors using it]
        self.live = self.peak = 0

    def _release(self, key):
        entry = self.refs[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key not in self.refs:
                if key in inputs or storage.nbytes() == 0:  # a view of older memory
                    continue
                self.refs[key] = [storage.nbytes(), 0]
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
            self.refs[key][1] += 1
            weakref.finalize(t, self._release, key)
        return out


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class RSSPeak:
    """Rise of the resident set's high-water mark over a block (Linux only):
    freed heap is handed back first, then the kernel's peak is reset."""

    def __enter__(self):
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        self.start = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        return self

    def __exit__(self, *exc):
        self.rise = (_status_kib("VmHWM") - self.start) * 1024


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor (in elements) any op produces while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out
