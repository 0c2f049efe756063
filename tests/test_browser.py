"""The course in a real browser: JupyterLab from this environment, driven in headless Chromium.

Learners meet the course in JupyterLab, so this test starts it (from the project's environment,
on a free local port, over a copy of lessons/ and a generated tour notebook), opens it in
headless Chromium (Debian's `chromium`; no browser is downloaded) through the Chrome DevTools
protocol, and checks that

- every lesson opens and renders all its cells, with no error dialog;
- each lesson cell tagged `widget` (a tool that needs no earlier cell) runs, its widget renders
  (its DOM element and figure exist, no error output) and redraws when a control changes;
- each tool of `minipeft.course.widgets` renders in the tour notebook, the live training view
  included.

Screenshots of each widget go to `MINIPEFT_SCREENSHOTS` (a folder) when set, else to pytest's
temporary folder; the README shows the ones committed under docs/screenshots/. Skipped, with a
message, where no Chromium is installed (`.ci/run` installs it).
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(name)), None)
pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here: apt-get install "
                                 "chromium (.ci/run installs it) to run the browser test")]
TOKEN = "minipeft-browser-test"
TOOL = ".minipeft-tool"          # minipeft.course.widgets.TOOL_CLASS

TOUR = [  # the tour notebook: one cell per tool
    "from minipeft import course\nfrom minipeft.course import training, widgets",
    "widgets.will_it_fit()",
    "import torch\n\ntorch.manual_seed(0)   # a rank-4 update with a little noise\n"
    "delta = torch.randn(96, 4) @ torch.randn(4, 64) + 0.05 * torch.randn(96, 64)\n"
    "widgets.rank_explorer(delta, accuracy={1: 0.62, 2: 0.81, 4: 0.95, 8: 0.96}, "
    "name='a rank-4 update')",
    "model, tokenizer = course.load_model('bert', num_labels=2)\n"
    "widgets.nf4_explorer(model.bert.encoder.layer[0].intermediate.dense.weight.detach())",
    "data = course.load_data('sentiment')\n"
    "model.requires_grad_(False).classifier.requires_grad_(True)\n"
    "result = training.train(model, tokenizer, data['train'].select(range(96)), batch_size=16,\n"
    "                        lr=1e-2, eval_data=data['validation'].select(range(32)),\n"
    "                        eval_every=3, desc='the classifier head')",
]


SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false", "checkForUpdates": False},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_url(url: str, seconds: float) -> str:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


class DevTools:
    """The few Chrome DevTools protocol calls the test needs, over one page's websocket."""

    def __init__(self, ws_url: str) -> None:
        import websocket                      # websocket-client, which jupyter_server needs

        self.socket = websocket.create_connection(ws_url, timeout=120, suppress_origin=True)
        self.next_id = 0

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def js(self, expression: str):
        """Evaluate `expression` in the page (awaiting a promise) and return its JSON value."""
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True,
                           returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"in the page: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait(self, expression: str, seconds: float, what: str):
        deadline = time.monotonic() + seconds
        while not (value := self.js(expression)):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {seconds} s waiting for {what}")
            time.sleep(0.25)
        return value

    def screenshot(self, selector: str, path: Path) -> None:
        box = self.js(f"""(() => {{ const e = document.querySelector({json.dumps(selector)});
            e.scrollIntoView({{block: "center"}}); const r = e.getBoundingClientRect();
            return {{x: r.x, y: r.y, width: r.width, height: r.height}}; }})()""")
        data = self.call("Page.captureScreenshot", format="png",
                         clip={**box, "scale": 1})["data"]
        path.write_bytes(base64.b64decode(data))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """JupyterLab's root: a copy of lessons/ and the tour notebook."""
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    root = tmp_path_factory.mktemp("lab")
    shutil.copytree(ROOT / "lessons", root / "lessons", ignore=shutil.ignore_patterns("*.py"))
    tour = new_notebook(cells=[new_code_cell(source) for source in TOUR])
    tour.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3"}
    nbformat.write(tour, root / "tour.ipynb")
    return root


