"""ComfyUI nodes of this package. Node modules import ComfyUI lazily (inside
functions), so the package also imports outside ComfyUI (tests, benchmarks)."""

import sys

from . import band_split, clear_patch, distill, distill_data, templates, token_chunking, weights

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
for _module in (clear_patch, token_chunking, band_split, distill_data, distill):
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)

# Loaded by ComfyUI (its folder_paths is already imported): register models/clear
# now, so the folder exists from start-up, and put our templates in reading
# order. Elsewhere (tests, benchmarks) nothing of ComfyUI is imported here.
if "folder_paths" in sys.modules:
    weights.register_model_folder()
    templates.install_template_order()
