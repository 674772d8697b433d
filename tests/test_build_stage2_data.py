"""Stage-2 data building (minigpt4-build-stage2-data + minigpt4_hf.stage2_data): describe, refine, filter, review,
export, and resuming after a kill."""

import csv
import json
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import minigpt4_hf.cli.build_stage2_data as build_stage2_data
import minigpt4_hf.stage2_data as stage2_data
from minigpt4_hf.cli.options import UserError
from minigpt4_hf.journal import Journal
from minigpt4_hf.stage2_data import (
    CONTINUE_PROMPT,
    DESCRIBE_PROMPT,
    FIX_PROMPT,
    DescribeSettings,
    OpenAIChatRefiner,
    RefinerSetupError,
    describe_images,
    filter_items,
    filter_refined,
    final_items,
    looks_english,
    read_review_decisions,
    refine_descriptions,
    remove_repeated_sentences,
    write_review_file,
)


REPO_ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build_stage2_data.py"
TINY_TOKENIZER = REPO_ROOT / "minigpt4_hf" / "assets" / "tiny_tokenizer"

ENGLISH = (
    "The image shows a small red house with a white door. There is a green lawn in front of the house, and a tall "
    "tree stands on the left side of the picture."
)


def english_paragraph(seed: str) -> str:
    return f"In this picture number {seed}, a man is standing near a blue car. " + ENGLISH


# ----------------------------------------------------------------------------------------------------------------
# Helpers: images, journals, a scripted chat-completions server.


def make_images(folder: Path, count: int, formats=("PNG", "JPEG")) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        image_format = formats[index % len(formats)]
        path = folder / f"img{index:03d}.{'png' if image_format == 'PNG' else 'jpg'}"
        pixels = np.full((20 + index, 24, 3), (index * 37) % 256, dtype=np.uint8)
        Image.fromarray(pixels).save(path, format=image_format)
        paths.append(path)
    return paths


def write_describe_journal(work_dir: Path, descriptions: dict[str, str], image_folder: Path | None = None) -> None:
    """A describe journal as the describe step writes it (its images made when a folder is given)."""
    with Journal(work_dir / "describe.jsonl") as journal:
        for index, (image_id, description) in enumerate(descriptions.items()):
            image = (image_folder or work_dir) / f"{image_id}.png"
            if image_folder is not None:
                Image.new("RGB", (16, 12), (index * 40 % 256, 0, 0)).save(image)
            journal.append({"image_id": image_id, "image": str(image), "status": "ok", "description": description})


def write_refine_journal(work_dir: Path, replies: dict[str, str]) -> None:
    with Journal(work_dir / "refine.jsonl") as journal:
        for image_id, reply in replies.items():
            journal.append({"image_id": image_id, "status": "ok", "reply": reply, "finish_reason": "stop"})


class ChatServer:
    """
    An OpenAI-compatible /v1/chat/completions server on 127.0.0.1 with scripted replies per paragraph.

    `script[paragraph]` is a list of actions used one per request: an int (that HTTP status), "slow" (answers after
    `slow_seconds`), "malformed" (200 with a body that is not JSON), or any other string (the reply text). When a
    paragraph's list is used up (or it has none), the reply is `default(paragraph)`.
    """

    def __init__(self, script=None, default=lambda paragraph: paragraph, delay: float = 0.0,
                 slow_seconds: float = 2.0):
        self.script = {key: list(actions) for key, actions in (script or {}).items()}
        self.default = default
        self.delay = delay
        self.slow_seconds = slow_seconds
        self.requests: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                paragraph = body["messages"][-1]["content"]
                with server.lock:
                    server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    actions = server.script.get(paragraph, [])
                    action = actions.pop(0) if actions else None
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    time.sleep(server.delay)
                    if action == "slow":
                        time.sleep(server.slow_seconds)
                        action = None
                    if isinstance(action, int):
                        self.send_response(action)
                        self.send_header("Content-Type", "application/json")
                        self.end_headers()
                        self.wfile.write(b'{"error": {"message": "scripted failure"}}')
                    elif action == "malformed":
                        self.send_response(200)
                        self.end_headers()
                        self.wfile.write(b'{"choices": [ this is not json')
                    else:
                        text = server.default(paragraph) if action is None else action
                        reply = {"choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": text}}]}
                        data = json.dumps(reply).encode()
                        self.send_response(200)
                        self.send_header("Content-Type", "application/json")
                        self.send_header("Content-Length", str(len(data)))
                        self.end_headers()
                        self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout)
                finally:
                    with server.lock:
                        server.in_flight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def count(self, paragraph: str) -> int:
        return sum(1 for request in self.requests if request["body"]["messages"][-1]["content"] == paragraph)

    def __enter__(self) -> "ChatServer":
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def refiner_for(server: ChatServer, **overrides) -> OpenAIChatRefiner:
    options = dict(api_key="sk-test-secret-0123", timeout=0.5, max_retries=3, backoff=0.01, max_backoff=0.05)
    options.update(overrides)
    return OpenAIChatRefiner(server.url, "gpt-test", **options)


