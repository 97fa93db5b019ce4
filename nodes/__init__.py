"""ComfyUI nodes of this package. Node modules import ComfyUI lazily (inside
functions), so the package also imports outside ComfyUI (tests, benchmarks)."""

from . import band_split, clear_patch, token_chunking

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
for _module in (clear_patch, token_chunking, band_split):
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)
