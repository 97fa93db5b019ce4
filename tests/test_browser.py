"""The bundled workflows as a user meets them: a real ComfyUI server with this
package in custom_nodes/, its own frontend in headless Chromium (Playwright),
each template opened through the Templates dialog.

Needs COMFYUI_PATH, the `playwright` package and a Chromium binary (Debian:
apt-get install chromium; or CHROMIUM_PATH=/path/to/chromium). Playwright's
own downloaded browsers are not used. Screenshots (card, loaded, graph per
template) go to test-artifacts/browser/frontend-<version>/ (git-ignored; or
$CLEAR_TEST_ARTIFACTS/browser/...); the path is printed (pytest -s).
"""

import json
import os
import pathlib
import shutil
import urllib.parse
import urllib.request

import pytest

from _comfy_server import running_server
from conftest import REPO_ROOT

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

MODULE = "clear-flux"  # the folder name in custom_nodes/ (registry id, README clone): the Templates dialog's category
WORKFLOW_DIR = os.path.join(REPO_ROOT, "workflows")
NAMES = sorted(f[:-5] for f in os.listdir(WORKFLOW_DIR) if f.endswith(".json"))
VIEWPORT = {"width": 1920, "height": 1080}
# Screenshots for a person to look at (git-ignored; CI can keep the folder)
ARTIFACTS = pathlib.Path(os.environ.get("CLEAR_TEST_ARTIFACTS") or os.path.join(REPO_ROOT, "test-artifacts")) / "browser"


def _chromium():
    path = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path or not os.path.isfile(path):
        pytest.skip("no Chromium (apt-get install chromium, or set CHROMIUM_PATH)")
    return path


@pytest.fixture(scope="module")
def server(comfyui, tmp_path_factory):
    """ComfyUI on 127.0.0.1 with this checkout as custom_nodes/clear-flux (MODULE) and no model files."""
    base = tmp_path_factory.mktemp("browser_base")
    for folder in ("user", "models"):
        (base / folder).mkdir()
    with running_server(comfyui, base, MODULE) as url:
        yield url


