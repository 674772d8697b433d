"""
The web demo (minigpt4_hf/cli/demo.py) served on 127.0.0.1 and driven in a real headless Chromium (Playwright): one
conversation per browser session, Clear and Restart, refusals, dropped turns, the queue. The servers run in this
process (one per module fixture), around the shared tiny model.
"""

import io
import os
import re
import shutil
import socket
import threading

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from minigpt4_hf.cli import demo
from minigpt4_hf.cli.options import UserError
from minigpt4_hf.inference import Conversation
from minigpt4_hf.random_models import EXAMPLE_IMAGE, build_random_model
from processing_minigpt4 import format_box, load_rgb_image
from conftest import write_image_bomb


pytest.importorskip("gradio", reason="the demo needs gradio: pip install '.[demo]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs: pip install playwright")
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
if not shutil.which(CHROMIUM):
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)

GREEDY = {"max_new_tokens": 8, "num_beams": 1, "do_sample": False, "repetition_penalty": 1.0}
QUESTIONS = ("What is in this image?", "Where is it?", "What colour is it?")
WAIT_MS = 60_000


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def letters_and_digits(text: str) -> str:
    """The text without spaces, punctuation and escapes (what Markdown rendering cannot change)."""
    return re.sub(r"[^A-Za-z0-9]", "", text)


def lone_chat(model, processor, image, questions, context_budget) -> list[dict]:
    """The chat the demo should show after `questions` about `image`, run alone (greedy)."""
    conversation = Conversation(model, processor, GREEDY, context_budget, notify=lambda message: None)
    conversation.upload_image(image)
    for question in questions:
        conversation.ask(question)
        conversation.answer()
    return demo.chat_history(conversation)


class GatedModel:
    """
    The tiny model, whose `generate` waits until the test opens `gate` (and says when one started), and raises
    `failure` instead of answering when the test sets it (once).
    """

    def __init__(self, model):
        self.model = model
        self.gate, self.entered = threading.Event(), threading.Event()
        self.gate.set()
        self.failure = None

    def __getattr__(self, name):
        return getattr(self.model, name)

    def generate(self, *args, **kwargs):
        self.entered.set()
        if not self.gate.wait(timeout=WAIT_MS / 1000):
            raise TimeoutError("the test never opened the gate")
        failure, self.failure = self.failure, None
        if failure is not None:
            raise failure
        return self.model.generate(*args, **kwargs)


class ScriptedModel:
    """A tiny model whose `generate` answers `answer` (tokenized, streamed and returned as `generate` does)."""

    def __init__(self, model, processor, answer: str):
        self.model, self.processor, self.answer = model, processor, answer

    def __getattr__(self, name):
        return getattr(self.model, name)

    def generate(self, input_ids, streamer=None, **kwargs):
        answer_ids = self.processor.tokenizer(self.answer, add_special_tokens=False, return_tensors="pt")["input_ids"]
        if streamer is not None:
            streamer.put(input_ids.cpu())
            streamer.put(answer_ids[0])
            streamer.end()
        return torch.cat([input_ids, answer_ids.to(input_ids.device)], dim=1)


def serve(model, processor, context_budget: int, max_queue_size: int = demo.DEFAULT_MAX_QUEUE_SIZE):
    """Starts the demo in this process on a free port of 127.0.0.1; returns (the Gradio app, its URL)."""
    app = demo.build_demo(model, processor, GREEDY, context_budget)
    port = free_port()
    demo.launch(app, "127.0.0.1", port, max_queue_size, block=False)
    return app, f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def context_budget(tiny_seeing):
    """Room for QUESTIONS[0] and [1] with their answers, not for all three: the third drops the oldest exchange."""
    model, processor = tiny_seeing
    conversation = Conversation(model, processor, GREEDY, 10_000)
    conversation.upload_image(EXAMPLE_IMAGE)
    for question in QUESTIONS:
        conversation.ask(question)
        conversation.answer()
    full_prompt = processor(images=conversation.images, text=conversation.last_prompt)["input_ids"][0]
    return len(full_prompt) + GREEDY["max_new_tokens"] - 1


