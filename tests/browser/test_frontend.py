"""The real ComfyUI frontend, served by the test server, in headless Chromium (Debian's package).

Loads every shipped workflow (no missing node types, widgets as saved), checks that the frontend's own
graph-to-prompt conversion agrees with ours, queues the fine-tune and distance workflows to completion, and
keeps a screenshot of each loaded graph in test-artifacts/.
"""
import json
import os
import shutil
import time

import pytest
from PIL import Image

from dev import workflows
from dev.datasets import make_dataset, photo
from dev.host import REPO_ROOT, execution_error

pytestmark = pytest.mark.browser
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = REPO_ROOT / "test-artifacts"

if not CHROMIUM:
    if os.environ.get("CI"):
        raise RuntimeError("Chromium is missing in CI: dev/setup_venv.sh installs Debian's chromium")
    pytest.skip("no chromium on this machine (make venv installs Debian's package as root)", allow_module_level=True)


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--disable-quic"])
        pg = browser.new_page(viewport={"width": 1600, "height": 1000})
        errors = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        server.post("/settings/Comfy.TutorialCompleted", True)  # no template browser popping up on a first visit
        pg.goto(server.url, wait_until="domcontentloaded")
        pg.wait_for_function("() => window.app && window.app.graph && window.LiteGraph", timeout=120_000)
        pg.wait_for_timeout(1500)
        pg.errors = errors
        yield pg
        browser.close()


@pytest.fixture(autouse=True)
def no_page_errors(page):
    """No uncaught error in the page: while it loaded (reported by the first test) or during each test."""
    yield
    errors, page.errors[:] = list(page.errors), []
    assert not errors, f"errors in the page: {errors}"


def load(page, workflow: dict):
    page.evaluate("async (wf) => { await window.app.loadGraphData(wf, true, true, 'test'); }", workflow)
    page.evaluate("""() => { const ds = window.app.canvas.ds; ds.scale = 0.75; ds.offset = [40, 320];
                             window.app.canvas.setDirty(true, true); }""")  # the whole graph in the screenshot
    page.wait_for_timeout(500)


def graph_state(page) -> list[dict]:
    return page.evaluate("""() => window.app.graph._nodes.map(n => ({
        id: n.id, type: n.type, registered: !!window.LiteGraph.registered_node_types[n.type],
        errors: !!n.has_errors,
        widgets: (n.widgets || []).map(w => [w.name, w.value]) }))""")


@pytest.mark.parametrize("name", sorted(p.name for p in workflows.WORKFLOWS.glob("*.json")))
def test_workflow_loads_without_missing_nodes_or_widget_errors(server, page, name):
    wf = workflows.load(name)
    page.evaluate("() => { window.selfpercMigrations = []; }")
    load(page, wf)
    assert page.evaluate("() => window.selfpercMigrations") == []  # a current workflow is not taken for an old one
    state = graph_state(page)
    assert len(state) == len(wf["nodes"])
    missing = [n["type"] for n in state if not n["registered"]]
    assert not missing, f"missing node types: {missing}"
    assert not [n for n in state if n["errors"]]
    saved = {n["id"]: n["widgets_values"] for n in wf["nodes"]}
    for n in state:
        if n["type"] == "Note":
            continue
        shown = [v for _, v in n["widgets"]]
        # widget values in order (the frontend may append its own 'control after generate' values)
        assert shown[: len(saved[n["id"]])] == saved[n["id"]], (n["type"], shown, saved[n["id"]])
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name[:-5]}.png"))
    # the frontend's own conversion to API format agrees with the one the tests and demo use
    prompt = page.evaluate("async () => (await window.app.graphToPrompt()).output")
    ours = workflows.to_api(wf, server.get("/object_info"))
    assert json.loads(json.dumps(prompt)) == {k: {"class_type": v["class_type"], "inputs": v["inputs"]}
                                              for k, v in ours.items()} or _same_prompt(prompt, ours)


def _same_prompt(frontend: dict, ours: dict) -> bool:
    assert set(frontend) == set(ours)
    for k in ours:
        assert frontend[k]["class_type"] == ours[k]["class_type"]
        assert frontend[k]["inputs"] == ours[k]["inputs"], (k, frontend[k]["inputs"], ours[k]["inputs"])
    return True


