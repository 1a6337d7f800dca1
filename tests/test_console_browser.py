"""The web console in headless Chromium (Debian's `chromium`, driven by Playwright): a photograph
with its overlays, measurements and assessment, a streamed chat answer, a batch and its
progress bar, a full-page screenshot, an accessibility smoke check, and not one request to a
host other than the gateway. Skipped where no Chromium is installed (`make setup` installs it
as root)."""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, expect, sync_playwright

from services.gateway.tenants import digest, new_key
from shared.synthetic import generate_fundus
from tests.conftest import DATASETS, REPO, ServiceProcess, Stack, fundus_png, wait_until
from tests.test_gateway_chat import needs_model

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
# Kept by CI with everything under var/.
SCREENSHOT = REPO / "var" / "test-artifacts" / "console.png"
KEY = new_key()
TIMEOUT_MS = 120_000
STARTUP_S = 120


@dataclass
class Console:
    page: Page
    stack: Stack
    requests: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if CHROMIUM is None:
        pytest.skip("no Chromium (apt-get install chromium, or make setup as root)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def console_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The backends, a gateway with one tenant's key, and a batch worker (embedded broker)."""
    tmp = tmp_path_factory.mktemp("console")
    running = Stack(
        tmp,
        extra_env={
            "RETINAL_GATEWAY_API_KEYS": f"clinic-a:{digest(KEY)}",
            "RETINAL_WORKER_METRICS_PORT": "0",
        },
    )
    worker = ServiceProcess("worker", running.env, tmp / "worker.log")
    try:
        worker.start()
        # Generous waits: the browser tests share the machine with whatever else is running.
        running.start(timeout_s=STARTUP_S)
        wait_until(lambda: "ready" in worker.log, STARTUP_S, "the worker")
        yield running
    finally:
        worker.stop()
        running.stop()


@pytest.fixture(scope="module")
def console(browser: Browser, console_stack: Stack) -> Iterator[Console]:
    """The console open at `/` with the tenant's key entered; every request it makes recorded."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    opened = Console(page, console_stack)
    page.on("request", lambda request: opened.requests.append(request.url))
    page.on("pageerror", lambda error: opened.page_errors.append(str(error)))
    page.goto(f"{console_stack.url}/")
    page.fill("#api-key", KEY)
    page.press("#api-key", "Tab")  # the change event keeps the key for the tab
    yield opened
    context.close()


@pytest.fixture(scope="module")
def photograph(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real DRIVE photograph when the datasets are there, else a synthetic fundus."""
    drive = DATASETS / "DRIVE" / "test" / "images" / "01_test.tif"
    if drive.exists():
        return drive
    path = tmp_path_factory.mktemp("photograph") / "synthetic.png"
    Image.fromarray(generate_fundus(seed=5).rgb).save(path)
    return path


def _overlay_loaded(page: Page, layer: str) -> None:
    page.wait_for_function(
        """(alt) => {
            const image = document.querySelector("#overlay-stack img");
            return image && image.alt === alt && image.complete && image.naturalWidth > 0;
        }""",
        arg=f"Overlay: {layer}",
    )


@pytest.fixture(scope="module")
def analysed(console: Console, photograph: Path) -> Console:
    """The photograph uploaded through the form and its first overlay loaded."""
    page = console.page
    page.set_input_files("#image", photograph)
    page.click("#upload button[type=submit]")
    expect(page.locator("#status")).to_contain_text("Done (analysis", timeout=TIMEOUT_MS)
    _overlay_loaded(page, "combined")
    return console


def test_a_photograph_shows_its_overlays_measurements_and_assessment(analysed: Console) -> None:
    page = analysed.page
    layers = page.locator("#layers input[name=layer]")
    assert layers.count() >= 5
    first, second = (layers.nth(i).get_attribute("value") or "" for i in (0, 1))
    assert layers.nth(0).is_checked()
    # Off by the keyboard (the next layer, as arrow keys do in a radio group), on by a click.
    layers.nth(0).focus()
    page.keyboard.press("ArrowDown")
    assert layers.nth(1).is_checked() and not layers.nth(0).is_checked()
    _overlay_loaded(page, second)
    layers.nth(0).click()
    _overlay_loaded(page, first)

    rows = page.locator("#measurements tbody tr")
    expect(rows.first).to_contain_text("Image quality")
    assert rows.count() >= 3
    expect(page.locator("#assessment")).to_contain_text("DR grade")
    expect(page.locator("#assessment h4").first).to_have_text("Reasons")


# The page is given the answer's server-sent events one at a time, as a slow network would (the
# model's last sentence and the end often share one read); the events, and every state and text
# the assistant's answer goes through, are recorded.
_WATCH_ANSWER = """() => {
    const fetchNow = window.fetch;
    window.fetch = async (resource, init) => {
        const response = await fetchNow(resource, init);
        if (!String(resource).endsWith("/v1/chat") || !response.ok) return response;
        const encoder = new TextEncoder();
        const decoder = new TextDecoder();
        let buffer = "";
        const oneByOne = new TransformStream({
            async transform(chunk, controller) {
                buffer += decoder.decode(chunk, {stream: true});
                let end;
                while ((end = /\\r\\n\\r\\n|\\n\\n|\\r\\r/.exec(buffer))) {
                    const cut = end.index + end[0].length;
                    window.answerEvents.push(buffer.slice(0, cut));
                    controller.enqueue(encoder.encode(buffer.slice(0, cut)));
                    buffer = buffer.slice(cut);
                    await new Promise((resolve) => setTimeout(resolve, 50));
                }
            },
        });
        return new Response(response.body.pipeThrough(oneByOne), response);
    };
    window.answerEvents = [];
    window.answerSeen = [];
    const conversation = document.querySelector("#conversation");
    new MutationObserver(() => {
        const item = conversation.querySelector("li.assistant:last-child");
        if (item) window.answerSeen.push([item.dataset.state, item.textContent]);
    }).observe(conversation, {subtree: true, childList: true, characterData: true,
                              attributes: true});
}"""


def _done(events: list[str]) -> dict[str, Any]:
    for event in events:
        lines = event.splitlines()
        if lines[0] == "event: done":
            return dict(json.loads("".join(line[5:] for line in lines if line[:5] == "data:")))
    raise AssertionError(f"no done event in {events}")


@needs_model
def test_a_question_gets_a_streamed_then_grounded_answer(analysed: Console) -> None:
    page = analysed.page
    page.evaluate(_WATCH_ANSWER)
    page.fill("#question", "What is the vertical cup-to-disc ratio?")
    page.click("#ask button[type=submit]")
    answer = page.locator("#conversation li.assistant").last
    expect(answer).to_have_attribute("data-state", "done", timeout=TIMEOUT_MS)
    done = _done(page.evaluate("window.answerEvents"))

    seen: list[list[str]] = page.evaluate("window.answerSeen")
    streamed = [text for state, text in seen if state == "streaming" and text != "…"]
    assert streamed, f"no delta shown before the answer: {seen}"
    assert all(len(a) <= len(b) for a, b in itertools.pairwise(streamed))
    final = answer.text_content() or ""
    assert final.startswith(done["answer"]) and done["answer"].startswith(streamed[-1].strip())
    # The final answer marks every measured value it states, with its findings key.
    values = done["grounding"]["values"]
    measured = {(v["text"], v["findings_key"]) for v in values if v["measured"]}
    marked = answer.locator("mark.measured").evaluate_all(
        "(marks) => marks.map((mark) => [mark.textContent, mark.title])"
    )
    assert {(text, key) for text, key in marked} <= measured
    assert bool(marked) == bool(measured)
    # aria-busy clears when the stream closes, a moment after the done event.
    expect(page.locator("#conversation")).to_have_attribute("aria-busy", "false")


def _batch_files(folder: Path, count: int, first_size: int) -> list[Path]:
    paths = []
    for i in range(count):
        path = folder / f"eye-{first_size + i}.png"
        path.write_bytes(fundus_png(first_size + i))
        paths.append(path)
    return paths


def test_a_batch_s_progress_bar_reaches_completion(console: Console, tmp_path: Path) -> None:
    page = console.page
    page.set_input_files("#batch-files", _batch_files(tmp_path, 3, 300))
    page.evaluate(
        """() => {
            window.progressSeen = [];
            const bar = document.querySelector("#batch-bar");
            new MutationObserver(() => window.progressSeen.push([bar.value, bar.max]))
                .observe(bar, {attributes: true});
        }"""
    )
    page.click("#batch-upload button[type=submit]")
    status = page.locator("#batch-status")
    expect(status).to_have_text(
        "completed: 3 of 3 finished; 3 done, 0 failed, 0 pending", timeout=TIMEOUT_MS
    )
    seen: list[list[float]] = page.evaluate("window.progressSeen")
    values = [value for value, _ in seen]
    assert values == sorted(values) and values[0] < 3 and seen[-1] == [3, 3]
    expect(page.locator("#batch-cancel")).to_be_disabled()
    assert page.locator("#batch-errors li").count() == 0

    # The results link carries the key: the CSV comes down with a header and three rows.
    with page.expect_download() as download:
        page.click("#batch-csv")
    rows = Path(download.value.path()).read_text().splitlines()
    assert len(rows) == 4 and rows[0].startswith("source")

    # A second batch, cancelled at once: what no worker started is never analysed.
    page.set_input_files("#batch-files", _batch_files(tmp_path, 6, 320))
    page.click("#batch-upload button[type=submit]")
    expect(page.locator("#batch-cancel")).to_be_enabled()
    page.click("#batch-cancel")
    expect(status).to_contain_text("cancelled:")
    expect(page.locator("#batch-cancel")).to_be_disabled()


def test_a_full_page_screenshot_is_kept(console: Console) -> None:
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    console.page.screenshot(path=SCREENSHOT, full_page=True)
    print(f"console screenshot: {SCREENSHOT}")
    with Image.open(SCREENSHOT) as shot:
        assert shot.width >= 1280 and shot.height > 900


# Visible text whose contrast with its background is under WCAG AA's 4.5:1 (disabled controls
# are exempt), as "tag#id.class: ratio".
_LOW_CONTRAST = """() => {
    const rgba = (color) => color.match(/[\\d.]+/g).map(Number);
    const luminance = (color) => {
        const linear = (v) => {
            const c = v / 255;
            return c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4;
        };
        const [r, g, b] = rgba(color).map(linear);
        return 0.2126 * r + 0.7152 * g + 0.0722 * b;
    };
    const background = (el) => {
        for (; el; el = el.parentElement) {
            const color = getComputedStyle(el).backgroundColor;
            if (rgba(color)[3] !== 0) return color;
        }
        return "rgb(255, 255, 255)";
    };
    return [...document.querySelectorAll("body *")]
        .filter((el) => [...el.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim()))
        .filter((el) => el.checkVisibility() && !el.matches(":disabled"))
        .map((el) => {
            const [a, b] = [luminance(getComputedStyle(el).color), luminance(background(el))];
            return [el, (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05)];
        })
        .filter(([, ratio]) => ratio < 4.5)
        .map(([el, ratio]) => `${el.tagName}#${el.id}.${el.className}: ${ratio.toFixed(2)}`);
}"""


def test_the_page_is_labelled_legible_and_talks_to_the_gateway_only(console: Console) -> None:
    page = console.page
    unlabelled = page.evaluate(
        """() => [...document.querySelectorAll("input, textarea, select, progress")]
            .filter((el) => el.type !== "hidden")
            .filter((el) => !el.labels.length && !el.getAttribute("aria-label"))
            .map((el) => el.outerHTML)"""
    )
    assert unlabelled == []
    assert page.get_attribute("html", "lang") == "en"
    assert page.locator("main").count() == 1
    for region in ("#status", "#batch-status", "#conversation"):
        assert page.get_attribute(region, "aria-live") == "polite"
    nameless = page.evaluate(
        """() => [...document.querySelectorAll("button, a")]
            .filter((el) => !el.textContent.trim()).map((el) => el.outerHTML)"""
    )
    assert nameless == []
    assert page.evaluate(_LOW_CONTRAST) == []
    assert console.page_errors == []

    gateway = urlsplit(console.stack.url).netloc
    assert len(console.requests) > 10
    elsewhere = [
        url
        for url in console.requests
        if urlsplit(url).scheme not in {"blob", "data"} and urlsplit(url).netloc != gateway
    ]
    assert elsewhere == []