def run_refine(work_dir: Path, refiner, **kwargs):
    with Journal(work_dir / "describe.jsonl") as described, Journal(work_dir / "refine.jsonl") as refined:
        counts = refine_descriptions(refiner, described, refined, **kwargs)
        return counts, refined.records


# ----------------------------------------------------------------------------------------------------------------
# describe


def test_describe_asks_the_paper_prompt_then_continue_for_short_answers(tiny_shared, tmp_path, monkeypatch):
    model, processor = tiny_shared
    images = [(path.stem, path) for path in make_images(tmp_path / "images", 3)]
    calls = []
    original = stage2_data.describe_batch

    def spy(model, processor, images, prompts, settings):
        answers = original(model, processor, images, prompts, settings)
        calls.append((list(prompts), answers))
        return answers

    monkeypatch.setattr(stage2_data, "describe_batch", spy)
    settings = DescribeSettings(batch_size=2, max_new_tokens=6, min_answer_tokens=1000, do_sample=False)
    with Journal(tmp_path / "describe.jsonl") as journal:
        assert describe_images(model, processor, images, journal, settings) == 3
        records = journal.records

    # Batches of 2 and 1, each a first turn and then (every answer being under 1000 tokens) a "Continue" turn.
    assert [len(prompts) for prompts, _ in calls] == [2, 2, 1, 1]
    assert calls[0][0] == [DESCRIBE_PROMPT] * 2
    first_answers = calls[0][1] + calls[2][1]
    continuations = calls[1][1] + calls[3][1]
    assert calls[1][0] == [DESCRIBE_PROMPT + answer + CONTINUE_PROMPT for answer in calls[0][1]]
    for (image_id, _), first, second in zip(images, first_answers, continuations):
        record = records[image_id]
        assert record["first_answer"] == first and record["continuation"] == second
        assert record["description"] == f"{first} {second}".strip()
        assert record["first_answer_tokens"] == len(processor.tokenizer(first, add_special_tokens=False)["input_ids"])


def test_describe_prompt_is_bos_then_the_paper_text_with_the_image_tokens(tiny_shared, example_image):
    _, processor = tiny_shared
    ids = processor(images=[example_image], text=[DESCRIBE_PROMPT], return_tensors="pt")["input_ids"][0].tolist()
    assert ids[0] == processor.tokenizer.bos_token_id
    assert ids.count(processor.image_token_id) == processor.num_query_tokens
    text = processor.tokenizer.decode([i for i in ids if i != processor.image_token_id], skip_special_tokens=True)
    assert text.replace(" ", "") == DESCRIBE_PROMPT.replace("<ImageHere>", "").replace(" ", "")


def test_describe_skips_continue_when_the_first_answer_is_long_enough(tiny_shared, tmp_path):
    model, processor = tiny_shared
    images = [(path.stem, path) for path in make_images(tmp_path / "images", 2)]
    settings = DescribeSettings(batch_size=2, max_new_tokens=5, min_answer_tokens=0, do_sample=False)
    with Journal(tmp_path / "describe.jsonl") as journal:
        describe_images(model, processor, images, journal, settings)
    for record in journal.records.values():
        assert record["continuation"] is None and record["description"] == record["first_answer"]


