"""The Prefect UI path, walked in a real browser: Debian's Chromium driven by Playwright
(pointed at /usr/bin/chromium; nothing downloads a browser build). One `make up` on the
default topology (SQLite, in-memory messaging), as a new user gets it, serves every test
here. Screenshots of what a person sees go to the test's output folder."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path

import pytest

from conftest import REPO, free_port
from quantflow.platform.submit import PrefectREST

pytestmark = [pytest.mark.slow, pytest.mark.integration]
CHROMIUM = os.environ.get("QUANTFLOW_CHROMIUM", "/usr/bin/chromium")


try:
    from playwright.sync_api import expect
except ImportError:  # the module skips below, saying so
    expect = None


def browser_reason() -> str | None:
    if not Path(CHROMIUM).exists():
        # `make test` installs it (requirements/debian.txt) where it has root and apt-get.
        return (f"no Chromium at {CHROMIUM}: run `make system-packages` as root, or "
                "`sudo apt-get install --no-install-recommends chromium`, or set QUANTFLOW_CHROMIUM")
    try:
        import playwright  # noqa: F401
    except ImportError:
        return ("playwright is not installed in the pipeline environment: "
                "`.venv/bin/uv pip install --python .venv/bin/python playwright==1.65.2 pyee==13.0.1`")
    return None


if browser_reason():
    pytestmark.append(pytest.mark.skip(reason=browser_reason()))


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """`make up` on the default topology, isolated (its own state folder and port)."""
    from quantflow.platform.local import down, up

    saved = dict(os.environ)
    for key in [k for k in os.environ if k.startswith(("PREFECT_SERVER_DATABASE", "PREFECT_MESSAGING",
                                                        "PREFECT_API_AUTH", "PREFECT_SERVER_API_AUTH"))]:
        del os.environ[key]
    os.environ.update({"QUANTFLOW_STATE_DIR": str(tmp_path_factory.mktemp("ui-state")),
                       "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false"})
    try:
        record = up(port=free_port())
        assert record["topology"]["database_url"].startswith("sqlite"), record["topology"]
        yield {"api_url": record["api_url"], "ui_url": record["api_url"].removesuffix("/api")}
    finally:
        down()
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="module")
def browser(ui):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, ui, shots, request):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(30_000)
    yield page
    # What the page showed at the end, failed or not: the first thing to look at when a
    # locator timed out.
    page.screenshot(path=shots / f"last-{request.node.name}.png", full_page=True)
    context.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    """Where the screenshots go: the test's output folder, or QUANTFLOW_SCREENSHOTS (used to
    refresh the pictures in docs/)."""
    folder = Path(os.environ.get("QUANTFLOW_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def prop(scope, label: str):
    """The schema-form property whose own label is `label` (not a nested one's)."""
    return scope.locator(
        "xpath=.//div[contains(concat(' ', normalize-space(@class), ' '), ' schema-form-property ')]"
        "[./div[contains(@class, 'p-label__header')]//span[contains(@class, 'schema-form-property__label')"
        f" and (normalize-space(.)='{label}' or normalize-space(.)='{label} (Optional)')]]").first


def choose(page, field, option: str) -> None:
    """Pick `option` in a schema-form select, as a person does with the keyboard."""
    control = field.locator("button.p-select-button__control")
    control.scroll_into_view_if_needed()
    control.focus()
    control.press("ArrowDown")  # opens the list with its search box focused
    page.locator("input[type=search]:focus").wait_for()
    page.keyboard.type(option)
    page.get_by_role("option", name=option, exact=True).wait_for()
    # The list filters on input events: the highlight moves to the match only after it.
    page.wait_for_timeout(500)
    page.keyboard.press("ArrowDown")
    page.keyboard.press("Enter")
    expect(field.locator(".p-select-button__value")).to_have_text(option)


def set_text(field, value: str) -> None:
    box = field.locator("textarea, input").first
    box.scroll_into_view_if_needed()
    box.fill(value)


def switch_off(field) -> None:
    toggle = field.get_by_role("switch")
    toggle.scroll_into_view_if_needed()
    if toggle.get_attribute("aria-checked") == "true":
        toggle.click()
    expect(toggle).to_have_attribute("aria-checked", "false")


def open_custom_run(page, ui, deployment: str):
    page.goto(f"{ui['ui_url']}/deployments")
    page.get_by_role("link", name=deployment, exact=True).first.click()
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Custom run").click()
    config = prop(page, "config")
    config.wait_for()
    return config


def submit(page, run_name: str) -> str:
    """Name the run, submit the custom-run form, and open the new run from the deployment's
    Runs list (where the UI goes after a submit); returns the flow run's id."""
    page.locator(".flow-run-name-input input").fill(run_name)
    button = page.get_by_role("button", name="Submit", exact=True)
    button.scroll_into_view_if_needed()
    button.click()
    page.wait_for_url(re.compile(r"/deployments/deployment/[0-9a-f-]{36}\?tab=Runs"), timeout=60_000)
    link = page.get_by_role("link", name=run_name, exact=True).first
    for _ in range(3):  # the list can be drawn before the new run is in it: reload, as a person would
        try:
            link.wait_for(timeout=20_000)
            break
        except Exception:  # noqa: BLE001 - playwright's TimeoutError; the last try raises below
            page.reload()
    link.click()
    page.wait_for_url(re.compile(r"/runs/flow-run/[0-9a-f-]{36}"))
    return re.search(r"/runs/flow-run/([0-9a-f-]{36})", page.url).group(1)


def wait_in_ui(page, state: str, timeout_s: float = 900, on_poll=None) -> None:
    """Wait on the run page, as a person does, until its state badge says `state`."""
    badge = page.locator(".state-badge").first
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if on_poll:
            on_poll()
        text = badge.inner_text().strip() if badge.count() else ""
        if text == state:
            return
        if text in {"Failed", "Crashed", "Cancelled", "Completed", "ApprovalRejected"} - {state}:
            raise AssertionError(f"the run page shows {text!r}, waiting for {state!r}: {page.url}")
        time.sleep(2)
    raise AssertionError(f"the run page never showed {state!r} in {timeout_s:.0f} s: {page.url}")


def test_custom_run_form_runs_the_pipeline_with_the_forms_values(page, ui, shots, tmp_path):
    """A person opens quantize-pipeline's custom-run form, picks FP8 and turns deploy off,
    submits, waits in the UI for Completed, and finds the checks table, the progress of each
    stage and the stage task runs in the run page."""
    out = tmp_path / "fp8-from-the-form"
    config = open_custom_run(page, ui, "quantize-pipeline")
    set_text(prop(config, "Output Dir"), str(out))
    choose(page, prop(prop(config, "Quant"), "Method"), "fp8")
    switch_off(prop(prop(config, "Deploy"), "Enabled"))
    # The picture in docs/platform.md: the Quant section from its Method field down.
    prop(prop(config, "Quant"), "Method").evaluate("e => e.scrollIntoView({block: 'start'})")
    page.screenshot(path=shots / "custom-run-form.png")
    run_id = submit(page, f"ui-fp8-{uuid.uuid4().hex[:6]}")

    # Watched from the run's Artifacts tab: each stage's progress card moves.
    tab(page, "Artifacts").click()
    seen: set[str] = set()
    wait_in_ui(page, "Completed", on_poll=lambda: seen.update(
        page.locator(".artifact-card__description").all_inner_texts()))
    page.screenshot(path=shots / "completed-run.png")
    # What was submitted is what ran: the parameters read back through the API.
    api = PrefectREST(ui["api_url"], "")
    params = api.flow_run(run_id)["parameters"]["config"]
    assert params["quant"]["method"] == "fp8" and params["deploy"]["enabled"] is False
    assert params["output_dir"] == str(out)
    assert (out / "validation_report.json").exists() and not (out / "deployment.json").exists()

    check_run_page(page, "demo", shots)
    # The pictures a person checks: the form, the completed run and the artifact, as PNGs.
    for picture in ("custom-run-form", "completed-run", "checks-table"):
        data = (shots / f"{picture}.png").read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 20_000, (picture, len(data))
    assert {"checkpoint", "validate"} <= {text.split(":")[0] for text in seen}, seen
    assert_progress_moved(seen)
    check_progress_records(api, run_id, {"checkpoint", "quantize", "validate"}, moving="validate")


def test_search_form_runs_the_search_and_its_candidate_table_shows_in_the_run(page, ui, shots, tmp_path):
    """quantize-search's custom-run form: a person loosens the KL gate, turns lm-eval and
    deploy off, submits, waits for Completed, and reads the candidate table artifact, which
    says what the search report on disk says."""
    out = tmp_path / "search-from-the-form"
    config = open_custom_run(page, ui, "quantize-search")
    set_text(prop(config, "Output Dir"), str(out))
    validation = prop(config, "Validation")
    set_text(prop(prop(validation, "Consistency"), "Max mean next-token KL (nats)"), "1")
    switch_off(prop(prop(validation, "Lm Eval"), "Enabled"))
    switch_off(prop(prop(config, "Deploy"), "Enabled"))
    run_id = submit(page, f"ui-search-{uuid.uuid4().hex[:6]}")
    tab(page, "Artifacts").click()
    seen: set[str] = set()
    wait_in_ui(page, "Completed", on_poll=lambda: seen.update(
        page.locator(".artifact-card__description").all_inner_texts()))

    api = PrefectREST(ui["api_url"], "")
    params = api.flow_run(run_id)["parameters"]["config"]
    assert params["validation"]["consistency"]["max_kl"] == 1
    assert params["validation"]["lm_eval"]["enabled"] is False and params["deploy"]["enabled"] is False
    assert params["output_dir"] == str(out)
    report = json.loads((out / "search_report.json").read_text())
    assert report["chosen"] and not (out / "deployment.json").exists(), report["chosen"]
    assert_progress_moved(seen)
    check_progress_records(api, run_id, {"checkpoint", "calibration", "validate", "search"}, moving="search")

    page.reload()  # the Artifacts tab lists the artifacts it saw when it opened
    tab(page, "Artifacts").click()
    table = page.get_by_text("demo-search-search-candidates").first
    expect(table).to_be_visible()
    table.click()
    rows = page.locator("table tbody tr")
    expect(rows.first).to_be_visible()
    shown = {}
    for row in rows.all():
        cells = [c.strip() for c in row.locator("td").all_inner_texts()]
        if cells:
            shown[cells[0]] = cells[1]
    page.screenshot(path=shots / "search-candidates.png")
    assert shown == {c["name"]: c["status"] for c in report["candidates"]}, shown
    assert list(shown.values()).count("chosen") == 1 and shown[report["chosen"]] == "chosen"


def assert_progress_moved(seen: set[str]) -> None:
    """Some stage's card showed a value between its start and its end while the page was
    watched ("validate: perplexity window 40 of 79", not only "started" and "done")."""
    between = {t for t in seen if not t.endswith((": started", ": done"))}
    assert between, f"the progress cards never showed work on the way: {sorted(seen)}"


def check_progress_records(api: PrefectREST, run_id: str, stages: set[str], moving: str) -> None:
    """Every stage's progress artifact ends at 100%; the run's logs (quantflow.progress, in the
    UI's Logs tab) hold the values on the way, rising, with one between 0 and 100 for
    `moving`."""
    artifacts = api._ok(api.request("POST", "artifacts/filter", json={
        "artifacts": {"flow_run_id": {"any_": [run_id]}, "type": {"any_": ["progress"]}}}))
    final = [(a["description"].split(":")[0], a["data"]) for a in artifacts]
    assert stages <= {stage for stage, _ in final} and all(pct == 100.0 for _, pct in final), final
    logs = api._ok(api.request("POST", "logs/filter", json={
        "logs": {"flow_run_id": {"any_": [run_id]}}, "sort": "TIMESTAMP_ASC", "limit": 200}))
    values: dict[str, list[float]] = {}
    for line in logs:
        if line["name"] == "quantflow.progress":
            stage, pct = line["message"].split()[:2]
            values.setdefault(stage, []).append(float(pct.rstrip("%")))
    for stage, pcts in values.items():
        assert pcts == sorted(pcts) and pcts[0] == 0.0 and pcts[-1] == 100.0, (stage, pcts)
    assert any(0 < p < 100 for p in values[moving]), values  # e.g. perplexity windows on the way


def tab(page, name: str):
    return page.locator(".p-tabs").get_by_text(name, exact=True).first


def check_run_page(page, config_name: str, shots: Path) -> None:
    """On a finished pipeline run's page: the stage task runs, each stage's progress at
    100%, and the validation checks table artifact."""
    run_url = page.url.split("?")[0]
    tab(page, "Task Runs").click()
    for stage in ("checkpoint", "quantize", "validate"):
        expect(page.get_by_role("link", name=re.compile(rf"^{stage}-")).first).to_be_visible()
    tab(page, "Artifacts").click()
    checks = page.get_by_text(f"{config_name}-validation-checks").first
    expect(checks).to_be_visible()
    page.screenshot(path=shots / "artifacts.png")
    checks.click()
    expect(page.locator("table").first).to_contain_text("perplexity")
    page.screenshot(path=shots / "checks-table.png")
    page.goto(run_url)


def test_ten_form_submissions_in_a_row_each_create_a_run(page, ui):
    """Right after `make up`, on SQLite: every submission of the form creates its run (the
    server once answered 503, "database is locked", and the page said only "Something went
    wrong"; docs/platform.md says why and what changed). The cpu pool is paused meanwhile so
    the ten runs wait instead of running on two cores; the workers keep polling."""
    api = PrefectREST(ui["api_url"], "")
    api.request("PATCH", "work_pools/cpu", json={"is_paused": True}).raise_for_status()
    names = [f"ui-burst-{uuid.uuid4().hex[:4]}-{i}" for i in range(10)]
    refused: list[str] = []
    try:
        for name in names:
            open_custom_run(page, ui, "quantize-pipeline")
            page.locator(".flow-run-name-input input").fill(name)
            with page.expect_response(lambda r: r.url.endswith("/create_flow_run")) as answer:
                page.get_by_role("button", name="Submit", exact=True).click()
            if answer.value.status != 201:
                refused.append(f"{name}: HTTP {answer.value.status} {answer.value.text()[:200]}")
        runs = api._ok(api.request("POST", "flow_runs/filter", json={
            "flow_runs": {"name": {"like_": "ui-burst-"}}, "limit": 50}))
        created = sorted(r["name"] for r in runs if r["name"] in names)
        assert not refused and created == sorted(names), (refused, created)
    finally:
        for r in api._ok(api.request("POST", "flow_runs/filter", json={
                "flow_runs": {"name": {"like_": "ui-burst-"}}, "limit": 50})):
            api.request("DELETE", f"flow_runs/{r['id']}")
        api.request("PATCH", "work_pools/cpu", json={"is_paused": False}).raise_for_status()


def runs_named(api: PrefectREST, name: str) -> list[dict]:
    return api._ok(api.request("POST", "flow_runs/filter", json={"flow_runs": {"name": {"any_": [name]}}}))


def test_a_value_the_schema_rules_out_shows_in_the_page_and_creates_no_run(page, ui, shots):
    """bits: 5 typed into the JSON input (the form's select offers only 2, 3, 4, 8): the page
    shows the schema's error on submit, and no run is created."""
    api = PrefectREST(ui["api_url"], "")
    open_custom_run(page, ui, "quantize-pipeline")
    page.get_by_text("Parameters", exact=True).locator("xpath=..").locator("button").first.click()
    page.get_by_text("Use JSON input").click()
    editor = page.locator("textarea").first  # the JSON editor's text, the only textarea left
    text = editor.input_value()
    assert '"bits": 4' in text, text[:500]
    editor.fill(text.replace('"bits": 4', '"bits": 5'))
    name = f"ui-bits5-{uuid.uuid4().hex[:6]}"
    page.locator(".flow-run-name-input input").fill(name)
    page.get_by_role("button", name="Submit", exact=True).click()
    error = page.get_by_text("5 is not one of [2, 3, 4, 8]", exact=True)
    expect(error.first).to_be_visible()
    page.screenshot(path=shots / "schema-error.png")
    page.wait_for_timeout(3000)  # a run the page created anyway would be listed by now
    assert runs_named(api, name) == []
    assert "/run" in page.url  # still on the form


def test_a_combination_only_the_config_rules_out_fails_the_run_at_start_naming_the_field(page, ui, shots):
    """awq with 8 bits: each value is in the schema, the pair is not (QuantConfig's own
    check). The run is created, fails before any stage, and its page names quant.bits."""
    config = open_custom_run(page, ui, "quantize-pipeline")
    quant = prop(config, "Quant")
    choose(page, prop(quant, "Method"), "awq")
    choose(page, prop(quant, "Bits"), "8")
    run_id = submit(page, f"ui-awq8-{uuid.uuid4().hex[:6]}")
    wait_in_ui(page, "Failed", timeout_s=300)
    expect(page.get_by_text(re.compile(r"quant\.bits=8 is not supported for method 'awq'")).first).to_be_visible()
    page.screenshot(path=shots / "config-error.png")
    api = PrefectREST(ui["api_url"], "")
    assert "quant.bits=8" in api.flow_run(run_id)["state"]["message"]


def deployment_config(api: PrefectREST, output_dir: Path, **sections) -> dict:
    """The quantize-pipeline deployment's own parameters (the form's defaults), with FP8 and
    `sections` merged in."""
    config = api._ok(api.request("GET", "deployments/name/quantize-pipeline/quantize-pipeline"))["parameters"]["config"]
    config = {**config, "output_dir": str(output_dir), "quant": {"method": "fp8"}}
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value}
    return config