@pytest.fixture(scope="module")
def demo_url(tiny_seeing, context_budget):
    app, url = serve(*tiny_seeing, context_budget)
    yield url
    app.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def second_image(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "stripes.png"
    image = Image.new("RGB", (90, 60), (20, 160, 40))
    ImageDraw.Draw(image).rectangle((10, 5, 50, 40), fill=(240, 30, 200))
    image.save(path)
    return path


def open_page(browser, url):
    page = browser.new_page()  # a new browser context: a session of its own
    page.goto(url)
    return page


def start_chat(page, image) -> None:
    page.locator("input[type=file]").first.set_input_files(str(image))
    page.locator("#image img").first.wait_for(timeout=WAIT_MS)  # the preview shows the upload
    page.get_by_role("button", name="Upload & Start Chat").click()
    page.wait_for_function("() => !document.querySelector('#question textarea').disabled", timeout=WAIT_MS)


def send(page, question: str) -> None:
    textarea = page.locator("#question textarea")
    textarea.fill(question)
    textarea.press("Enter")


def shown_chat(page) -> list[str]:
    bubbles = page.locator('#chatbot [data-testid="user"], #chatbot [data-testid="bot"]')
    return [letters_and_digits(text) for text in bubbles.all_inner_texts()]


def wait_for_chat(page, history: list[dict]) -> None:
    """Waits until the chat window shows `history` (compared on letters and digits), then checks it."""
    expected = [letters_and_digits(message["content"]) for message in history]
    try:
        page.wait_for_function(
            """expected => JSON.stringify(Array.from(document.querySelectorAll(
                   '#chatbot [data-testid="user"], #chatbot [data-testid="bot"]'))
                   .map(bubble => bubble.innerText.replace(/[^A-Za-z0-9]/g, ''))) === JSON.stringify(expected)""",
            arg=expected,
            timeout=WAIT_MS,
        )
    except sync_api.TimeoutError:
        pass
    assert shown_chat(page) == expected


def toast_texts(page) -> list[str]:
    page.locator(".toast-body").first.wait_for(timeout=WAIT_MS)
    return page.locator(".toast-body").all_inner_texts()


# --------------------------------------------------------------------------------------------------------------------
# Sessions, Clear, Restart


def test_each_session_sees_only_its_own_image_and_turns(demo_url, browser, tiny_seeing, context_budget, second_image):
    question = QUESTIONS[0]
    expected_first = lone_chat(*tiny_seeing, EXAMPLE_IMAGE, [question], context_budget)
    expected_second = lone_chat(*tiny_seeing, second_image, [question], context_budget)
    assert expected_first != expected_second  # the two images get different answers
    first, second = open_page(browser, demo_url), open_page(browser, demo_url)
    start_chat(first, EXAMPLE_IMAGE)
    start_chat(second, second_image)

    send(first, question)
    wait_for_chat(first, expected_first)
    send(second, question)
    wait_for_chat(second, expected_second)

    assert shown_chat(first) == [letters_and_digits(message["content"]) for message in expected_first]
    assert first.locator("#image img").first.get_attribute("src").endswith("example.jpg")
    assert second.locator("#image img").first.get_attribute("src").endswith("stripes.png")
    first.close()
    second.close()


def test_clear_empties_the_chat_and_the_model_forgets_the_turns(demo_url, browser, tiny_seeing, context_budget):
    with_first_turn = lone_chat(*tiny_seeing, EXAMPLE_IMAGE, QUESTIONS[:2], context_budget)
    after_clear = lone_chat(*tiny_seeing, EXAMPLE_IMAGE, QUESTIONS[1:2], context_budget)
    assert with_first_turn[2:] != after_clear  # the second answer depends on the first turn
    page = open_page(browser, demo_url)
    start_chat(page, EXAMPLE_IMAGE)
    send(page, QUESTIONS[0])
    wait_for_chat(page, with_first_turn[:2])

    page.locator("#chatbot").get_by_role("button", name="Clear").click()
    wait_for_chat(page, [])
    send(page, QUESTIONS[1])

    wait_for_chat(page, after_clear)
    page.close()


def test_restart_clears_the_chat_and_asks_for_a_new_image(demo_url, browser):
    page = open_page(browser, demo_url)
    start_chat(page, EXAMPLE_IMAGE)
    assert page.get_by_role("button", name="Start Chatting").is_disabled()

    page.get_by_role("button", name="Restart").click()

    page.get_by_role("button", name="Upload & Start Chat").wait_for(timeout=WAIT_MS)
    page.wait_for_function("() => document.querySelector('#question textarea').disabled", timeout=WAIT_MS)
    assert page.locator('#chatbot [data-testid="bot"]').count() == 0
    page.close()


# --------------------------------------------------------------------------------------------------------------------
# Refusals and text that does not fit


def test_start_chat_without_an_image_shows_a_message(demo_url, browser):
    page = open_page(browser, demo_url)

    page.get_by_role("button", name="Upload & Start Chat").click()

    assert any("No image yet" in text for text in toast_texts(page))
    assert page.locator("#question textarea").is_disabled()
    page.close()


def test_an_image_bomb_is_refused_in_one_line_and_the_demo_stays_up(demo_url, browser, tmp_path):
    bomb = tmp_path / "bomb.tiff"  # 400 megapixels in a few kilobytes (a format the browser does not preview)
    write_image_bomb(bomb)
    page = open_page(browser, demo_url)
    page.locator("input[type=file]").first.set_input_files(str(bomb))
    page.get_by_role("button", name="Upload & Start Chat").click()

    (refusal,) = [text for text in toast_texts(page) if "bomb.tiff" in text]
    message = refusal.splitlines()[-1]
    assert "bomb.tiff" in message and "exceeds limit" in message
    start_chat(page, EXAMPLE_IMAGE)  # the server is still up and takes the next image
    page.close()


def test_a_chat_outgrowing_the_context_drops_the_oldest_turns_and_says_so(
    demo_url, browser, tiny_seeing, context_budget
):
    page = open_page(browser, demo_url)
    start_chat(page, EXAMPLE_IMAGE)
    for count in range(1, len(QUESTIONS) + 1):
        send(page, QUESTIONS[count - 1])
        wait_for_chat(page, lone_chat(*tiny_seeing, EXAMPLE_IMAGE, QUESTIONS[:count], context_budget))

    assert letters_and_digits(QUESTIONS[0]) not in shown_chat(page)
    assert any("dropped the oldest 1 turn" in text for text in toast_texts(page))
    page.close()


def test_a_question_longer_than_the_context_is_refused_and_given_back(demo_url, browser, context_budget):
    page = open_page(browser, demo_url)
    start_chat(page, EXAMPLE_IMAGE)
    question = " ".join(["word"] * context_budget)

    send(page, question)

    assert any(f"more than the {context_budget}-token context" in text for text in toast_texts(page))
    page.wait_for_function("q => document.querySelector('#question textarea').value === q", arg=question,
                           timeout=WAIT_MS)
    assert shown_chat(page) == []
    page.close()


# --------------------------------------------------------------------------------------------------------------------
# The queue


@pytest.fixture(scope="module")
def gated_demo(tiny_seeing):
    """A demo whose model generates only when the test says so, with room for one waiting answer."""
    model, processor = tiny_seeing
    gated = GatedModel(model)
    app, url = serve(gated, processor, context_budget=2000, max_queue_size=1)
    yield gated, url
    gated.gate.set()
    app.close()


def test_a_waiting_answer_shows_its_place_in_the_queue_and_a_full_queue_says_busy(gated_demo, browser):
    gated, url = gated_demo
    running, waiting, refused = (open_page(browser, url) for _ in range(3))
    start_chat(running, EXAMPLE_IMAGE)
    start_chat(waiting, EXAMPLE_IMAGE)
    gated.gate.clear()
    try:
        send(running, QUESTIONS[0])
        assert gated.entered.wait(timeout=WAIT_MS / 1000)
        send(waiting, QUESTIONS[0])
        waiting.locator("#chatbot").get_by_text(re.compile(r"queue: 1/1")).wait_for(timeout=WAIT_MS)

        refused.locator("input[type=file]").first.set_input_files(str(EXAMPLE_IMAGE))
        refused.get_by_role("button", name="Upload & Start Chat").click()
        assert any("busy" in text and "try again" in text for text in toast_texts(refused))
    finally:
        gated.gate.set()
    for page in (running, waiting):
        page.locator('#chatbot [data-testid="bot"]').wait_for(timeout=WAIT_MS)
        page.close()
    refused.close()


def test_a_failed_answer_is_reported_and_the_session_goes_on(gated_demo, browser, tiny_seeing):
    gated, url = gated_demo
    page = open_page(browser, url)
    start_chat(page, EXAMPLE_IMAGE)
    gated.failure = torch.OutOfMemoryError("out of memory (raised by the test)")

    send(page, QUESTIONS[0])

    assert any("The answer failed (OutOfMemoryError" in text for text in toast_texts(page))
    page.wait_for_function("q => document.querySelector('#question textarea').value === q", arg=QUESTIONS[0],
                           timeout=WAIT_MS)
    assert shown_chat(page) == []
    page.locator("#question textarea").press("Enter")  # asking again works
    wait_for_chat(page, lone_chat(*tiny_seeing, EXAMPLE_IMAGE, QUESTIONS[:1], context_budget=2000))
    page.close()


def test_a_busy_port_is_one_error_naming_the_flag():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=f"^--port {port}: cannot listen on 127.0.0.1:{port}"):
            demo.main(["--model", "unused", "--port", str(port)])


