"""scripts/demo.py: the Gradio app served on 127.0.0.1 and driven in a real headless Chromium (Playwright)."""

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from transformers import set_seed

from minigpt4_hf.inference import CHAT_GENERATION_DEFAULTS, Conversation
from conftest import REPO_ROOT
from minigpt4_hf.random_models import EXAMPLE_IMAGE


pytest.importorskip("gradio", reason="the demo needs gradio: pip install '.[demo]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs: pip install playwright")
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
if not shutil.which(CHROMIUM):
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)

SEED, MAX_NEW_TOKENS = 0, 8
QUESTION = "What is in this image?"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def letters_and_digits(text: str) -> str:
    """The text without spaces and punctuation (what Markdown rendering cannot change)."""
    return re.sub(r"[^A-Za-z0-9]", "", text)


@pytest.fixture(scope="module")
def demo_url(tiny_saved_dir):
    port = free_port()
    command = [sys.executable, str(REPO_ROOT / "scripts" / "demo.py"), "--model", str(tiny_saved_dir),
               "--host", "127.0.0.1", "--port", str(port), "--max-new-tokens", str(MAX_NEW_TOKENS),
               "--seed", str(SEED)]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                              cwd=REPO_ROOT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 90
    while True:
        if server.poll() is not None:
            pytest.fail(f"the demo exited with {server.returncode}:\n{server.stdout.read()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            server.kill()
            pytest.fail(f"the demo did not answer on {url} within 90 s:\n{server.stdout.read()}")
        time.sleep(0.25)
    yield url
    server.terminate()
    try:
        server.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.kill()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def open_and_upload(browser, url):
    page = browser.new_page()
    page.goto(url)
    page.locator("input[type=file]").first.set_input_files(str(EXAMPLE_IMAGE))
    page.locator("img").first.wait_for(timeout=30_000)  # the preview shows the upload
    page.get_by_role("button", name="Upload & Start Chat").click()
    page.wait_for_function("() => !document.querySelector('#question textarea').disabled", timeout=30_000)
    return page


def test_upload_ask_and_see_the_streamed_answer(demo_url, browser, tiny_shared):
    conversation = Conversation(*tiny_shared, generation_kwargs={**CHAT_GENERATION_DEFAULTS,
                                                                  "max_new_tokens": MAX_NEW_TOKENS})
    conversation.upload_image(EXAMPLE_IMAGE)
    conversation.ask(QUESTION)
    set_seed(SEED)  # the demo seeds once at start; this is its first answer
    expected = conversation.answer()

    page = open_and_upload(browser, demo_url)
    question = page.locator("#question textarea")
    question.fill(QUESTION)
    question.press("Enter")
    page.locator('#chatbot [data-testid="user"]').wait_for(timeout=30_000)
    bot = page.locator('#chatbot [data-testid="bot"]')
    bot.wait_for(timeout=30_000)
    deadline = time.monotonic() + 30
    while letters_and_digits(bot.inner_text()) != letters_and_digits(expected) and time.monotonic() < deadline:
        time.sleep(0.2)

    assert QUESTION in page.locator('#chatbot [data-testid="user"]').inner_text()
    assert letters_and_digits(expected)
    assert letters_and_digits(bot.inner_text()) == letters_and_digits(expected)
    assert question.input_value() == ""
    page.close()


def test_restart_clears_the_chat_and_asks_for_a_new_image(demo_url, browser):
    page = open_and_upload(browser, demo_url)
    assert page.get_by_role("button", name="Start Chatting").is_disabled()

    page.get_by_role("button", name="Restart").click()

    page.get_by_role("button", name="Upload & Start Chat").wait_for(timeout=30_000)
    page.wait_for_function("() => document.querySelector('#question textarea').disabled", timeout=30_000)
    assert page.locator('#chatbot [data-testid="bot"]').count() == 0
    page.close()