def answer_approval(page, approve: bool, reason: str, shots: Path | None = None) -> None:
    """On a suspended run's page: Resume, fill the approval form, submit it."""
    page.get_by_role("button", name="Resume", exact=True).click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_be_visible()
    toggle = dialog.get_by_role("switch").first
    if (toggle.get_attribute("aria-checked") == "true") != approve:
        toggle.click()
    dialog.locator("textarea, input[type=text]").first.fill(reason)
    if shots:
        page.screenshot(path=shots)
    dialog.get_by_role("button", name=re.compile("^(Submit|Resume)$")).click()
    expect(dialog).to_be_hidden()


def wait_for_state_type(api: PrefectREST, run_id: str, state_type: str, timeout_s: float = 600) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = api.flow_run(run_id)
        if run["state_type"] == state_type:
            return run
        assert run["state_type"] not in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}, run["state"]
        time.sleep(2)
    raise AssertionError(f"run {run_id} never reached {state_type}")


def test_approval_through_the_resume_form_deploys_and_a_rejection_deploys_nothing(page, ui, shots, tmp_path):
    """validation.require_approval: a passing run suspends; approved in the UI's resume form
    it deploys; a second run rejected through the same form ends ApprovalRejected and the
    live deployment stays the approved one."""
    from helpers import stop_deployment

    api = PrefectREST(ui["api_url"], "")
    config = deployment_config(api, tmp_path / "approval",
                               validation={"require_approval": True, "approval_timeout_s": 900},
                               monitor={"enabled": False})
    config["name"] = "ui-approval"
    try:
        first = api.create_flow_run("quantize-pipeline/quantize-pipeline", {"config": config})
        wait_for_state_type(api, first["id"], "PAUSED")
        page.goto(f"{ui['ui_url']}/runs/flow-run/{first['id']}")
        answer_approval(page, True, "numbers look right", shots / "approval-form.png")
        wait_in_ui(page, "Completed")
        deployed = json.loads((tmp_path / "approval" / "deployment.json").read_text())
        summary = json.loads((tmp_path / "approval" / "pipeline_summary.json").read_text())
        assert summary["outcome"] == "deployed" and summary["approval"] == "numbers look right", summary

        second = api.create_flow_run("quantize-pipeline/quantize-pipeline", {"config": config})
        wait_for_state_type(api, second["id"], "PAUSED")
        page.goto(f"{ui['ui_url']}/runs/flow-run/{second['id']}")
        answer_approval(page, False, "not this week")
        wait_in_ui(page, "ApprovalRejected")
        final = api.flow_run(second["id"])
        assert final["state_name"] == "ApprovalRejected" and "not this week" in final["state"]["message"]
        assert json.loads((tmp_path / "approval" / "deployment.json").read_text()) == deployed
        summary = json.loads((tmp_path / "approval" / "pipeline_summary.json").read_text())
        assert summary["outcome"] == "approval_rejected", summary
    finally:
        stop_deployment("ui-approval")
