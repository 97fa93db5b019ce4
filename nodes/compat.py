"""Where ComfyUI's API differs between the versions this package supports
(0.3.64 to 0.33.0): the one place that knows. Everything here asks ComfyUI
what it has (a field, a parameter, a class) instead of comparing version
numbers, so versions in between work too. ComfyUI is imported lazily."""

import dataclasses
import inspect


def flux_params_extra():
    """Fields FLUX.1 configs need beyond the classic ones: 0.33's FluxParams
    requires ``txt_ids_dims`` (FLUX.1 = [], what model detection sets)."""
    import comfy.ldm.flux.model

    fields = {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}
    return {"txt_ids_dims": []} if "txt_ids_dims" in fields else {}


def prompt_executor(server):
    """execution.PromptExecutor with ComfyUI's classic cache (no cache_type):
    0.33 needs ``cache_args`` (main.py passes lru/ram/ram_inactive; classic
    reads none), 0.3.64 has none."""
    import execution

    if "cache_args" in inspect.signature(execution.PromptExecutor).parameters:
        return execution.PromptExecutor(server, cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})
    return execution.PromptExecutor(server)