# --------------------------------------------------------------------------------------------------------------------
# MiniGPT-v2: task shortcuts and boxes


def test_boxes_are_outlined_in_one_colour_per_phrase():
    image = Image.new("RGB", (200, 100), (255, 255, 255))
    boxes = [{"phrase": "cat", "box": (20, 10, 120, 60)}, {"phrase": "dog", "box": (130, 20, 190, 90)},
             {"phrase": "cat", "box": (10, 70, 60, 95)}]

    drawn = np.asarray(demo.draw_boxes(image, boxes))

    scale = demo.BOXES_IMAGE_WIDTH / image.width
    assert drawn.shape == (round(image.height * scale), demo.BOXES_IMAGE_WIDTH, 3)
    for (x1, y1, x2, y2), colour in [(boxes[0]["box"], demo.BOX_COLOURS[0]), (boxes[1]["box"], demo.BOX_COLOURS[1]),
                                     (boxes[2]["box"], demo.BOX_COLOURS[0])]:
        middle = round((y1 + y2) / 2 * scale)
        assert tuple(drawn[middle, round(x1 * scale)]) == colour  # the left edge
        assert tuple(drawn[middle, round((x1 + x2) / 2 * scale)]) == (255, 255, 255)  # inside stays as it was


def test_task_shortcuts_and_boxes_are_only_for_minigpt_v2(demo_url, browser):
    page = open_page(browser, demo_url)
    page.get_by_role("button", name="Upload & Start Chat").wait_for(timeout=WAIT_MS)
    assert page.locator("#task").count() == 0 and page.locator("#boxes").count() == 0
    page.close()


