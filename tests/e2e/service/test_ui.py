"""The web dashboard (/ui) in a real headless Chromium, driven by Playwright.

The browser is the distribution's ``chromium`` package (scripts/test.sh installs it), started through
its path: Playwright never downloads one. One service for the module (SQLite, bearer tokens, a Serve
port of its own) and tiny digits jobs. In order: log in with the token and watch the jobs table; follow
a running job on its page until the charts hold its final epoch; submit through the form (a bad field
first, then a job named with markup, which must show as text) and cancel that job; deploy the followed
job and predict an uploaded PNG on the models page. Each page's screenshot is taken (a blank page
would not pass for one); it replaces the published one in docs/ only with DG2PF_UPDATE_SCREENSHOTS=1,
so running the suite leaves the repository as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import tomllib
from pathlib import Path

import httpx
import pytest
from service_process import ServiceProcess

from dg2pf_core.data.digits import write_test_digit_images
from dg2pf_service.cluster import free_port
from dg2pf_service.ui.paths import is_shell

REPO = Path(__file__).resolve().parents[3]
UI = REPO / "service" / "dg2pf_service" / "ui"
# The published screenshots are replaced only when asked; otherwise they go to a scratch folder.
DOCS = REPO / "docs" if os.environ.get("DG2PF_UPDATE_SCREENSHOTS") == "1" else None
TOKEN = "ui-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
XSS = "<img src=x onerror=alert(1)>"
# 2 pruning epochs, then distillation and fine-tuning: every phase the charts mark, in about a minute.
FAST = {"pruning_epochs": 2, "max_epochs": 4, "patience": 2}
S = 1000  # Playwright's timeouts are in milliseconds


# --- without a browser --------------------------------------------------------------------------


def test_only_the_page_shells_are_public():
    assert all(is_shell(p) for p in ("/ui", "/ui/models", "/ui/jobs/" + "a" * 32, "/ui/static/dashboard.js"))
    assert not any(
        is_shell(p) for p in ("/uix", "/jobs", "/models", "/ui/api", "/ui/api/models/x/predict", "/openapi.json")
    )


def test_dashboard_files_ship_as_package_data():
    """Every template and static file (the vendored uPlot and its licence included) is matched by
    pyproject's package-data, so a wheel installed elsewhere serves the same dashboard."""
    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["dg2pf_service"]
    shipped = {p for g in globs for p in UI.parent.glob(g) if p.is_file()}
    files = {p for d in ("templates", "static") for p in (UI / d).rglob("*") if p.is_file()}
    assert files and files <= shipped, sorted(str(p.relative_to(UI)) for p in files - shipped)


def test_vendored_uplot_is_the_published_release_named_in_its_readme():
    folder = UI / "static" / "vendor" / "uplot"
    readme = (folder / "README.md").read_text()
    assert "| version | 1.6.32 (pinned) |" in readme
    for name in ("uPlot.iife.min.js", "uPlot.min.css", "LICENSE"):
        digest = hashlib.sha256((folder / name).read_bytes()).hexdigest()
        assert re.search(rf"\| `{re.escape(name)}` \| .* \| `{digest}` \|", readme), (
            f"{name}: sha256 {digest} is not in README.md"
        )
    assert (folder / "uPlot.iife.min.js").read_text().startswith("/*! https://github.com/leeoniya/uPlot (v1.6.32) */")
    assert "MIT License" in (folder / "LICENSE").read_text()


# --- a service and a browser --------------------------------------------------------------------


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui")
    svc = ServiceProcess(
        root / "state", DG2PF_API_TOKENS=TOKEN, DG2PF_SERVE_PORT=str(free_port()), DG2PF_SERVE_POLL_SECONDS="0.5"
    )
    try:
        svc.start(
            timeout=420
        )  # a 2-core machine shared with other work: importing torch and Ray alone can take minutes
        yield svc
    finally:  # a start that timed out may have left its Ray head behind
        svc.stop()


