"""The chat page in a real browser: Debian's chromium driven by playwright (no browser download)."""

from __future__ import annotations

import shutil

import pytest

from tunestack.config.infer import GenerationArguments

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs the chromium package (apt-get install chromium)")


def test_the_page_streams_an_answer_in_chromium(glm4_server, tmp_path) -> None:
    chat_model = glm4_server.models["tiny"].chat_model
    greedy = GenerationArguments(temperature=0, max_new_tokens=12)
    first = chat_model.answer([{"role": "user", "content": "What is the capital of France?"}], greedy)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(glm4_server.url + "/")
            page.wait_for_function("document.querySelector('#model').options.length > 0", timeout=20_000)
            assert page.locator("#model").input_value() == "tiny"
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "12")
            page.fill("#question", "What is the capital of France?")
            page.press("#question", "Enter")
            done = page.locator(".msg.assistant[data-done='true']")
            done.first.wait_for(timeout=30_000)
            assert page.locator(".msg.user").first.inner_text() == "What is the capital of France?"
            assert done.first.inner_text() == first and first
            assert "tokens/s" in page.locator("#status").inner_text()
            # A second turn carries the first (multi-turn), as `tunestack chat` does.
            second = chat_model.answer(
                [
                    {"role": "user", "content": "What is the capital of France?"},
                    {"role": "assistant", "content": first},
                    {"role": "user", "content": "Who are you?"},
                ],
                greedy,
            )
            page.fill("#question", "Who are you?")
            page.click("#send")
            page.wait_for_function("document.querySelectorAll(\".msg.assistant[data-done='true']\").length == 2")
            assert done.nth(1).inner_text() == second
            shot = tmp_path / "chat-page.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 5000
            print(f"screenshot: {shot}")
            page.click("#lang")
            assert page.locator("#send").inner_text() == "发送"
        finally:
            browser.close()