@pytest.fixture(scope="module")
def grounding_answer():
    """A MiniGPT-v2 [grounding] answer for the example image, written with the processor's box helper."""
    size = Image.open(EXAMPLE_IMAGE).size
    return (f"<p>a woman</p> {format_box((40, 30, 200, 250), size)} in front of <p>a flag</p> "
            f"{format_box((0, 0, 90, 120), size)}")


@pytest.fixture(scope="module")
def v2_demo_url(grounding_answer):
    model, processor = build_random_model("tiny", variant="v2")
    app, url = serve(ScriptedModel(model, processor, grounding_answer), processor, context_budget=2000)
    yield url, processor
    app.close()


def test_a_task_shortcut_fills_the_question_and_the_answer_boxes_are_drawn(v2_demo_url, browser, grounding_answer):
    url, processor = v2_demo_url
    image = load_rgb_image(EXAMPLE_IMAGE)
    (boxes,) = processor.post_process_grounding([grounding_answer], [image.size])
    assert len(boxes) == 2
    page = open_page(browser, url)
    start_chat(page, EXAMPLE_IMAGE)

    page.get_by_label("Grounding").check()
    page.wait_for_function("q => document.querySelector('#question textarea').value === q",
                           arg=demo.TASK_SHORTCUTS["Grounding"][0], timeout=WAIT_MS)
    page.locator("#question textarea").press("Enter")

    page.locator("#boxes img").wait_for(timeout=WAIT_MS)
    served = page.request.get(page.locator("#boxes img").get_attribute("src")).body()
    shown = np.asarray(Image.open(io.BytesIO(served)).convert("RGB"))
    assert np.array_equal(shown, np.asarray(demo.draw_boxes(image, list(boxes))))
    assert "[grounding] describe this image in detail" in page.locator('#chatbot [data-testid="user"]').inner_text()
    page.close()