@pytest.fixture(scope="module")
def api(service):
    with httpx.Client(base_url=service.url, headers=AUTH, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def ckpt(api, digits_example) -> str:
    data = (digits_example / "model.safetensors").read_bytes()
    r = api.post("/checkpoints", files={"file": ("model.safetensors", data, "application/octet-stream")})
    assert r.status_code in (200, 201), r.text
    return r.json()["id"]


def spec(checkpoint: str, **over) -> dict:
    doc = {
        "model": {"arch": "digits_cnn", "num_classes": 10, "checkpoint": checkpoint},
        "dataset": {"spec": "digits"},
        "sparsity": 0.9,
        "schedule": dict(FAST),
    }
    return doc | over


@pytest.fixture(scope="module")
def followed(api, ckpt) -> str:
    """The job the dashboard follows from queued to succeeded, then deploys."""
    r = api.post("/jobs", json=spec(ckpt, name="digits at 90%"))
    assert r.status_code == 202, r.text
    return r.json()["id"]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail(
            "no chromium on PATH: scripts/test.sh installs the distribution's package (apt-get install chromium)"
        )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True)
        yield browser
        browser.close()


class Tab:
    """A fresh browser context and page, recording what must never happen: a dialog other than our
    confirm(), an uncaught script error, a request the Content-Security-Policy blocked."""

    def __init__(self, browser, service, scratch: Path) -> None:
        self.scratch = scratch
        self.context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
        self.page = self.context.new_page()
        self.page.set_default_timeout(30 * S)
        self.url = service.url
        self.alerts: list[str] = []
        self.errors: list[str] = []
        self.page.on("dialog", self._dialog)
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.on(
            "console", lambda msg: self.errors.append(msg.text) if "Content Security Policy" in msg.text else None
        )

    def _dialog(self, dialog) -> None:
        if dialog.type != "confirm":
            self.alerts.append(f"{dialog.type}: {dialog.message}")
        dialog.accept()

    def open(self, path: str) -> None:
        self.page.goto(f"{self.url}{path}")

    def login(self, token: str = TOKEN) -> None:
        self.page.locator("#login-token").fill(token)
        with self.page.expect_navigation():
            self.page.locator("#login-form button[type=submit]").click()

    def screenshot(self, name: str, whole: bool = True) -> None:
        """NAME (in docs/ with DG2PF_UPDATE_SCREENSHOTS=1, else a scratch folder): the page down to the
        end of its content (whole), or what the window shows; a PNG of real size either way."""
        folder = DOCS or self.scratch
        folder.mkdir(parents=True, exist_ok=True)
        if not whole:
            self.page.screenshot(path=str(folder / name))
        else:
            bottom = self.page.evaluate(
                "() => Math.ceil(document.querySelector('main').getBoundingClientRect().bottom + scrollY)"
            )
            self.page.screenshot(
                path=str(folder / name), full_page=True, clip={"x": 0, "y": 0, "width": 1280, "height": bottom + 8}
            )
        assert (folder / name).stat().st_size > 5_000, f"{name}: a blank screenshot"

    def close(self) -> None:
        self.context.close()
        assert not self.alerts, self.alerts
        assert not self.errors, self.errors


@pytest.fixture
def tab(browser, service, tmp_path):
    t = Tab(browser, service, tmp_path / "screenshots")
    yield t
    t.close()


@pytest.fixture
def logged_in(tab):
    tab.open("/ui")
    tab.login()
    return tab


def job_state(page) -> str:
    return page.locator("#job-state").inner_text()


# --- the pages ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_login_with_the_token_then_the_jobs_table_refreshes_and_filters(service, followed, tab):
    from playwright.sync_api import expect

    shell = httpx.get(f"{service.url}/ui")  # the page holds no data: no token needed, strict CSP
    assert shell.status_code == 200 and "script-src 'self'" in shell.headers["content-security-policy"]
    assert httpx.get(f"{service.url}/jobs").status_code == 401
    assert httpx.post(f"{service.url}/ui/api/models/{followed}/predict", content=b"x").status_code == 401

    page = tab.page
    tab.open("/ui")
    expect(page.locator("#login")).to_be_visible()
    expect(page.locator("#content")).to_be_hidden()
    tab.login("not-the-token")
    expect(page.locator("#login-message")).to_contain_text("refused")
    tab.login()
    expect(page.locator("#login")).to_be_hidden()
    row = page.locator(f'#jobs tr[data-job-id="{followed}"]')
    expect(row.locator(".name")).to_have_text("digits at 90%")
    # Refreshed in place: the row goes from queued to running without a reload.
    expect(row).to_have_attribute("data-state", "running", timeout=180 * S)
    expect(row.locator(".progress progress")).to_be_attached()

    page.locator("#state-filter").select_option("failed")
    expect(page.locator("#jobs-empty")).to_have_text("No jobs here yet.")
    assert "state=failed" in page.url
    page.locator("#state-filter").select_option("running")
    expect(row).to_be_visible()
    page.locator("#logout").click()
    expect(page.locator("#login")).to_be_visible()


