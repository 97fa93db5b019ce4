"""ComfyUI nodes of this package. Node modules import ComfyUI lazily (inside
functions), so the package also imports outside ComfyUI (tests, benchmarks)."""

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
