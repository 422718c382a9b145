"""A sweep compared in the real MLflow UI, in a real browser (Debian's Chromium via Playwright).

A user runs a dp_keep_prob sweep, opens the URL the sweep printed, and must see its children by
name, the model-training view with the children's valid_ppl curves, the parent with its children
nested, and the compare page with dropout.dp_keep_prob as the param that differs. Skips where
Chromium or Playwright is missing, except when LMEXP_REQUIRE_BROWSER=1 (CI sets it): there a
missing browser is a failure. Screenshots go to $LMEXP_SCREENSHOTS (default: the test's folder).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO, TINY, mlflow_runs, run_module
from services import free_port

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
KEEP = ("0.5", "0.7", "0.9")
BROWSER_ARGS = [
    "--no-sandbox",  # root in a container
    "--disable-gpu",
    "--disable-background-networking",  # no network here: don't try Google's services
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _require_browser() -> None:
    missing = []
    if CHROMIUM is None:
        missing.append("Debian's chromium (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("playwright (pip install playwright)")
    if missing:
        reason = f"needs {' and '.join(missing)}"
        if os.environ.get("LMEXP_REQUIRE_BROWSER") == "1":
            pytest.fail(f"LMEXP_REQUIRE_BROWSER=1 but the browser test {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> dict:
    """A real 3-job dp_keep_prob sweep into a sqlite store, told where its UI will be
    (logger.ui_url: `mlflow ui` on a free port), and the UI URL its log printed."""
    _require_browser()
    cwd = tmp_path_factory.mktemp("ui")
    port = free_port()
    proc = run_module(
        "lmexp.train", "-m", *TINY, "trainer.max_epochs=3",
        f"dropout.dp_keep_prob={','.join(KEEP)}", f"logger.ui_url=http://127.0.0.1:{port}/",
        cwd=cwd,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    url = re.search(r"Compare its runs in the MLflow UI: (\S+)", proc.stdout + proc.stderr)
    assert url, (proc.stdout + proc.stderr)[-3000:]
    runs = mlflow_runs(cwd / "mlflow.db")
    (parent,) = [r for r in runs if r.data.tags.get("lmexp.kind") == "sweep"]
    children = [r for r in runs if r is not parent]
    log = proc.stdout + proc.stderr
    return {"cwd": cwd, "url": url.group(1), "parent": parent, "children": children, "port": port,
            "log": log}  # fmt: skip


@pytest.fixture(scope="module")
def ui(sweep) -> str:
    """`mlflow ui` over the sweep's store on a free loopback port; stopped after the tests."""
    port = sweep["port"]
    log = open(sweep["cwd"] / "mlflow-ui.log", "w")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri",
         f"sqlite:///{sweep['cwd'] / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(port)],
        cwd=sweep["cwd"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(base + "/health", timeout=2):
                    break
            except OSError:
                assert server.poll() is None, (sweep["cwd"] / "mlflow-ui.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "mlflow ui did not start within 120 s"
                time.sleep(0.5)
        yield base
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


@pytest.fixture(scope="module")
def browser(ui):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    """A fresh browser profile per test: the UI keeps view state in localStorage."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.set_default_timeout(60_000)  # the UI's first load compiles a large bundle
    yield page
    context.close()


def _shot(page, name: str, tmp: Path) -> None:
    folder = Path(os.environ.get("LMEXP_SCREENSHOTS", tmp))
    folder.mkdir(parents=True, exist_ok=True)
    assistant = page.locator('button[data-component-id="mlflow.assistant.chat_panel.close"]')
    if assistant.count():  # the MLflow Assistant side panel opens itself; it hides the runs
        assistant.first.click()
    page.wait_for_timeout(500)
    page.screenshot(path=str(folder / name))


def test_the_printed_url_opens_the_sweeps_children_by_name_with_their_curves(
    sweep, ui, page, tmp_path
):
    assert sweep["url"].startswith(f"{ui}/#/experiments/")  # logger.ui_url's, as printed
    assert "workflowType=machine_learning" in sweep["url"]
    page.goto(sweep["url"])
    for keep in KEEP:  # each child named by its swept value, not a random name
        page.get_by_text(f"dp_keep_prob={keep}", exact=True).first.wait_for()
    assert page.get_by_text("Traces", exact=True).count() <= 1  # the runs page, not GenAI's
    assert "3 matching runs" in page.inner_text("body")  # the sweep's children only
    # Chart mode: a valid_ppl chart with one series per child, named by its value.
    page.get_by_placeholder("Search metric charts").fill("valid_ppl")
    page.get_by_text("dp_keep_prob=0.5 (valid_ppl)").first.wait_for()
    body = page.inner_text("body")
    for keep in KEEP:
        assert f"dp_keep_prob={keep} (valid_ppl)" in body, body[-3000:]
    _shot(page, "ui_sweep_charts.png", tmp_path)


def test_a_runs_printed_url_opens_it_in_the_model_training_view(sweep, ui, page, tmp_path):
    # what each run prints as it starts, sweep child or single run alike
    printed = re.findall(
        r"In the MLflow UI(?: \(start it with: [^)]*\))?: (\S+/runs/[0-9a-f]{32}\S*)", sweep["log"]
    )
    assert len(printed) == len(KEEP), sweep["log"][-3000:]
    page.goto(printed[0])
    page.get_by_text("Model metrics", exact=True).first.wait_for()  # the run's own page
    page.get_by_text("Model registry", exact=True).first.wait_for()  # training's sidebar
    assert page.get_by_text("Judges", exact=True).count() == 0  # not the GenAI sidebar
    _shot(page, "ui_run_page.png", tmp_path)


def test_the_experiment_shows_the_parent_with_its_children_nested(sweep, ui, page, tmp_path):
    experiment = sweep["parent"].info.experiment_id
    page.goto(f"{ui}/#/experiments/{experiment}/runs?workflowType=machine_learning")
    name = sweep["parent"].info.run_name
    assert name.startswith("sweep dp_keep_prob (")
    cell = page.locator('[role=gridcell][col-id="attributes.`Run Name`"]', has_text=name)
    cell.first.wait_for()
    assert page.get_by_text("dp_keep_prob=0.7", exact=True).count() == 0  # collapsed
    cell.first.locator("button").first.click()  # expand the parent
    for keep in KEEP:
        page.get_by_text(f"dp_keep_prob={keep}", exact=True).first.wait_for()
    _shot(page, "ui_parent_nested.png", tmp_path)


def test_the_compare_page_shows_dp_keep_prob_as_the_differing_param(sweep, ui, page, tmp_path):
    children = sorted(sweep["children"], key=lambda r: r.data.params["dropout.dp_keep_prob"])
    ids = json.dumps([r.info.run_id for r in children])
    experiments = json.dumps([children[0].info.experiment_id])
    query = f"runs={urllib.parse.quote(ids)}&experiments={urllib.parse.quote(experiments)}"
    page.goto(f"{ui}/#/compare-runs?{query}")
    page.get_by_text("Comparing 3 Runs", exact=False).first.wait_for()
    page.get_by_text("Show diff only").first.click()
    params = page.locator("table", has_text="dropout.dp_keep_prob").first
    params.wait_for()
    text = params.inner_text()
    assert "dropout.dp_keep_prob" in text and "model.hidden_size" not in text, text[:2000]
    row = page.locator("tr", has_text="dropout.dp_keep_prob").first.inner_text()
    assert re.findall(r"0\.\d", row) == list(KEEP), row
    _shot(page, "ui_compare.png", tmp_path)


def test_the_docs_sites_code_blocks_show_every_character_without_scrolling(page, tmp_path):
    """The site's code blocks wrap long commands (the index's install line, the recipes' long
    commands) instead of cutting them at the page's edge behind a scrollbar."""
    site = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "-q", "-d", str(site)],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    page.set_viewport_size({"width": 1000, "height": 800})
    for name in ("index.html", "recipes/index.html", "getting-started/index.html"):
        page.goto((site / name).as_uri())
        blocks = page.locator("pre > code")
        assert blocks.count() > 0, name
        cut = page.evaluate(
            "() => [...document.querySelectorAll('pre > code')]"
            ".filter(c => c.scrollWidth > c.clientWidth + 1).map(c => c.innerText.slice(0, 80))"
        )
        assert cut == [], (name, cut)
    _shot(page, "docs_index_code.png", tmp_path)