@pytest.mark.slow
def test_job_page_follows_the_running_job_until_its_charts_hold_the_final_epoch(api, followed, logged_in):
    from playwright.sync_api import expect

    tab, page = logged_in, logged_in.page
    tab.open(f"/ui/jobs/{followed}")
    expect(page.locator("#job-name")).to_have_text("digits at 90%")
    # Live: points appear while the job still runs (polled every 1.5 s, no reload).
    page.wait_for_function(
        "() => document.querySelector('#job-state').textContent === 'running'"
        " && +document.querySelector('#chart-top1').dataset.points > 0",
        timeout=180 * S,
    )
    expect(page.locator("#cancel")).to_be_enabled()
    page.wait_for_selector("body[data-finished=true]", state="attached", timeout=300 * S)

    job = api.get(f"/jobs/{followed}").json()
    assert job["state"] == "succeeded", job["error"]
    assert job_state(page) == "succeeded"
    records = {r["epoch"]: r for r in job["history"]}
    final = max(records)
    for chart, key in (("top1", "val_top1"), ("sparsity", "sparsity"), ("loss", "train_loss")):
        figure = page.locator(f"#chart-{chart}")
        with_value = [e for e, r in records.items() if r.get(key) is not None]
        assert figure.get_attribute("data-last-epoch") == str(max(with_value)), chart
        assert figure.get_attribute("data-points") == str(len(with_value)), chart
        expect(figure.locator("canvas")).to_be_visible()
    assert page.locator("#chart-top1").get_attribute("data-last-epoch") == str(final)
    pruning = [r for r in records.values() if r["phase"] == "gradual_pruning" and r.get("recovered") is not None]
    assert len(pruning) == FAST["pruning_epochs"]
    assert page.locator("#chart-recovered").get_attribute("data-points") == str(len(pruning))
    phases = page.locator("#phase-legend li[data-phase]").evaluate_all("els => els.map(e => e.dataset.phase)")
    assert phases == list(dict.fromkeys(r["phase"] for _, r in sorted(records.items())))
    assert phases[:2] == ["baseline", "gradual_pruning"]

    metrics = api.get(f"/jobs/{followed}/artifacts/metrics.json").json()
    expect(page.locator("#layers tbody tr")).to_have_count(len(metrics["layer_sparsity"]))
    first_layer = next(iter(metrics["layer_sparsity"]))
    expect(page.locator("#layers tbody tr").first).to_have_attribute("data-layer", first_layer)
    expect(page.locator("#spec")).to_contain_text('"arch": "digits_cnn"')
    expect(page.locator("#cancel")).to_be_disabled()
    expect(page.locator("#deploy")).to_be_enabled()
    with page.expect_download() as download:
        page.locator('#artifacts tr[data-artifact="metrics.json"] button').click()
    assert download.value.suggested_filename == "metrics.json"
    assert Path(download.value.path()).read_bytes() == api.get(f"/jobs/{followed}/artifacts/metrics.json").content
    tab.screenshot("ui-job.png")


# Every text a placeholder (.placeholder) shows, in order, from the page's first parse: what a user saw
# while the data was on its way.
RECORD_PLACEHOLDERS = """
window.__placeholders = {};
new MutationObserver(() => {
  for (const el of document.querySelectorAll(".placeholder")) {
    const seen = (window.__placeholders[el.id] ||= []);
    const text = el.hidden ? "" : el.textContent;
    if (text && seen[seen.length - 1] !== text) seen.push(text);
  }
}).observe(document, { subtree: true, childList: true, characterData: true, attributes: true });
"""