def test_describe_records_an_unreadable_image_instead_of_failing(tiny_shared, tmp_path):
    model, processor = tiny_shared
    paths = make_images(tmp_path / "images", 2)
    broken = tmp_path / "images" / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    images = [(path.stem, path) for path in [broken] + paths]
    settings = DescribeSettings(batch_size=3, max_new_tokens=3, min_answer_tokens=0, do_sample=False)
    with Journal(tmp_path / "describe.jsonl") as journal:
        assert describe_images(model, processor, images, journal, settings) == 2
    assert journal.records["broken"]["status"] == "error"
    assert "broken.jpg" in journal.records["broken"]["error"]
    assert all(journal.records[path.stem]["status"] == "ok" for path in paths)


def test_describe_skips_images_already_in_the_journal(tiny_shared, tmp_path):
    model, processor = tiny_shared
    images = [(path.stem, path) for path in make_images(tmp_path / "images", 3)]
    settings = DescribeSettings(batch_size=2, max_new_tokens=3, min_answer_tokens=0, do_sample=False)
    with Journal(tmp_path / "describe.jsonl") as journal:
        describe_images(model, processor, images[:1], journal, settings)
    with Journal(tmp_path / "describe.jsonl") as journal:
        assert describe_images(model, processor, images, journal, settings) == 2
    lines = (tmp_path / "describe.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["image_id"] for line in lines) == sorted(image_id for image_id, _ in images)


# ----------------------------------------------------------------------------------------------------------------
# refine over HTTP


def test_refiner_url_takes_a_base_url_or_the_full_endpoint():
    url = stage2_data.chat_completions_url
    assert url("https://api.openai.com/v1/") == "https://api.openai.com/v1/chat/completions"
    assert url("http://h:8000/v1/chat/completions") == "http://h:8000/v1/chat/completions"
    with pytest.raises(ValueError, match="http"):
        OpenAIChatRefiner("api.openai.com/v1", "gpt-3.5-turbo")


def test_http_refiner_retries_429_500_and_a_timeout_then_succeeds(tmp_path):
    a, b, c = english_paragraph("a"), english_paragraph("b"), english_paragraph("c")
    write_describe_journal(tmp_path, {"a": a, "b": b, "c": c})
    script = {a: [429, 500, "fixed a"], b: ["slow", "fixed b"], c: [502, 503, 504]}
    with ChatServer(script, slow_seconds=1.5) as server:
        counts, records = run_refine(tmp_path, refiner_for(server, max_retries=3), concurrency=3)
        requests = {paragraph: server.count(paragraph) for paragraph in (a, b, c)}
    assert counts["ok"] == 3 and counts["failed"] == 0
    assert records["a"]["reply"] == "fixed a" and records["a"]["attempts"] == 3
    assert records["b"]["reply"] == "fixed b" and records["b"]["attempts"] == 2
    assert records["c"]["reply"] == c and records["c"]["attempts"] == 4  # 3 errors then the default echo
    assert requests == {a: 3, b: 2, c: 4}


def test_http_refiner_gives_up_after_max_retries_and_records_the_failure(tmp_path):
    a = english_paragraph("a")
    write_describe_journal(tmp_path, {"a": a})
    with ChatServer({a: [503] * 10}) as server:
        counts, records = run_refine(tmp_path, refiner_for(server, max_retries=2))
        assert server.count(a) == 3
    assert counts["failed"] == 1
    assert records["a"]["status"] == "failed" and records["a"]["attempts"] == 3
    assert "HTTP 503" in records["a"]["error"]


def test_http_refiner_records_malformed_json_as_failed_and_a_rerun_retries_only_that_item(tmp_path):
    a, b = english_paragraph("a"), english_paragraph("b")
    write_describe_journal(tmp_path, {"a": a, "b": b})
    with ChatServer({a: ["malformed"]}) as server:
        counts, records = run_refine(tmp_path, refiner_for(server))
        assert server.count(a) == 1  # a malformed reply is not retried within the run
        assert records["a"]["status"] == "failed" and "malformed reply" in records["a"]["error"]
        assert records["b"]["status"] == "ok"
        counts, records = run_refine(tmp_path, refiner_for(server))
        assert (server.count(a), server.count(b)) == (2, 1)
    assert counts["ok"] == 1 and records["a"]["status"] == "ok" and records["a"]["reply"] == a


def test_http_refiner_sends_the_fix_prompt_and_a_bearer_key_that_is_never_stored(tmp_path, monkeypatch, capfd):
    secret = "sk-live-DO-NOT-LEAK-42"
    monkeypatch.setenv("MY_REFINER_KEY", secret)
    images = make_images(tmp_path / "images", 2)
    write_describe_journal(tmp_path / "work", {path.stem: english_paragraph(path.stem) for path in images})
    with ChatServer({english_paragraph(images[0].stem): [500, 401]}) as server:
        config = stage2_data.BuildConfig(
            work_dir=str(tmp_path / "work"), steps=("refine",), refiner_url=server.url, refiner_model="gpt-test",
            api_key_env="MY_REFINER_KEY", retry_backoff=0.01, concurrency=1,
        )
        with pytest.raises(RefinerSetupError, match="HTTP 401"):
            stage2_data.run(config)
        request = server.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == f"Bearer {secret}"
    assert request["body"]["model"] == "gpt-test"
    assert request["body"]["messages"][0] == {"role": "system", "content": FIX_PROMPT}
    assert request["body"]["messages"][1]["role"] == "user"
    written = "".join(path.read_text(errors="replace") for path in tmp_path.rglob("*") if path.is_file()
                      and path.suffix != ".png")
    captured = capfd.readouterr()
    assert secret not in written + captured.out + captured.err


def test_http_refiner_keeps_at_most_concurrency_requests_in_flight(tmp_path):
    descriptions = {f"i{index}": english_paragraph(str(index)) for index in range(8)}
    write_describe_journal(tmp_path, descriptions)
    with ChatServer(delay=0.1) as server:
        counts, _ = run_refine(tmp_path, refiner_for(server), concurrency=3)
    assert counts["ok"] == 8
    assert server.max_in_flight == 3


def test_fix_prompt_is_the_papers_verbatim():
    assert FIX_PROMPT == (
        "Fix the error in the given paragraph. Remove any repeating sentences, meaningless characters, not English "
        "sentences, and so on. Remove unnecessary repetition. Rewrite any incomplete sentences. Return directly the "
        "results without explanation. Return directly the input paragraph if it is already correct without "
        "explanation."
    )


# ----------------------------------------------------------------------------------------------------------------
# refine with a local causal LM


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    """A tiny random LLaMA saved with assets/tiny_tokenizer (no chat template)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_local_refiner_refines_every_description_in_batches(tiny_llama_dir, tmp_path):
    descriptions = {f"i{index}": english_paragraph(str(index)) for index in range(3)}
    write_describe_journal(tmp_path, descriptions)
    refiner = stage2_data.LocalLMRefiner(str(tiny_llama_dir), max_new_tokens=4, temperature=0)
    assert refiner.prompt_for("PARAGRAPH") == (f"{FIX_PROMPT}\n\nPARAGRAPH\n\n", False)
    counts, records = run_refine(tmp_path, refiner, batch_size=2)
    assert counts["ok"] == 3
    single = refiner.refine_batch([descriptions["i2"]])[0]
    for image_id in descriptions:
        assert records[image_id]["status"] == "ok" and isinstance(records[image_id]["reply"], str)
        assert records[image_id]["finish_reason"] in ("stop", "length")
    assert records["i2"]["reply"] == single.text  # greedy: batching (left padding) does not change the reply


def test_local_refiner_puts_the_fix_prompt_in_the_chat_templates_system_message(tiny_llama_dir, tmp_path):
    from transformers import AutoTokenizer

    folder = tmp_path / "with_template"
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    tokenizer.save_pretrained(folder)
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((tiny_llama_dir / name).read_bytes())
    refiner = stage2_data.LocalLMRefiner(str(folder), max_new_tokens=3, temperature=0)
    text, rendered = refiner.prompt_for("PARAGRAPH")
    assert rendered and text == f"<|system|>{FIX_PROMPT}\n<|user|>PARAGRAPH\n<|assistant|>"
    assert len(refiner.refine_batch(["PARAGRAPH", "another one"])) == 2


# ----------------------------------------------------------------------------------------------------------------
# filter: the paper's rules


@pytest.mark.parametrize("reply", [
    "I'm sorry, I made a mistake. The image shows a house with a red roof and a small garden.",
    "I apologize for that. Here is the corrected paragraph: a dog runs on the grass near a tree.",
    "My apologies, the paragraph above describes a street with cars and people walking around.",
    "As an AI language model, I cannot see the image, but the text describes a busy street.",
])
def test_filter_drops_apologies_and_self_corrections(reply):
    decision = filter_refined(ENGLISH, reply)
    assert (decision.keep, decision.reason) == (False, "apology")


def test_filter_keeps_the_original_when_the_refiner_says_it_is_already_correct():
    decision = filter_refined(ENGLISH, "The paragraph is already correct.")
    assert decision.keep and decision.text == ENGLISH


def test_filter_drops_already_correct_replies_that_mention_repetition():
    decision = filter_refined(ENGLISH, "The paragraph is already correct, apart from the repetition.")
    assert (decision.keep, decision.reason) == (False, "already_correct_with_repetition")


def test_filter_drops_incomplete_replies():
    decision = filter_refined(ENGLISH, "The given paragraph is incomplete, so it cannot be fixed without more text.")
    assert (decision.keep, decision.reason) == (False, "incomplete")


def test_filter_drops_texts_under_50_characters():
    assert filter_refined(ENGLISH, "A small red house with a door.").reason == "too_short"
    assert filter_refined(ENGLISH, "A small red house with a white door and a green lawn.").keep  # 53 characters


def test_filter_removes_repeated_sentences():
    reply = f"{ENGLISH} The image shows a small red house with a white door! A dog sleeps on the lawn."
    decision = filter_refined(ENGLISH, reply)
    assert decision.keep and decision.sentences_removed == 1
    assert decision.text == ENGLISH + " A dog sleeps on the lawn."
    assert remove_repeated_sentences("One. Two.\nOne. Three.") == ("One. Two.\nThree.", 1)


@pytest.mark.parametrize("text", [
    "La imagen muestra una pequeña casa roja con una puerta blanca. Hay un césped verde delante de la casa.",
    "Das Bild zeigt ein kleines rotes Haus mit einer weißen Tür. Vor dem Haus ist ein grüner Rasen zu sehen.",
    "L'image montre une petite maison rouge avec une porte blanche. Il y a une pelouse verte devant la maison.",
    "图片中有一座红色的小房子，房子前面有一片绿色的草坪，左边有一棵高大的树。这是一个阳光明媚的日子。"
    "一个男人站在蓝色的汽车旁边，他穿着白色的衬衫。",
    "Qrx blorp zint vlek mupt drazzo fenkel ossip, trubo kwan delmo ristaf plunk vorrin sked gloam tiv.",
])
def test_filter_drops_text_that_is_not_english(text):
    assert not looks_english(text)
    assert filter_refined(ENGLISH, text).reason == "not_english"


def test_language_check_accepts_english_with_a_few_accents():
    assert looks_english(ENGLISH + " A sign above the café reads 'Crème brûlée'.")


def test_filter_drops_replies_cut_by_the_refiners_token_limit():
    assert filter_refined(ENGLISH, ENGLISH, finish_reason="length").reason == "refiner_truncated"


def test_filter_step_records_every_drop_with_its_reason_and_skips_filtered_items(tmp_path):
    write_describe_journal(tmp_path, {"good": ENGLISH, "sorry": ENGLISH, "short": ENGLISH, "failed": ENGLISH})
    write_refine_journal(tmp_path, {"good": ENGLISH, "sorry": "I'm sorry, I cannot do that for this text.",
                                    "short": "Too short."})
    with Journal(tmp_path / "refine.jsonl") as refined:
        refined.append({"image_id": "failed", "status": "failed", "error": "HTTP 500"})
    with Journal(tmp_path / "describe.jsonl") as d, Journal(tmp_path / "refine.jsonl") as r, \
            Journal(tmp_path / "filter.jsonl") as f:
        assert filter_items(d, r, f) == {"kept": 1, "apology": 1, "too_short": 1}
        assert filter_items(d, r, f) == {}
        assert {key: (value["keep"], value["reason"]) for key, value in f.records.items()} == {
            "good": (True, None), "sorry": (False, "apology"), "short": (False, "too_short")}


# ----------------------------------------------------------------------------------------------------------------
# review and export


@pytest.fixture
def filtered_work_dir(tmp_path):
    """A work folder whose items went through every step: a, b kept; c dropped as an apology."""
    work = tmp_path / "work"
    descriptions = {"a": english_paragraph("a"), "b": english_paragraph("b"), "c": english_paragraph("c")}
    write_describe_journal(work, descriptions, image_folder=tmp_path)
    write_refine_journal(work, {"a": descriptions["a"], "b": descriptions["b"], "c": "I apologize, I cannot."})
    with Journal(work / "describe.jsonl") as d, Journal(work / "refine.jsonl") as r, \
            Journal(work / "filter.jsonl") as f:
        filter_items(d, r, f)
    return work


def journals(work: Path):
    return [Journal(work / f"{step}.jsonl") for step in ("describe", "refine", "filter")]


def test_review_file_lists_every_filtered_item_with_a_keep_column(filtered_work_dir):
    path = filtered_work_dir / "review.tsv"
    described, _, filtered = journals(filtered_work_dir)
    assert write_review_file(path, described, filtered) == 3
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert [(row["image_id"], row["keep"], row["reason"]) for row in rows] == [
        ("a", "1", ""), ("b", "1", ""), ("c", "0", "apology")]
    assert rows[0]["image"] == described.records["a"]["image"] and rows[0]["text"] == english_paragraph("a")


def test_review_decisions_drop_edit_and_restore_items(filtered_work_dir):
    path = filtered_work_dir / "review.csv"
    described, refined, filtered = journals(filtered_work_dir)
    write_review_file(path, described, filtered)
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    rows[0]["text"] = "An edited description of a red house with a white door and a green lawn."
    rows[1]["keep"] = "0"
    rows[2]["keep"] = "yes"
    rows[2]["text"] = english_paragraph("c, restored")
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    items, summary = final_items(described, refined, filtered, read_review_decisions(path))
    assert [(image_id, text) for image_id, _, text in items] == [
        ("a", rows[0]["text"]), ("c", english_paragraph("c, restored"))]
    assert summary["dropped"] == {"review": 1}
    assert (summary["review_texts_edited"], summary["review_restored"]) == (2, 1)


def test_review_decisions_with_a_bad_keep_value_name_the_line(tmp_path):
    path = tmp_path / "review.tsv"
    path.write_text("image_id\tkeep\ttext\na\t1\tfine text\nb\tmaybe\tother\n")
    with pytest.raises(ValueError, match=r"line 3: keep is 'maybe'"):
        read_review_decisions(path)
    path.write_text("id\tdecision\n")
    with pytest.raises(ValueError, match="no image_id / keep column"):
        read_review_decisions(path)


def test_export_without_review_keeps_what_the_filter_kept(filtered_work_dir, tmp_path):
    import datasets

    described, refined, filtered = journals(filtered_work_dir)
    items, summary = final_items(described, refined, filtered, image_ids=["a", "b", "c", "never_described"])
    stage2_data.export_dataset(items, summary, tmp_path / "out")

    annotations = json.loads((tmp_path / "out" / "cc_sbu_align" / "filter_cap.json").read_text())["annotations"]
    assert annotations == [{"image_id": "a", "caption": english_paragraph("a")},
                           {"image_id": "b", "caption": english_paragraph("b")}]
    for image_id in ("a", "b"):
        with Image.open(tmp_path / "out" / "cc_sbu_align" / "image" / f"{image_id}.jpg") as image:
            assert image.format == "JPEG" and image.mode == "RGB" and image.size == (16, 12)
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved == summary
    assert (saved["items_in"], saved["items_out"], saved["dropped"], saved["pending"]) == (
        4, 2, {"apology": 1}, {"not_described": 1})
    dataset = datasets.load_from_disk(str(tmp_path / "out" / "hf_dataset"))
    assert dataset["image_id"] == ["a", "b"] and dataset["caption"] == [english_paragraph("a"), english_paragraph("b")]
    assert dataset[0]["image"].size == (16, 12)
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["cc_sbu_align", "hf_dataset", "summary.json"]


def test_export_copies_jpegs_unchanged(tmp_path):
    source = make_images(tmp_path / "images", 2)[1]  # the JPEG one
    stage2_data.export_dataset([("x", source, ENGLISH)], {"items_in": 1}, tmp_path / "out")
    assert (tmp_path / "out" / "cc_sbu_align" / "image" / "x.jpg").read_bytes() == source.read_bytes()


def test_export_refuses_to_write_an_empty_dataset(tmp_path):
    with pytest.raises(ValueError, match="Nothing to export"):
        stage2_data.export_dataset([], {"items_in": 3}, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_names_a_missing_image_and_leaves_the_previous_export_whole(tmp_path):
    source = make_images(tmp_path / "images", 1)[0]
    stage2_data.export_dataset([("x", source, ENGLISH)], {"items_in": 1}, tmp_path / "out")
    with pytest.raises(ValueError, match="item 'gone'"):
        stage2_data.export_dataset([("x", source, ENGLISH), ("gone", tmp_path / "gone.png", ENGLISH)],
                                   {"items_in": 2}, tmp_path / "out")
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["cc_sbu_align", "hf_dataset", "summary.json"]
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == {"items_in": 1}


def test_push_to_hub_uploads_the_dataset_and_summary(filtered_work_dir, tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    pushed, uploaded = [], []
    monkeypatch.setattr(datasets.Dataset, "push_to_hub",
                        lambda self, repo_id, **kwargs: pushed.append((repo_id, len(self), kwargs)))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_file", lambda self, **kwargs: uploaded.append(kwargs))
    described, refined, filtered = journals(filtered_work_dir)
    items, summary = final_items(described, refined, filtered)
    stage2_data.export_dataset(items, summary, tmp_path / "out", push_to_hub="me/my-align", private=True)
    assert [(repo, rows, kwargs["private"]) for repo, rows, kwargs in pushed] == [("me/my-align", 2, True)]
    assert uploaded[0]["repo_id"] == "me/my-align" and uploaded[0]["repo_type"] == "dataset"
    assert uploaded[0]["path_in_repo"] == "build_summary.json"


# ----------------------------------------------------------------------------------------------------------------
# The journal and resuming


def test_a_second_run_on_the_same_work_dir_is_refused_while_one_runs(tmp_path):
    with stage2_data.WorkDirLock(tmp_path):
        config = stage2_data.BuildConfig(work_dir=str(tmp_path), steps=("filter",))
        with pytest.raises(ValueError, match="Another build is running"):
            stage2_data.run(config)
    assert stage2_data.run(config) is None  # free again


def journal_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def kill_when(process: subprocess.Popen, journal: Path, lines: int, timeout: float = 120.0) -> None:
    """SIGKILLs `process` once `journal` holds at least `lines` records."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if journal.exists() and journal.read_bytes().count(b"\n") >= lines:
            process.send_signal(signal.SIGKILL)
            process.wait()
            return
        time.sleep(0.02)
    process.kill()
    pytest.fail(f"the run ended (rc {process.returncode}) before {journal.name} had {lines} lines")


def test_kill_during_describe_then_rerun_finishes_without_redoing_items(tiny_saved_dir, tmp_path):
    make_images(tmp_path / "images", 12)
    command = [sys.executable, str(BUILD_SCRIPT), "--steps", "describe", "--images", str(tmp_path / "images"),
               "--model", str(tiny_saved_dir), "--work-dir", str(tmp_path / "work"), "--batch-size", "1",
               "--max-new-tokens", "24", "--min-answer-tokens", "0", "--no-sample"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = tmp_path / "work" / "describe.jsonl"
    kill_when(process, journal, lines=3)
    assert process.returncode == -signal.SIGKILL
    before = journal_lines(journal)
    assert 3 <= len(before) < 12

    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    after = journal_lines(journal)
    assert after[: len(before)] == before  # finished items were kept, not redone
    assert sorted(record["image_id"] for record in after) == [f"img{index:03d}" for index in range(12)]


def test_kill_during_refine_then_rerun_requests_only_unfinished_items(tmp_path):
    descriptions = {f"i{index:02d}": english_paragraph(str(index)) for index in range(16)}
    write_describe_journal(tmp_path / "work", descriptions)
    with ChatServer(delay=0.15) as server:
        command = [sys.executable, str(BUILD_SCRIPT), "--steps", "refine", "--work-dir", str(tmp_path / "work"),
                   "--refiner-url", server.url, "--refiner-model", "gpt-test", "--concurrency", "2"]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        journal = tmp_path / "work" / "refine.jsonl"
        kill_when(process, journal, lines=4)
        finished = {record["image_id"] for record in journal_lines(journal)}
        result = subprocess.run(command, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
        requests = {image_id: server.count(text) for image_id, text in descriptions.items()}
    records = journal_lines(journal)
    assert sorted(record["image_id"] for record in records) == sorted(descriptions)  # one record per item
    assert all(requests[image_id] == 1 for image_id in finished)
    assert sum(requests.values()) <= len(descriptions) + 2  # at most the 2 requests in flight were lost


# ----------------------------------------------------------------------------------------------------------------
# The command


def test_one_command_runs_every_step_and_a_rerun_redoes_nothing(tiny_saved_dir, tmp_path, capsys):
    make_images(tmp_path / "images", 4)
    replies = iter(["I'm sorry, I made a mistake.", english_paragraph("x"), "The paragraph is already correct.",
                    english_paragraph("y")])
    lock = threading.Lock()

    def reply(paragraph):
        with lock:
            return next(replies)

    with ChatServer(default=reply) as server:
        argv = ["--images", str(tmp_path / "images"), "--model", str(tiny_saved_dir), "--refiner-url", server.url,
                "--refiner-model", "gpt-test", "--work-dir", str(tmp_path / "work"), "--output-dir",
                str(tmp_path / "out"), "--max-new-tokens", "40", "--min-answer-tokens", "0", "--concurrency", "1"]
        assert build_stage2_data.main(argv) == 0
        assert build_stage2_data.main(argv) == 0
        assert len(server.requests) == 4
    out = capsys.readouterr().out
    assert "items in: 4" in out and "items out:" in out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    # The "already correct" item keeps the tiny model's gibberish description: not English (or short).
    assert summary["dropped"] in ({"apology": 1, "not_english": 1}, {"apology": 1, "too_short": 1})
    assert summary["items_out"] == 2
    annotations = json.loads((tmp_path / "out" / "cc_sbu_align" / "filter_cap.json").read_text())["annotations"]
    assert sorted(a["caption"] for a in annotations) == sorted([english_paragraph("x"), english_paragraph("y")])
    for name in ("describe", "refine", "filter"):
        assert len(journal_lines(tmp_path / "work" / f"{name}.jsonl")) == 4


def test_command_names_missing_flags(tmp_path):
    with pytest.raises(UserError, match=r"--refiner-url URL \(with --refiner-model\) or --refiner-local PATH"):
        build_stage2_data.main(["--work-dir", str(tmp_path), "--steps", "refine"])
    with pytest.raises(UserError, match="--output-dir"):
        build_stage2_data.main(["--work-dir", str(tmp_path), "--steps", "export"])
    with pytest.raises(SystemExit):
        build_stage2_data.main(["--work-dir", str(tmp_path), "--steps", "describe,typo"])


# ----------------------------------------------------------------------------------------------------------------
# The export trains


@pytest.fixture(scope="module")
def exported_dir(tmp_path_factory):
    """An export of three kept items (built from journals), as the export step writes it."""
    root = tmp_path_factory.mktemp("export")
    work = root / "work"
    descriptions = {f"id{index}": english_paragraph(str(index)) for index in range(3)}
    write_describe_journal(work, descriptions, image_folder=root)
    write_refine_journal(work, descriptions)
    with Journal(work / "describe.jsonl") as d, Journal(work / "refine.jsonl") as r, \
            Journal(work / "filter.jsonl") as f:
        filter_items(d, r, f)
        items, summary = final_items(d, r, f)
    stage2_data.export_dataset(items, summary, root / "out")
    return root / "out"


@pytest.mark.parametrize("part", ["cc_sbu_align", "hf_dataset"])
def test_the_export_trains_with_train_py_stage_2(exported_dir, tiny_saved_dir, tmp_path, part):
    import minigpt4_hf.cli.train as train
    result = train.main([
        "--stage", "2", "--model", str(tiny_saved_dir), "--data-path", str(exported_dir / part),
        "--output_dir", str(tmp_path / "stage2"), "--max_steps", "2", "--per_device_train_batch_size", "2",
        "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1", "--dataloader_num_workers", "0",
    ])
    assert result["global_step"] == 2 and result["skipped_images"] == {}
    assert all(np.isfinite(entry["loss"]) for entry in result["log_history"] if "loss" in entry)
    assert (tmp_path / "stage2" / "config.json").is_file()
