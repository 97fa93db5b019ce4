"""Reading order of the bundled templates in ComfyUI's Templates dialog.

ComfyUI's ``/workflow_templates`` route lists each custom node's
``workflows/*.json`` in directory order (``glob``: hash order on ext4, name
order on NTFS), and both frontends we test (1.27, 1.49 with its default sort)
show that order as is. So the server reply is put in reading order here: an
aiohttp middleware reorders the one list that holds our templates and leaves
every other module's list untouched. Installed only inside a running ComfyUI
(``server.PromptServer.instance`` exists before custom nodes are imported).
"""

import json
import logging
import sys

ORDER = (  # simplest first; workflows/build.py writes these files
    "CLEAR FLUX 1K text to image",
    "CLEAR FLUX 4K hires",
    "CLEAR FLUX 4K hires + LoRA",
    "CLEAR FLUX 4K hires + ControlNet",
    "CLEAR FLUX 8K hires",
    "CLEAR FLUX 8K hires + 2 GPUs",
    "CLEAR FLUX distill",
)
ROUTES = ("/workflow_templates", "/api/workflow_templates")

log = logging.getLogger(__name__)


def in_reading_order(templates):
    """``templates`` ({module folder: [names]}) with ours in ORDER: a list that
    holds all of ORDER is ours whatever the install folder is called; names it
    has beyond ORDER keep their order after them."""
    wanted = set(ORDER)
    out = {}
    for module, names in templates.items():
        if isinstance(names, list) and wanted <= set(names):
            rank = {name: i for i, name in enumerate(ORDER)}
            names = sorted(names, key=lambda n: rank.get(n, len(ORDER)))
        out[module] = names
    return out


def install_template_order():
    """Add the reordering middleware to ComfyUI's server app; False where there
    is no running ComfyUI server (tests, scripts) or its app already started."""
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    app = getattr(instance, "app", None)
    if app is None or getattr(app, "frozen", True):
        return False
    from aiohttp import web

    @web.middleware
    async def clear_template_order(request, handler):
        response = await handler(request)
        if request.path in ROUTES and request.method == "GET" and getattr(response, "status", 0) == 200:
            try:
                response.text = json.dumps(in_reading_order(json.loads(response.text)))
            except Exception as exc:  # never break the route for a cosmetic order
                log.debug("CLEAR: template order left as is: %s", exc)
        return response

    app.middlewares.append(clear_template_order)
    return True