def hold(page, pattern: re.Pattern) -> list:
    """Intercept the requests matching ``pattern`` and keep them waiting: the list of held routes."""
    held: list = []
    page.route(pattern, lambda route: held.append(route))
    return held


def release(page, pattern: re.Pattern, held: list) -> None:
    deadline = time.monotonic() + 30
    while not held and time.monotonic() < deadline:  # the page's script asks once it has run
        page.wait_for_timeout(100)
    assert held, f"the page never asked for {pattern.pattern}"
    for route in held:
        route.continue_()
    page.unroute(pattern)


def ratios(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"\(([0-9.]+)×\)", text)]


def counts(text: str) -> list[int]:
    """ "1,234 / 5,678 (0.217×)" -> [1234, 5678], whatever the browser's digit grouping."""
    return [int(re.sub(r"\D", "", part)) for part in text.split("(")[0].split("/")]


@pytest.mark.slow
def test_pages_say_loading_until_their_data_comes_and_a_finished_job_shows_its_results(api, followed, logged_in):
    from playwright.sync_api import expect

    tab, page = logged_in, logged_in.page
    deadline = time.monotonic() + 480
    while (job := api.get(f"/jobs/{followed}").json())["state"] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"the job is still {job['state']}"
        time.sleep(2)
    assert job["state"] == "succeeded", job["error"]
    metrics = api.get(f"/jobs/{followed}/artifacts/metrics.json").json()
    page.add_init_script(RECORD_PLACEHOLDERS)

    # The job page while GET /jobs/{id} is on its way: it says so, not "No epoch recorded yet.".
    status = re.compile(rf"://[^/]+/jobs/{followed}$")
    held = hold(page, status)
    tab.open(f"/ui/jobs/{followed}")
    for placeholder in ("#charts-empty", "#artifacts-empty", "#results-empty"):
        expect(page.locator(placeholder)).to_have_text("Loading…")
    expect(page.locator("#spec")).to_have_text("Loading…")
    release(page, status, held)
    page.wait_for_selector("body[data-finished=true]", state="attached", timeout=60 * S)
    for placeholder in ("#charts-empty", "#artifacts-empty", "#results-empty"):
        expect(page.locator(placeholder)).to_be_hidden()
    seen = page.evaluate("() => window.__placeholders")
    assert seen["charts-empty"] == ["Loading…"] and seen["artifacts-empty"] == ["Loading…"], seen

    # Its results, as `dg2pf status` prints them: the MACs and parameter ratios, the measured speed-ups.
    macs = page.locator('#results dd[data-metric="macs"]')
    expect(macs).to_contain_text("×)")
    assert counts(macs.inner_text()) == [metrics["flops_sparse"], metrics["flops_dense"]]
    assert ratios(macs.inner_text()) == pytest.approx([metrics["flops_sparse"] / metrics["flops_dense"]], abs=1.1e-3)
    params = page.locator('#results dd[data-metric="params"]')
    expect(params).to_contain_text("×)")
    assert counts(params.inner_text()) == [metrics["params_nonzero"], metrics["params_total"]]
    assert ratios(params.inner_text()) == pytest.approx(
        [metrics["params_nonzero"] / metrics["params_total"]], abs=1.1e-3
    )
    speed = job["best_metrics"]["latency"]["speedup"]  # what the status summarises, from metrics.json's medians
    measured = {b: {n: x for n, x in by.items() if x is not None} for b, by in speed.items()}
    measured = {b: by for b, by in measured.items() if by}
    assert measured, f"the digits job measured no latency: {metrics['latency']}"
    expect(page.locator('#results dd[data-metric="speedup"]')).to_have_count(len(measured))
    for backend, by_batch in measured.items():
        text = page.locator(f'#results dd[data-metric="speedup"][data-backend="{backend}"]').inner_text()
        shown = {n: float(x) for n, x in re.findall(r"batch (\d+): [0-9.]+ → [0-9.]+ ms \(([0-9.]+)×\)", text)}
        assert shown == pytest.approx(by_batch, abs=6e-3), (backend, text)
    expect(page.locator("#results-note")).to_contain_text(f"{metrics['latency']['threads']} thread")

    # A first answer that fails says so, in place of the data, and the page recovers once the API answers.
    refusal = {"error": {"type": "server_busy", "field": None, "message": "the service is busy for this test"}}
    page.route(
        status, lambda route: route.fulfill(status=503, content_type="application/json", body=json.dumps(refusal))
    )
    tab.open(f"/ui/jobs/{followed}")
    expect(page.locator("#charts-empty")).to_have_text("Not loaded: the service is busy for this test")
    expect(page.locator("#results-empty")).to_have_text("Not loaded: the service is busy for this test")
    expect(page.locator("#job-error")).to_have_text("the service is busy for this test")
    page.unroute(status)
    page.wait_for_selector("body[data-finished=true]", state="attached", timeout=60 * S)
    expect(page.locator("#charts-empty")).to_be_hidden()
    expect(page.locator("#job-error")).to_be_hidden()
    assert "No epoch recorded yet." not in page.evaluate("() => window.__placeholders")["charts-empty"]

    # The jobs table and the models page: "Loading…" until their list comes, never "none" before it.
    listing = re.compile(r"://[^/]+/jobs\?")
    held = hold(page, listing)
    tab.open("/ui")
    expect(page.locator("#jobs-empty")).to_have_text("Loading…")
    release(page, listing, held)
    expect(page.locator(f'#jobs tr[data-job-id="{followed}"]')).to_be_visible()
    expect(page.locator("#jobs-empty")).to_be_hidden()
    assert page.evaluate("() => window.__placeholders")["jobs-empty"] == ["Loading…"]
    models = re.compile(r"://[^/]+/models$")
    held = hold(page, models)
    tab.open("/ui/models")
    expect(page.locator("#models-empty")).to_have_text("Loading…")
    release(page, models, held)
    page.wait_for_selector("#models[data-loaded=true]", state="attached")
    expect(page.locator("#models-empty")).not_to_have_text("Loading…")