@pytest.fixture(scope="module")
def page(folder, tmp_path_factory):
    """A headless Chromium page on JupyterLab (both stopped after the module's tests)."""
    lab_port = devtools_port = _free_port()
    while devtools_port == lab_port:
        devtools_port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("MINIPEFT_WIDGETS",
                                                           "MINIPEFT_PROGRESS")}
    settings = tmp_path_factory.mktemp("settings")
    for name, value in SETTINGS.items():          # every cell in the page, no news pop-up
        (settings / name).parent.mkdir(parents=True, exist_ok=True)
        (settings / name).write_text(json.dumps(value))
    env.update(JUPYTER_PLATFORM_DIRS="1", OMP_NUM_THREADS="1",
               JUPYTERLAB_SETTINGS_DIR=str(settings),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp_path_factory.mktemp("workspaces")))
    lab = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1",
         f"--port={lab_port}", f"--IdentityProvider.token={TOKEN}",
         f"--ServerApp.root_dir={folder}", "--LabApp.expose_app_in_browser=True",
         "--ServerApp.port_retries=0", "--allow-root"], env=env, cwd=folder,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    profile = tmp_path_factory.mktemp("chromium")
    browser = subprocess.Popen(
        [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-dev-shm-usage", f"--remote-debugging-port={devtools_port}",
         f"--user-data-dir={profile}", "--window-size=1280,1000", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_url(f"http://127.0.0.1:{lab_port}/api/status?token={TOKEN}", 60)
        targets = json.loads(_wait_for_url(f"http://127.0.0.1:{devtools_port}/json/list", 30))
        tools = DevTools(next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"])
        tools.call("Page.enable")
        tools.call("Page.navigate", url=f"http://127.0.0.1:{lab_port}/lab?token={TOKEN}")
        tools.wait("Boolean(window.jupyterapp) && Boolean(document.querySelector("
                   "'.jp-LabShell'))", 90, "JupyterLab to start")
        yield tools
        tools.socket.close()
    finally:
        browser.terminate()
        lab.terminate()
        for process in (browser, lab):
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.fixture
def shots(tmp_path) -> Path:
    folder = Path(os.environ.get("MINIPEFT_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _open(page: DevTools, path: str, kernel: bool = True) -> int:
    """Open a notebook (with `kernel`, wait until its kernel is ready), return its number of
    rendered cells."""
    for attempt in (1, 2):
        try:
            return page.js(f"""(async () => {{
                const panel = await window.jupyterapp.commands.execute("docmanager:open",
                    {{path: {json.dumps(path)}, factory: "Notebook"}});
                await panel.context.ready; await panel.revealed;
                if ({json.dumps(kernel)}) {{ await panel.sessionContext.ready; }}
                window.minipeftPanel = panel;
                return panel.content.widgets.filter(cell => cell.node.isConnected).length;
                }})()""")
        except RuntimeError as error:
            # Chromium fails the call when an awaited promise can no longer settle and is
            # garbage-collected ("Promise was collected", once in a make test run); opening the
            # document again returns the panel that JupyterLab shows
            if "Promise was collected" not in str(error) or attempt == 2:
                raise


def _run_cell(page: DevTools, index: int, seconds: float = 120) -> str:
    """Run cell `index` of the open notebook; wait for a tool (or text) in its output; return
    the CSS selector of the cell."""
    page.js(f"""(async () => {{ const panel = window.minipeftPanel;
        const cell = panel.content.widgets[{index}];
        cell.model.sharedModel.transact(() => {{                // forget the committed output
            cell.model.sharedModel.setOutputs([]);
            cell.model.sharedModel.execution_count = null; }});
        cell.node.id = "minipeft-cell-{index}";
        panel.content.activeCellIndex = {index};
        window.jupyterapp.commands.execute("notebook:run-cell"); return true; }})()""")
    cell = f"#minipeft-cell-{index}"
    page.wait(f"""(() => {{ const c = document.querySelector("{cell}");
        const prompt = c.querySelector(".jp-InputArea-prompt").textContent;
        return /\\[\\d+\\]/.test(prompt); }})()""", seconds, f"cell {index} to finish")
    errors = page.js(f"""Array.from(document.querySelectorAll(
        '{cell} [data-mime-type="application/vnd.jupyter.stderr"], {cell} .jp-OutputArea-output'))
        .map(e => e.textContent).filter(t => /Traceback|Error/.test(t))""")
    assert not errors, f"cell {index} printed an error: {errors[0][:2000]}"
    return cell


def _check_tool(page: DevTools, cell: str, shot: Path, change: str | None = None) -> None:
    """The cell's tool rendered a figure; with `change` (JS acting on the tool's element `tool`),
    the figure is redrawn; then a screenshot."""
    image = f"{cell} {TOOL} img"
    source = page.wait(f"""(() => {{ const i = document.querySelector("{image}");
        return i && i.complete && i.naturalWidth > 0 && i.src; }})()""", 60,
        f"the figure of the tool in {cell}")
    assert "Error displaying widget" not in page.js(
        f"document.querySelector('{cell}').textContent")
    if change:
        page.js(f"""(() => {{ const tool = document.querySelector("{cell} {TOOL}");
            {change}; return true; }})()""")
        page.wait(f"""(() => {{ const i = document.querySelector("{image}");
            return i && i.complete && i.src !== {json.dumps(source)}; }})()""", 60,
            f"the tool in {cell} to redraw after a change")
    page.screenshot(f"{cell} {TOOL}", shot)


def _tagged_widget_cells(path: Path) -> list[int]:
    cells = json.loads(path.read_text())["cells"]
    return [i for i, c in enumerate(cells) if "widget" in c.get("metadata", {}).get("tags", [])]


SELECT_QLORA_THEN_FULL = """const menu = tool.querySelectorAll("select")[1];
    menu.value = Array.from(menu.options).find(o => o.textContent === "full").value;
    menu.dispatchEvent(new Event("change", {bubbles: true}))"""


def test_the_course_in_a_browser(page, folder, shots):
    """One test: one JupyterLab and one Chromium serve every check."""
    every_lesson_renders_and_its_widget_cells_run(page, folder, shots)
    every_tool_renders_in_the_tour(page, shots)


def every_lesson_renders_and_its_widget_cells_run(page, folder, shots):
    lessons = sorted((folder / "lessons").glob("*.ipynb"))
    assert len(lessons) >= 10
    ran = 0
    for path in lessons:
        cells = json.loads(path.read_text())["cells"]
        widget_cells = _tagged_widget_cells(path)
        assert _open(page, f"lessons/{path.name}", kernel=bool(widget_cells)) == len(cells), (
            f"{path.name}: not every cell rendered")
        assert not page.js("Boolean(document.querySelector('.jp-Dialog'))"), (
            f"{path.name}: JupyterLab showed a dialog on opening it")
        for index in widget_cells:
            cell = _run_cell(page, index)
            _check_tool(page, cell, shots / f"{path.stem}-cell{index}.png",
                        change=SELECT_QLORA_THEN_FULL if "will_it_fit" in
                        "".join(cells[index]["source"]) else None)
            ran += 1
        page.js("""(async () => { const panel = window.minipeftPanel;
            await panel.sessionContext.shutdown(); panel.dispose(); return true; })()""")
    assert ran >= 2, "lessons 7 and 8 each have a Will it fit? cell tagged widget"


def every_tool_renders_in_the_tour(page, shots):
    assert _open(page, "tour.ipynb") == len(TOUR)
    _run_cell(page, 0)
    _check_tool(page, _run_cell(page, 1), shots / "will_it_fit.png",
                change=SELECT_QLORA_THEN_FULL)
    slider_right = """const s = tool.querySelector(".widget-slider .noUi-handle") ||
        tool.querySelector("input[type=range]"); s.focus();
        s.dispatchEvent(new KeyboardEvent("keydown", {key: "ArrowRight", bubbles: true}))"""
    _check_tool(page, _run_cell(page, 2), shots / "rank_explorer.png", change=slider_right)
    toggle_int4 = """Array.from(tool.querySelectorAll("button"))
        .find(b => b.textContent.trim() === "int4").click()"""
    _check_tool(page, _run_cell(page, 3), shots / "nf4_explorer.png", change=toggle_int4)
    cell = _run_cell(page, 4)
    _check_tool(page, cell, shots / "training_view.png")
    text = page.js(f"document.querySelector('{cell}').textContent")
    assert "steps in" not in text, "a live view, not the summary line"