def queue_from_ui(page, server, wf: dict, set_widgets: dict[tuple[int, str], object]) -> dict:
    load(page, wf)
    page.evaluate("""(sets) => { for (const [id, name, value] of sets) {
        const n = window.app.graph.getNodeById(id); const w = n.widgets.find(w => w.name === name);
        w.value = value; } }""", [[i, n, v] for (i, n), v in set_widgets.items()])
    before = set(server.get("/history"))
    page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
    deadline = time.time() + 600
    while time.time() < deadline:
        new = [pid for pid in server.get("/history") if pid not in before]
        if new:
            entry = server.wait(new[0])
            assert execution_error(entry) is None, execution_error(entry)
            return entry
        time.sleep(0.5)
    raise TimeoutError("the queued workflow never reached the history")


def test_queue_fine_tune_workflow_from_the_ui(server, page):
    make_dataset(server.base / "input" / "ui_photos", names=["astronaut", "chelsea"])
    page.evaluate("async () => { await window.app.refreshComboInNodes(); }")
    wf = workflows.load("selfperc_fine_tune_compare.json")
    entry = queue_from_ui(page, server, wf, {
        (1, "ckpt_name"): "tiny_sd15.safetensors", (2, "dataset_folder"): "ui_photos", (2, "steps"): 2,
        (2, "resolution"): 64, (2, "lora_name"): "selfperc/ui_lora", (3, "width"): 64, (3, "height"): 64,
        (3, "batch_size"): 1, (4, "steps"): 2})
    assert entry["outputs"]["5"]["images"]
    assert (server.base / "models" / "loras" / "selfperc" / "ui_lora.safetensors").is_file()
    page.screenshot(path=str(ARTIFACTS / "fine_tune_after_run.png"))


def test_queue_distance_workflow_from_the_ui(server, page):
    a = Image.fromarray(photo("rocket")).resize((64, 96))
    a.save(server.base / "input" / "ui_a.png")
    b = a.copy()
    b.paste((0, 0, 255), (8, 8, 40, 40))
    b.save(server.base / "input" / "ui_b.png")
    page.evaluate("async () => { await window.app.refreshComboInNodes(); }")
    wf = workflows.load("selfperc_perceptual_distance.json")
    entry = queue_from_ui(page, server, wf, {(1, "ckpt_name"): "tiny_sd15.safetensors", (2, "image"): "ui_a.png",
                                             (3, "image"): "ui_b.png"})
    assert entry["outputs"]["5"]["images"]
    page.screenshot(path=str(ARTIFACTS / "distance_after_run.png"))


def test_a_workflow_saved_before_the_option_nodes_keeps_its_values_and_says_what_moved(server, page):
    """The fine-tune workflow as version 0.2.0 saved it (all 44 settings as one list of widget values, which ComfyUI
    would assign by position): the pack's frontend extension puts the node's own settings back by name and lists
    the moved settings that differ from their defaults, with the option node that holds each now."""
    old = json.loads((REPO_ROOT / "tests" / "browser" / "old_fine_tune_compare_v0.2.0.json").read_text())
    tune = next(n for n in old["nodes"] if n["type"] == "SelfPerceptualFineTune")
    assert len(tune["widgets_values"]) == 44
    values = tune["widgets_values"]
    values[1], values[2], values[6], values[19] = 321, 3e-5, 768, "selfperc/old_run"  # steps, lr, resolution, name
    values[16], values[27] = 1.0, "sgd"  # mse_weight, optimizer: moved, and not at their defaults
    page.evaluate("() => { window.selfpercMigrations = []; }")
    load(page, old)
    state = {n["type"]: dict(n["widgets"]) for n in graph_state(page)}["SelfPerceptualFineTune"]
    assert (state["steps"], state["learning_rate"], state["resolution"], state["lora_name"]) == (
        321, 3e-5, 768, "selfperc/old_run")
    assert state["dataset_folder"] == "my_dataset" and state["seed"] == 0 and state["rank"] == 8
    migrations = page.evaluate("() => window.selfpercMigrations")
    assert len(migrations) == 1, migrations
    assert migrations[0]["changed"] == ["Self-Perceptual Objective: mse_weight = 1",
                                        "Self-Perceptual Training Options: optimizer = \"sgd\""], migrations
    page.screenshot(path=str(ARTIFACTS / "old_workflow_migrated.png"))
