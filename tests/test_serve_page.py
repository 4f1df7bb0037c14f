"""The chat page in a real headless browser (Debian's chromium, driven by Playwright):
type a message, watch the answer stream in, press stop, keep the multi-turn history; on a
small-context model, a long conversation goes on with its oldest turns dropped and said."""

import time
from pathlib import Path

import pytest
from chat_fixtures import trained_checkpoint
from serve_fixtures import long_checkpoint, serving

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 60_000  # hang guard for each awaited moment, not a timing requirement


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = long_checkpoint(tmp_path_factory)
    args = ("--max-batch", "2", "--max-new-tokens-cap", "4000")
    with serving(ckpt, tmp_path_factory.mktemp("page"), *args) as srv:
        yield srv


@pytest.fixture
def page(tmp_path):
    assert CHROMIUM.exists(), "the page test needs Debian's chromium (make setup installs it)"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True, args=ARGS,
            viewport={"width": 1100, "height": 700})  # fmt: skip
        try:
            yield browser.pages[0] if browser.pages else browser.new_page()
        finally:
            browser.close()


def test_chat_page_streams_stops_and_keeps_history(server, page, tmp_path):
    page.goto(server.url + "/", timeout=WAIT_MS)
    page.wait_for_function("document.getElementById('model').textContent === 'model: long'",
                           timeout=WAIT_MS)  # fmt: skip
    page.fill("#system", "You are terse.")
    page.eval_on_selector("#temperature", "el => { el.value = '0'; el.dispatchEvent("
                          "new Event('input')); }")  # fmt: skip
    page.fill("#max_tokens", "4000")
    page.fill("#input", "hello there")
    page.click("#send")
    assert page.inner_text(".msg.user") == "hello there"
    # The answer streams in: text grows while the stop button is live.
    page.wait_for_function("document.querySelector('.msg.assistant').textContent.length > 20",
                           timeout=WAIT_MS)  # fmt: skip
    first = len(page.inner_text(".msg.assistant"))
    page.wait_for_function(f"document.querySelector('.msg.assistant').textContent.length > {first}",
                           timeout=WAIT_MS)  # fmt: skip
    assert page.is_enabled("#stop") and page.is_disabled("#send")
    assert "tokens/s" in page.inner_text("#status")
    page.click("#stop", timeout=WAIT_MS)
    page.wait_for_function("document.getElementById('status').textContent === 'stopped'",
                           timeout=WAIT_MS)  # fmt: skip
    assert "(stopped)" in page.inner_text(".msg.assistant .meta")
    assert page.is_enabled("#send") and page.is_disabled("#stop")
    # The server let go of the row (the browser hung up).
    deadline = time.monotonic() + WAIT_MS / 1000
    while page.evaluate("fetch('/health').then(r => r.json())")["active"] != 0:
        assert time.monotonic() < deadline, "the stopped answer kept its row"
        time.sleep(0.05)
    # A second turn: the history now has both turns and a new answer, short this time.
    page.fill("#max_tokens", "5")
    page.fill("#input", "and again")
    page.press("#input", "Enter")
    page.wait_for_function("document.querySelectorAll('.msg.assistant .meta').length === 2",
                           timeout=WAIT_MS)  # fmt: skip
    assert page.locator(".msg.user").all_inner_texts() == ["hello there", "and again"]
    assert "(length)" in page.locator(".msg.assistant .meta").nth(1).inner_text()
    shot = tmp_path / "chat.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    records = [x for x in server.log_lines() if x.get("event") == "done"]
    assert [x["finish"] for x in records] == ["interrupted", "max_new_tokens"]
    assert records[1]["prompt_tokens"] > records[0]["prompt_tokens"]  # the history was sent


def test_a_long_conversation_on_a_small_context_drops_the_oldest_turns(tmp_path_factory, page):
    ckpt = trained_checkpoint(tmp_path_factory)  # a 64-token context
    with serving(ckpt, tmp_path_factory.mktemp("small"), "--max-new-tokens-cap", "16") as srv:
        page.goto(srv.url + "/", timeout=WAIT_MS)
        page.wait_for_function("document.getElementById('model').textContent === 'model: ckpt'",
                               timeout=WAIT_MS)  # fmt: skip
        page.fill("#system", "Be brief.")
        page.eval_on_selector("#temperature", "el => { el.value = '0'; el.dispatchEvent("
                              "new Event('input')); }")  # fmt: skip
        page.fill("#max_tokens", "12")
        turns = ["hi", "what is a token?", "hi", "bye", "what is a token?", "hi"]
        for n, text in enumerate(turns, 1):
            page.fill("#input", text)
            page.press("#input", "Enter")
            page.wait_for_function(
                f"document.querySelectorAll('.msg.assistant .meta').length === {n}",
                timeout=WAIT_MS)  # fmt: skip
        assert page.locator(".msg.error").count() == 0  # no context_length_exceeded
        assert page.locator(".msg.user").all_inner_texts() == turns  # all still shown
        notes = page.locator(".note").all_inner_texts()
        assert notes and all("no longer fit the model's context" in x for x in notes)
        dropped = page.locator(".msg.dropped").count()
        assert 0 < dropped < 2 * len(turns) - 1
        assert "(stop)" in page.locator(".msg.assistant .meta").nth(-1).inner_text()
        done = [x for x in srv.log_lines() if x.get("event") == "done"]
        assert len(done) == len(turns) and max(x["prompt_tokens"] for x in done) <= 64 - 12