@pytest.fixture(scope="module")
def page(server):
    """One browser page on the ComfyUI frontend, with its console and failed requests recorded."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the browser: Debian's chromium)")
    chromium = _chromium()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        pg = browser.new_page(viewport=VIEWPORT)
        pg.set_default_timeout(20_000)
        pg.console_log, pg.responses = [], []
        pg.on("console", lambda m: pg.console_log.append((m.type, f"{m.text} ({m.location.get('url')})")))
        pg.on("pageerror", lambda e: pg.console_log.append(("pageerror", str(e))))
        pg.on("response", lambda r: pg.responses.append((r.status, urllib.parse.unquote(r.url),
                                                         r.headers.get("content-type"))))
        pg.goto(server + "/")
        pg.wait_for_function("window.app && window.app.graph && window.app.canvas", timeout=90_000)
        pg.wait_for_timeout(1500)
        version = pg.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ || 'unknown'")
        pg.shots = ARTIFACTS / f"frontend-{version}"
        pg.shots.mkdir(parents=True, exist_ok=True)
        for old in pg.shots.glob("*.png"):
            old.unlink()
        print(f"\nscreenshots: {pg.shots}")
        yield pg
        browser.close()


DIALOGS = "[role=dialog]:visible"


def _close_dialogs(pg):
    for _ in range(4):
        if not pg.locator(DIALOGS).count():
            return
        pg.keyboard.press("Escape")
        pg.wait_for_timeout(300)


def _open_template(pg, name):
    """Templates (left sidebar) -> MODULE -> the card, as a user clicks.
    (A first start opens the Templates dialog by itself.)"""
    category = pg.get_by_text(MODULE, exact=True).first
    if not category.is_visible():
        _close_dialogs(pg)
        pg.locator("button", has_text="Templates").first.click()
    category.click()
    card = pg.get_by_text(name, exact=True).first
    card.wait_for(timeout=15_000)
    return card


GRAPH_STATE = """() => {
  const g = window.app.graph, nodes = g._nodes;
  const links = g.links instanceof Map ? Array.from(g.links.values()) : Object.values(g.links || {});
  return {
    nodes: nodes.map(n => ({id: n.id, type: n.type, title: n.title, registered: !!LiteGraph.registered_node_types[n.type],
                            bounds: Array.from(n.getBounding ? n.getBounding() : n.boundingRect),
                            size: Array.from(n.size), compute: Array.from(n.computeSize()),
                            inputs: (n.inputs || []).map(i => i.link), outputs: (n.outputs || []).map(o => o.links || []),
                            models: (n.properties || {}).models || null})),
    links: links.filter(l => l).map(l => [l.id, l.origin_id, l.origin_slot, l.target_id, l.target_slot]),
    scale: window.app.canvas.ds.scale,
    lodScale: window.app.canvas.low_quality_zoom_threshold ?? window.app.canvas._lowQualityZoomThreshold ?? null,
  };
}"""

BROKEN_IMAGES = """() => Array.from(document.querySelectorAll('[role=dialog] img'))
  .filter(i => i.complete && i.naturalWidth === 0).map(i => i.src)"""

NOTE_FIT = """() => Array.from(document.querySelectorAll('.comfy-markdown')).filter(e => e.clientHeight > 0).map(e => {
  const text = e.querySelector('.ProseMirror') || e, box = e.getBoundingClientRect();
  const zoom = box.height / e.clientHeight;  // the widget is scaled with the canvas
  return {client: e.clientHeight, scroll: e.scrollHeight,
          content: (text.lastElementChild.getBoundingClientRect().bottom - box.top) / zoom};
})"""


def _overlaps(nodes):
    found = []
    for i, a in enumerate(nodes):
        ax, ay, aw, ah = a["bounds"]
        for b in nodes[i + 1:]:
            bx, by, bw, bh = b["bounds"]
            if ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah:
                found.append(f"{a['title']} ({a['type']}) and {b['title']} ({b['type']})")
    return found


def _link_problems(state):
    nodes = {n["id"]: n for n in state["nodes"]}
    problems = []
    for link_id, src, src_slot, dst, dst_slot in state["links"]:
        if src not in nodes or dst not in nodes:
            problems.append(f"link {link_id} joins missing nodes {src} -> {dst}")
        elif link_id not in nodes[src]["outputs"][src_slot] or nodes[dst]["inputs"][dst_slot] != link_id:
            problems.append(f"link {link_id} is not held by both of its slots")
    return problems


SHOWN_NAMES = """names => {  // our template names in the open dialog, in document (= display) order
  const seen = [];
  for (const e of document.querySelectorAll('[role=dialog] *')) {
    const text = (e.textContent || '').trim();
    if (e.children.length === 0 && names.includes(text) && !seen.includes(text)) seen.push(text);
  }
  return seen;
}"""


def test_templates_are_shown_in_reading_order(page):
    from comfyui_clear.nodes.templates import ORDER

    assert sorted(ORDER) == NAMES
    _open_template(page, ORDER[0])
    page.wait_for_timeout(500)
    assert page.evaluate(SHOWN_NAMES, list(ORDER)) == list(ORDER)


@pytest.mark.parametrize("name", NAMES)
def test_template_loads_cleanly_in_the_frontend(page, server, name):
    pg = page
    with open(os.path.join(WORKFLOW_DIR, name + ".json"), encoding="utf-8") as f:
        workflow = json.load(f)
    console_before, responses_before = len(pg.console_log), len(pg.responses)
    card = _open_template(pg, name)
    pg.wait_for_timeout(500)
    # the card's thumbnail: requested (once per page: the frontend caches it) and served as a JPEG
    thumb = f"/api/workflow_templates/{MODULE}/{name}.jpg"
    served = [r for r in pg.responses if r[1].endswith(thumb)]
    assert served and all(r[0] == 200 and r[2] == "image/jpeg" for r in served), (thumb, served)
    assert pg.evaluate(BROKEN_IMAGES) == []
    pg.screenshot(path=str(pg.shots / f"{name} - card.png"))

    card.click()
    pg.wait_for_function("n => window.app.graph._nodes.length === n", arg=len(workflow["nodes"]), timeout=15_000)
    pg.wait_for_timeout(1500)  # the fit-to-view runs on the next frame; dialogs open after loading
    dialogs = pg.locator(DIALOGS).all_inner_texts()
    pg.screenshot(path=str(pg.shots / f"{name} - loaded.png"))
    state = pg.evaluate(GRAPH_STATE)

    # every node type is known: no missing-node dialog
    assert not [d for d in dialogs if "missing" in d.lower() and "node" in d.lower()], dialogs
    assert all(n["registered"] for n in state["nodes"]), [n["type"] for n in state["nodes"] if not n["registered"]]
    assert len(state["links"]) == len(workflow["links"]) and _link_problems(state) == []

    # the frontend renders every node at the size the JSON gives it, and none overlap
    sizes = {str(n["id"]): n["size"] for n in workflow["nodes"]}  # the frontend grows a node to its computeSize()
    for n in state["nodes"]:
        if n["type"] != "MarkdownNote":
            want = sizes[str(n["id"])]
            assert n["compute"][0] <= want[0] + 0.5 and n["compute"][1] <= want[1] + 0.5, (n["type"], n["compute"], want)
    assert _overlaps(state["nodes"]) == []

    # every downloadable model is listed with its file URL, the CLEAR weights included where the
    # template loads them (the distill template makes its own file)
    models = [m for n in state["nodes"] for m in (n["models"] or [])]
    clear = [m for m in models if m["directory"] == "clear"]
    loads_clear = any(n["type"] == "CLEARAttentionPatch" for n in workflow["nodes"])
    assert bool(clear) == loads_clear
    assert all(m["url"] == "https://huggingface.co/Huage001/CLEAR/resolve/main/" + m["name"] for m in clear)
    assert all(m["url"].startswith("https://huggingface.co/") and "/resolve/" in m["url"] for m in models), models
    missing_dialog = [d for d in dialogs if "Missing Models" in d]
    if missing_dialog and loads_clear:  # frontend 1.27: a dialog lists the files not on disk (1.49 marks the nodes instead)
        assert "clear / clear_local_16.safetensors" in missing_dialog[0], missing_dialog[0]

    # the view fitted on load at 1920x1080 keeps the text drawn (above the level-of-detail zoom, 8 px / 14 px)
    assert state["scale"] >= max(0.6, state["lodScale"] or 0), (state["scale"], state["lodScale"])

    # the note's text fits its box and fills most of it
    _close_dialogs(pg)
    notes = pg.evaluate(NOTE_FIT)
    assert len(notes) == 1
    for note in notes:
        assert note["scroll"] <= note["client"] + 1 and note["content"] <= note["client"], note
        assert note["content"] >= 0.75 * note["client"], f"the note is mostly empty: {note}"
    pg.screenshot(path=str(pg.shots / f"{name} - graph.png"))

    ours = [(kind, text) for kind, text in pg.console_log[console_before:]
            if kind in ("error", "pageerror") and (MODULE in text or "CLEAR" in text or name in text)
            and "net::ERR_" not in text]  # the missing-models dialog asks huggingface.co for file sizes: offline here
    assert ours == []
    assert [r for r in pg.responses[responses_before:] if MODULE in r[1] and r[0] >= 400] == []
