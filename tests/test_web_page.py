"""The web page at `/` in a real browser (headless Chromium through Playwright) against a real
gateway, processor and `tiny` worker on the embedded stack: a key pasted in, a prompt
followed live to its image, a job canceled from the keyboard, and a burst refused with
when to retry. Each browser test leaves a screenshot in `tests.browser.artifacts_dir()`.

The browser tests skip, saying why, only where there is no browser to drive (no
/usr/bin/chromium or no playwright). Waits are Playwright's auto-waiting `expect` and
`wait_for_function`, with long timeouts for a loaded 2-core machine: never sleeps.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

import httpx
import pytest

from imagegen.infra.settings import Settings
from tests import browser, test_gateway
from tests.conftest import _embedded_stack as embedded_stack
from tests.gateway_process import GatewayProcess, api_key

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Locator, Page

gateway_process = test_gateway.gateway_process  # the fixture, shared


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """A stack of this module's own, under the gateway, processor and worker: on the
    session's, the worker would first render what earlier modules left in imagegen.render,
    and a page waiting for its job's first step would wait for all of that."""
    if (
        os.environ.get("IMAGEGEN_TEST_STACK") == "docker"
        or "IMAGEGEN_KAFKA_BOOTSTRAP" in os.environ
    ):
        pytest.skip("needs the embedded stack to start a private broker")
    yield from embedded_stack(tmp_path_factory.mktemp("page-stack"))


#: The longest any one wait may take: a render on a loaded machine, not a typical one.
WAIT_MS = 240_000
#: The burst of the gateway_process fixture's users (IMAGEGEN_RATE_USER_BURST).
BURST = 3


# ---- without a browser ---------------------------------------------------------------------


def test_the_page_and_its_assets_need_no_key_and_carry_a_strict_policy(
    gateway_process: GatewayProcess,
) -> None:
    with httpx.Client(base_url=gateway_process.url) as http:
        page = http.get("/")
        assets = re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text)
        answers = {path: http.get(path) for path in assets}
        unknown = http.get("/static/page.py")
        paths = http.get("/openapi.json").json()["paths"]
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "script-src 'self'" in policy
    assert "connect-src 'self'" in policy and "unsafe-inline" not in policy
    # No inline script: every <script> has a src (the policy would block any other).
    assert all("src=" in tag for tag in re.findall(r"<script[^>]*>", page.text))
    assert {"/static/app.js", "/static/app.css"} <= set(assets)
    for path, answer in answers.items():
        assert answer.status_code == 200, path
        assert answer.headers["content-security-policy"] == policy
    assert answers["/static/app.js"].headers["content-type"].startswith("text/javascript")
    assert unknown.status_code == 404  # only the listed assets are served
    assert "/" not in paths and not any(p.startswith("/static") for p in paths)


# ---- in a browser --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    why = browser.missing()
    if why is not None:
        pytest.skip(why)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(browser.CHROMIUM), args=browser.LAUNCH_ARGS
        )
        yield launched
        launched.close()


@pytest.fixture
def page(
    chromium: Browser, gateway_process: GatewayProcess, request: pytest.FixtureRequest
) -> Iterator[Page]:
    """The page in a fresh tab (its own session storage), 1000 px wide. Fails the test on a
    script error or a Content-Security-Policy violation."""
    from playwright.sync_api import expect

    expect.set_options(timeout=WAIT_MS)
    context = chromium.new_context(viewport={"width": 1000, "height": 1000})
    tab = context.new_page()
    tab.set_default_timeout(WAIT_MS)
    broken: list[str] = []
    tab.on("pageerror", lambda error: broken.append(f"script error: {error}"))
    tab.on(
        "console",
        lambda message: (
            broken.append(message.text) if "Content Security Policy" in message.text else None
        ),
    )
    tab.goto(gateway_process.url + "/")
    try:
        yield tab
    finally:
        shot = browser.artifacts_dir() / f"{request.node.name}.png"
        tab.screenshot(path=str(shot), full_page=True)
        context.close()
    assert not broken, broken


def live_key(gateway: str, settings: Settings) -> str:
    """A new user's key, once the gateway knows it (a key reaches it within a fetch wait)."""
    token = api_key(settings, test_gateway.user())
    with httpx.Client(base_url=gateway, headers={"Authorization": f"Bearer {token}"}) as http:
        assert test_gateway._eventually(lambda: http.get("/v1/images/jobs").status_code == 200)
    return token


def paste_key(page: Page, token: str) -> None:
    from playwright.sync_api import expect

    key_field(page).fill(token)
    page.get_by_role("button", name="Use key").click()
    expect(page.locator("#key-state")).to_contain_text("Using key")


def key_field(page: Page) -> Locator:
    return page.get_by_role("textbox", name=re.compile(r"^Key\b"))


def generate(page: Page, prompt: str, width: int = 64, height: int = 64, steps: int = 2) -> None:
    page.get_by_role("textbox", name="Prompt", exact=True).fill(prompt)
    page.get_by_role("spinbutton", name="Width", exact=True).fill(str(width))
    page.get_by_role("spinbutton", name="Height", exact=True).fill(str(height))
    page.get_by_role("spinbutton", name="Steps", exact=True).fill(str(steps))
    page.get_by_role("button", name="Generate").click()


def card(page: Page, prompt: str) -> Locator:
    """A job's card: a list item named by its prompt."""
    return page.get_by_role("listitem", name=prompt, exact=True)


