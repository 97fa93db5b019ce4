"""What the node modules share, in a module of its own so that none of them
imports another for it: the menu category, warn-once logging, and the band
worker of the CLEAR Multi-GPU Split running in this thread (CLEAR's
attention override hands its calls to it)."""

import logging
import threading

CATEGORY = "model/patch/CLEAR"  # every node of the pack, one menu (next to core's model/patch/flux on 0.33)
log = logging.getLogger(__name__)
_warned = set()
band_state = threading.local()  # .band: the split's band worker in this thread (None outside it)


def warn_once(message):
    """Log ``message`` as a warning the first time it comes in this process."""
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def current_band():
    """The band worker running in this thread (None outside a split forward)."""
    return getattr(band_state, "band", None)


def ui_error(cls):
    """Class decorator for the errors the nodes raise. ComfyUI's UI names an
    error ``module.qualname`` (execution.full_type_name), and a custom node's
    module name is its folder's path: '/home/me/ComfyUI/custom_nodes/ComfyUI-
    CLEAR.nodes.hub.CLEARDownloadError'. 'builtins' is the module it leaves
    out, so the UI (and a traceback) shows the bare class name. Nothing on the
    way to the UI pickles an error, which a class named so cannot be."""
    cls.__module__ = "builtins"
    return cls