@pytest.mark.slow
def test_submit_form_puts_the_refusal_beside_its_field_and_a_markup_name_stays_text_then_cancel(
    api, ckpt, digits_example, logged_in
):
    from playwright.sync_api import expect

    tab, page = logged_in, logged_in.page
    tab.open("/ui/submit")
    page.wait_for_selector("#job-form[data-ready=true]", state="attached")

    def field(path: str):
        return page.locator(f'.field[data-field="{path}"]')

    before = api.get("/jobs").json()["total"]
    field("name").locator("input").fill(XSS)
    field("model.arch").locator("input").fill("digits_cnn")
    field("model.num_classes").locator("input").fill("10")
    # The checkpoint through the form's own upload (POST /checkpoints): the same content, the same id.
    field("model.checkpoint").locator("input[type=file]").set_input_files(str(digits_example / "model.safetensors"))
    field("model.checkpoint").locator("button").click()
    expect(field("model.checkpoint").locator("input[type=text]")).to_have_value(ckpt)
    field("dataset.spec").locator("input").fill("digits")
    field("sparsity").locator("input").fill("1.5")
    # Long enough to be cancelled while it runs.
    field("schedule.pruning_epochs").locator("input").fill("4")
    field("schedule.max_epochs").locator("input").fill("40")
    field("schedule.patience").locator("input").fill("20")
    page.locator("#submit").click()
    error = field("sparsity").locator(".field-error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("sparsity")
    expect(error).to_contain_text("must be strictly between 0 and 1")
    assert page.locator(".field-error:visible").count() == 1 and page.locator("#submit-error").is_hidden()
    assert api.get("/jobs").json()["total"] == before  # refused: nothing created
    tab.screenshot("ui-submit.png", whole=False)  # the form scrolled to the refused field

    # The objectives are fields of the same schema: a latency budget on the default (unstructured)
    # granularity is refused beside the budget's own field.
    field("sparsity").locator("input").fill("")
    field("schedule.latency_budget_ms").locator("input").fill("5")
    page.locator("#submit").click()
    error = field("schedule.latency_budget_ms").locator(".field-error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("granularity 'channel'")
    assert api.get("/jobs").json()["total"] == before
    field("schedule.latency_budget_ms").locator("input").fill("")

    field("sparsity").locator("input").fill("0.9")
    with page.expect_navigation(url=re.compile(r"/ui/jobs/[0-9a-f]{32}$")):
        page.locator("#submit").click()
    job_id = page.url.rsplit("/", 1)[1]
    job = api.get(f"/jobs/{job_id}").json()
    assert job["name"] == XSS and job["spec"]["schedule"]["max_epochs"] == 40
    expect(page.locator("#job-name")).to_have_text(XSS)  # the characters, as text
    assert page.locator("img[src=x]").count() == 0 and page.title().startswith(XSS)

    expect(page.locator("#job-state")).to_have_text("running", timeout=180 * S)
    page.locator("#cancel").click()  # confirm() accepted by the tab
    expect(page.locator("#job-state")).to_have_text("cancelled")
    expect(page.locator("#cancel")).to_be_disabled()
    assert api.get(f"/jobs/{job_id}").json()["state"] == "cancelled"

    tab.open("/ui")
    row = page.locator(f'#jobs tr[data-job-id="{job_id}"]')
    expect(row.locator(".name")).to_have_text(XSS)
    expect(row).to_have_attribute("data-state", "cancelled")
    assert page.locator("img[src=x]").count() == 0
    tab.screenshot("ui-jobs.png")

    # "Submit a copy": the form filled with that job's spec.
    tab.open(f"/ui/submit?from={job_id}")
    page.wait_for_selector("#job-form[data-ready=true]", state="attached")
    expect(field("name").locator("input")).to_have_value(XSS)
    expect(field("schedule.max_epochs").locator("input")).to_have_value("40")
    expect(field("model.checkpoint").locator("input[type=text]")).to_have_value(ckpt)


@pytest.mark.slow
def test_deploy_the_finished_job_then_predict_an_uploaded_png(api, followed, logged_in, tmp_path):
    from playwright.sync_api import expect

    tab, page = logged_in, logged_in.page
    tab.open(f"/ui/jobs/{followed}")
    page.wait_for_selector("body[data-finished=true]", state="attached", timeout=300 * S)
    assert job_state(page) == "succeeded"
    page.locator("#deploy").click()
    expect(page.locator("#action-message")).to_contain_text("Deploying on Ray Serve")
    expect(page.locator("#deploy")).to_be_disabled()
    assert api.get(f"/models/{followed}").status_code == 200

    page.locator("#action-message a").click()
    card = page.locator(f'section.model[data-model-id="{followed}"]')
    expect(card).to_have_attribute("data-status", "ready", timeout=240 * S)
    ((png, label),) = write_test_digit_images(tmp_path, count=1)
    card.locator("input.image-input").set_input_files(png)
    card.locator(".predict-form button").click()
    rows = card.locator(".predictions tbody tr")
    expect(rows).to_have_count(5)
    shown = rows.evaluate_all("rs => rs.map(r => r.dataset.label)")
    model = api.get(f"/models/{followed}").json()
    direct = httpx.post(
        model["url"],
        params={"top_k": 5},
        headers={**AUTH, "serve_multiplexed_model_id": followed},
        files=[("image", ("digit.png", Path(png).read_bytes(), "image/png"))],
        timeout=60,
    ).json()
    assert shown == [p["label"] for p in direct["predictions"][0]]  # the page shows Serve's own answer
    assert shown[0] == str(label)
    expect(card.locator("img.preview")).to_be_visible()
    tab.screenshot("ui-models.png")


@pytest.mark.slow
def test_a_search_jobs_page_draws_every_trials_latency_and_accuracy_and_the_choice(api, followed, logged_in):
    """The front of a max_top1_drop search with precision int8 (metrics.json's objective and quantization,
    here laid over the followed job's metrics.json by the test): a point and a row per trial, each kept int8
    model beside it, the chosen model marked, the floor drawn, the int8 model's check in the results."""
    from playwright.sync_api import expect

    tab, page = logged_in, logged_in.page
    deadline = time.monotonic() + 480
    while (job := api.get(f"/jobs/{followed}").json())["state"] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"the job is still {job['state']}"
        time.sleep(2)
    metrics = api.get(f"/jobs/{followed}/artifacts/metrics.json").json()
    points = [
        {
            "trial_id": "t0",
            "status": "completed",
            "budget_ms": 0.15,
            "aim_ms": 0.16,
            "measured_ms": 0.13,
            "val_top1": 99.3,
            "within_drop": True,
            "int8_measured_ms": 0.07,
            "int8_val_top1": 99.0,
            "int8_within_drop": True,
            "chosen": True,
            "chosen_precision": "int8",
        },
        {
            "trial_id": "t1",
            "status": "completed",
            "budget_ms": 0.10,
            "aim_ms": 0.10,
            "measured_ms": 0.09,
            "val_top1": 98.9,
            "within_drop": True,
            "chosen": False,
        },
        {
            "trial_id": "t2",
            "status": "completed",
            "budget_ms": 0.07,
            "aim_ms": 0.07,
            "measured_ms": 0.06,
            "val_top1": 95.1,
            "within_drop": False,
            "int8_measured_ms": 0.03,
            "int8_val_top1": 94.5,
            "int8_within_drop": False,
            "chosen": False,
        },
        {
            "trial_id": "t3",
            "status": "failed",
            "budget_ms": 0.05,
            "aim_ms": 0.05,
            "measured_ms": None,
            "val_top1": None,
            "within_drop": None,
            "chosen": False,
            "error": "boom",
        },
    ]
    metrics["objective"] = {
        "max_top1_drop": 1.0,
        "baseline_val_top1": 99.3,
        "floor_val_top1": 98.3,
        "met": True,
        "chosen_trial": "t0",
        "chosen_precision": "int8",
        "reason": "the fastest of the 3 models (each trial's fp32 and int8) within the drop",
        "backend": "onnxruntime",
        "threads": 1,
        "batch_size": 1,
        "dense_measured_ms": 0.17,
        "budgets_ms": [0.15, 0.10, 0.07, 0.05],
        "points": points,
        "wall_seconds": 100.0,
    }
    metrics["quantization"] = {  # precision int8: the chosen trial's int8 model, kept
        "precision": "int8",
        "written": True,
        "file": "model.int8.onnx",
        "method": "minmax",
        "val_top1_fp32": 99.3,
        "val_top1_int8": 99.0,
        "test_top1_int8": 98.6,
        "max_drop": 0.5,
        "bytes_fp32": 400_000,
        "bytes_int8": 110_000,
    }
    page.route(
        re.compile(rf"/jobs/{followed}/artifacts/metrics\.json$"),
        lambda route: route.fulfill(status=200, content_type="application/json", body=json.dumps(metrics)),
    )
    tab.open(f"/ui/jobs/{followed}")
    page.wait_for_selector("body[data-finished=true]", state="attached", timeout=60 * S)
    expect(page.locator("#front-panel")).to_be_visible()
    expect(page.locator("#front tbody tr")).to_have_count(4)
    expect(page.locator('#front tr[data-chosen="yes"]')).to_have_attribute("data-trial", "t0")
    expect(page.locator('#front tr[data-chosen="yes"]')).to_contain_text("chosen (int8)")
    expect(page.locator('#front tr[data-trial="t2"]')).to_contain_text("0.030 ms, 94.50% (under)")
    expect(page.locator("#front-plot circle")).to_have_count(3)  # the failed trial has no point
    expect(page.locator("#front-plot rect.int8")).to_have_count(2)  # each kept int8 model, a square
    expect(page.locator("#front-plot .chosen")).to_have_count(1)
    expect(page.locator("#front-plot rect.chosen")).to_have_attribute("data-trial", "t0")
    expect(page.locator("#front-note")).to_contain_text("the fastest of the 3 models (each trial's fp32 and int8)")
    int8 = page.locator('#results dd[data-metric="int8"]')
    expect(int8).to_have_attribute("data-written", "yes")
    expect(int8).to_contain_text("kept (minmax calibration): val top-1 99.00% vs fp32 99.30% (drop allowed 0.5)")
    expect(int8).to_contain_text("test top-1 98.60%")
    expect(page.locator("#front-plot")).to_contain_text("floor 98.30%")