def test_a_key_is_kept_in_the_tab_and_a_refused_one_says_so(
    page: Page, gateway_process: GatewayProcess, settings: Settings
) -> None:
    from playwright.sync_api import expect

    generate(page, "no key yet")
    expect(page.locator("#notice")).to_have_text("Paste an API key first.")
    expect(key_field(page)).to_be_focused()

    paste_key(page, "igk_nonsense")
    expect(page.locator("#notice")).to_contain_text("The key was refused")
    expect(page.locator("#jobs-state")).to_have_text("The jobs could not be listed.")

    token = live_key(gateway_process.url, settings)
    paste_key(page, token)
    expect(page.locator("#jobs-state")).to_have_text("No jobs yet.")
    assert page.evaluate("sessionStorage.getItem('imagegen.apiKey')") == token
    # The key is not shown back: the field is emptied, and the page names the key by its id.
    expect(key_field(page)).to_have_value("")
    assert token.split("_", 2)[2] not in page.content()  # the secret may hold "_"

    # Keyboard focus is visible: Tab from the key field to its button draws the outline.
    key_field(page).focus()
    page.keyboard.press("Tab")
    expect(page.get_by_role("button", name="Use key")).to_be_focused()
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline == "solid"

    page.reload()  # the same tab: the key is still there
    expect(page.locator("#key-state")).to_contain_text("Using key")
    page.get_by_role("button", name="Forget").click()
    expect(page.locator("#key-state")).to_contain_text("No key yet")
    assert page.evaluate("sessionStorage.getItem('imagegen.apiKey')") is None


# Records every value the job cards' progress bars take, as the page sets them.
RECORD_PROGRESS = """() => {
  window.progressSeen = [];
  new MutationObserver((records) => {
    for (const record of records) {
      const value = record.target.getAttribute("value");
      if (value !== null) window.progressSeen.push(Number(value));
    }
  }).observe(document.getElementById("jobs"), {
    attributes: true, attributeFilter: ["value"], subtree: true,
  });
}"""


def test_a_prompt_shows_its_progress_live_and_then_its_image(
    page: Page, gateway_process: GatewayProcess, settings: Settings
) -> None:
    from playwright.sync_api import expect

    paste_key(page, live_key(gateway_process.url, settings))
    page.evaluate(RECORD_PROGRESS)
    prompt = f"a lighthouse at dusk {uuid.uuid4().hex[:6]}"
    generate(page, prompt, steps=40)

    job = card(page, prompt)
    expect(job).to_be_visible()
    # The bar moves: some step of the 40 reaches it over the event stream.
    page.wait_for_function("() => window.progressSeen.some((value) => value > 0)")
    expect(job.locator(".status")).to_have_text("succeeded")
    image = job.get_by_role("img", name=f"Generated image: {prompt}")
    expect(image).to_be_visible()
    image.evaluate("img => img.decode()")  # resolves once it loaded
    assert image.evaluate("img => img.naturalWidth") == 64
    expect(job.get_by_role("progressbar")).to_be_hidden()
    expect(job.get_by_role("button", name="Cancel")).to_be_hidden()
    seen = page.evaluate("window.progressSeen")
    assert seen == sorted(seen) and max(seen) <= 40, seen  # steps only go up
    expect(page.locator("#notice")).to_contain_text(prompt[:20])


def test_a_running_job_is_canceled_from_the_keyboard(
    page: Page, gateway_process: GatewayProcess, settings: Settings
) -> None:
    from playwright.sync_api import expect

    paste_key(page, live_key(gateway_process.url, settings))
    prompt = f"a slow harbour {uuid.uuid4().hex[:6]}"
    generate(page, prompt, **test_gateway.SLOW)

    job = card(page, prompt)
    bar = job.get_by_role("progressbar", name=re.compile(r"^Step [1-9]\d* of 100$"))
    expect(bar).to_be_visible()  # running, a step or more in
    job.get_by_role("button", name="Cancel").focus()
    page.keyboard.press("Enter")
    expect(job.locator(".status")).to_have_text("canceled")
    expect(job.locator(".reason")).to_contain_text("canceled")
    expect(job.get_by_role("img")).to_have_count(0)
    expect(job).to_be_focused()  # focus does not fall to the page when the button goes


def test_a_burst_shows_when_to_retry_and_a_rejection_its_reason(
    page: Page, gateway_process: GatewayProcess, settings: Settings
) -> None:
    from playwright.sync_api import expect

    paste_key(page, live_key(gateway_process.url, settings))
    notice = page.locator("#notice")
    submit = page.get_by_role("button", name="Generate")
    tag = uuid.uuid4().hex[:6]
    # Quickly, one after another (the button is back once the previous one was answered),
    # until the bucket is empty: BURST go through, the next is refused.
    for n in range(BURST + 3):
        generate(page, f"burst {tag} {n}")
        expect(submit).to_be_enabled()
        if "Rate limit" in notice.inner_text():
            break
    expect(notice).to_have_text(re.compile(r"^Rate limit reached: try again in \d+ s \(at .+\)\."))
    refused = card(page, f"burst {tag} {n}")
    expect(refused.locator(".status")).to_have_text("rejected")
    expect(refused.locator(".reason")).to_contain_text(re.compile(r"retry after \d+ s"))

    # A request the bucket can never pay for: refused, and the notice says why.
    generate(page, f"too dear {tag}", width=1024, height=1024, steps=25)
    expect(notice).to_contain_text("Rejected (The request costs more than the rate limit")
