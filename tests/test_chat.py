"""minigpt4-chat and the shared inference logic (minigpt4_hf.inference): the original Chat on generate()."""

import io
import os
import subprocess
import sys

import pytest
import torch
from transformers import set_seed

import minigpt4_hf.cli.chat as chat
import minigpt4_hf.inference as inference
from minigpt4_hf.cli.options import UserError, generation_kwargs_from_args
from minigpt4_hf.inference import CHAT_GENERATION_DEFAULTS, Conversation, TextBeforeSeparator
from conftest import REPO_ROOT
from minigpt4_hf.random_models import EXAMPLE_IMAGE
from processing_minigpt4 import TURN_SEPARATOR


OTHER_IMAGE = REPO_ROOT / "tests" / "fixtures" / "original_tiny" / "inputs" / "coffee.png"
GREEDY = {"do_sample": False, "max_new_tokens": 6, "num_beams": 1, "repetition_penalty": 1.0}


def run_chat(*args, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "chat.py"), *map(str, args)],
        input=stdin, capture_output=True, text=True, timeout=180, cwd=REPO_ROOT,
    )


def user_texts(conversation: Conversation) -> list[str]:
    return [part["text"] for message in conversation.messages if message["role"] == "user"
            for part in message["content"] if part["type"] == "text"]


# -- the command line -----------------------------------------------------------------------------------------------


def test_prompt_mode_prints_only_the_answer_and_exits_0(tiny_saved_dir, tiny_shared):
    result = run_chat("--model", tiny_saved_dir, "--image", EXAMPLE_IMAGE, "--prompt", "What is in this image?",
                      "--no-sample", "--max-new-tokens", 6)

    conversation = Conversation(*tiny_shared, generation_kwargs=GREEDY)
    conversation.upload_image(EXAMPLE_IMAGE)
    conversation.ask("What is in this image?")
    expected = conversation.answer()
    assert result.returncode == 0, result.stderr
    assert expected
    assert result.stdout == expected + "\n"


def test_interactive_mode_answers_piped_questions_and_follows_image_and_reset(tiny_saved_dir, tiny_shared):
    lines = ["What is in this image?", "And the colours?", "/image missing.png", f"/image {OTHER_IMAGE}",
             "Describe it.", "/reset", "Once more?", "/quit", "never answered"]
    result = run_chat("--model", tiny_saved_dir, "--image", EXAMPLE_IMAGE, "--no-sample", "--max-new-tokens", 6,
                      stdin="\n".join(lines) + "\n")

    # The same session through the Conversation API: /image = new_image, /reset = reset(keep_images=True).
    conversation = Conversation(*tiny_shared, generation_kwargs=GREEDY)
    conversation.upload_image(EXAMPLE_IMAGE)
    expected = []
    for step in ["What is in this image?", "And the colours?", ("image", OTHER_IMAGE), "Describe it.", "reset",
                 "Once more?"]:
        if step == "reset":
            conversation.reset(keep_images=True)
        elif isinstance(step, tuple):
            conversation.new_image(step[1])
        else:
            conversation.ask(step)
            expected.append(conversation.answer())
    assert result.returncode == 0, result.stderr
    assert result.stdout == "".join(answer + "\n" for answer in expected)
    assert "Image file not found: missing.png" in result.stderr
    assert f"New image {OTHER_IMAGE}: conversation restarted" in result.stderr
    assert "Conversation restarted. Same image" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("flag", ["--load-in-8bit", "--load-in-4bit"])
def test_quantisation_flag_without_cuda_is_a_user_error(tiny_saved_dir, flag):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UserError, match=f"{flag} needs an NVIDIA GPU with CUDA"):
        chat.main(["--model", str(tiny_saved_dir), "--image", str(EXAMPLE_IMAGE), "--prompt", "Hi", flag])


def test_a_hub_id_that_does_not_exist_is_reported_as_a_missing_folder():
    with pytest.raises(UserError, match="--model someone/no-such-model: no such folder, and no model of that name"):
        chat.main(["--model", "someone/no-such-model", "--image", str(EXAMPLE_IMAGE), "--prompt", "Hi"])


def test_an_image_file_that_does_not_decode_is_a_user_error_before_loading(tiny_saved_dir, tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(UserError, match="notes.png"):
        chat.main(["--model", str(tiny_saved_dir), "--image", str(tmp_path / "notes.png"), "--prompt", "Hi"])


def test_a_model_folder_without_a_saved_model_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="has no config.json"):
        chat.main(["--model", str(tmp_path), "--image", str(EXAMPLE_IMAGE), "--prompt", "Hi"])


def test_prompt_without_image_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        chat.main(["--model", "unused", "--prompt", "Hi"])
    assert exit_info.value.code == 2
    assert "add --image FILE" in capsys.readouterr().err


def test_cuda_device_without_cuda_is_a_user_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UserError, match="use --device cpu"):
        inference.resolve_device("cuda")


# -- flags ----------------------------------------------------------------------------------------------------------


def test_generation_defaults_are_the_original_chats():
    args = chat.parse_args(["--model", "m"])
    assert generation_kwargs_from_args(args) == CHAT_GENERATION_DEFAULTS


def test_no_sample_turns_sampling_off_and_drops_sampling_settings():
    args = chat.parse_args(["--model", "m", "--no-sample", "--num-beams", "3"])
    assert generation_kwargs_from_args(args) == {
        "max_new_tokens": 300, "num_beams": 3, "do_sample": False, "repetition_penalty": 1.0}


def test_quantisation_config_keeps_vision_qformer_queries_and_projection_unquantised():
    for flag in ("load_in_8bit", "load_in_4bit"):
        config = inference.quantization_config_for(**{"load_in_8bit": False, "load_in_4bit": False, flag: True})
        assert {"vision_model", "qformer", "query_tokens", "language_projection"} <= set(config.llm_int8_skip_modules)
        assert config.load_in_8bit == (flag == "load_in_8bit")
        assert config.load_in_4bit == (flag == "load_in_4bit")
    assert inference.quantization_config_for(load_in_8bit=False, load_in_4bit=False) is None


# -- the Conversation -----------------------------------------------------------------------------------------------


def test_first_question_joins_the_image_turn_as_in_the_original(tiny_shared):
    conversation = Conversation(*tiny_shared, generation_kwargs=GREEDY)
    conversation.upload_image(EXAMPLE_IMAGE)
    conversation.ask("What is in this image?")
    conversation.answer()

    assert conversation.last_prompt.endswith(
        "###Human: <Img><ImageHere></Img> What is in this image?###Assistant: ")


def test_second_question_prompt_contains_the_first_answer(tiny_shared):
    conversation = Conversation(*tiny_shared, generation_kwargs=GREEDY)
    conversation.upload_image(EXAMPLE_IMAGE)
    conversation.ask("What is in this image?")
    first = conversation.answer()
    conversation.ask("Why?")
    second = conversation.answer()

    assert first
    assert conversation.last_prompt.endswith(f"Assistant: {first}###Human: Why?###Assistant: ")
    assert [m["role"] for m in conversation.messages] == ["user", "assistant", "user", "assistant"]
    assert conversation.messages[-1]["content"][0]["text"] == second


def test_new_image_restarts_the_conversation(tiny_shared, example_image):
    conversation = Conversation(*tiny_shared, generation_kwargs=GREEDY)
    conversation.upload_image(example_image)
    conversation.ask("What is in this image?")
    conversation.answer()
    conversation.new_image(OTHER_IMAGE)

    assert conversation.messages == [{"role": "user", "content": [{"type": "image"}]}]
    assert len(conversation.images) == 1 and conversation.images[0].size == (600, 400)  # coffee.png


def test_new_image_with_a_bad_path_changes_nothing(tiny_shared, tmp_path):
    conversation = Conversation(*tiny_shared, generation_kwargs=GREEDY)
    conversation.upload_image(EXAMPLE_IMAGE)
    conversation.ask("What is in this image?")
    before = [dict(m) for m in conversation.messages]
    with pytest.raises(ValueError, match="Image file not found"):
        conversation.new_image(tmp_path / "missing.jpg")
    assert conversation.messages == before and len(conversation.images) == 1


def test_reset_keeping_images_starts_over_with_the_same_image(tiny_shared):
    conversation = Conversation(*tiny_shared, generation_kwargs=GREEDY)
    conversation.upload_image(EXAMPLE_IMAGE)
    image = conversation.images[0]
    conversation.ask("What is in this image?")
    conversation.answer()
    conversation.reset(keep_images=True)
    assert conversation.messages == [{"role": "user", "content": [{"type": "image"}]}]
    assert conversation.images == [image]
    conversation.reset()
    assert conversation.messages == [] and conversation.images == []


def test_answer_without_a_question_is_refused(tiny_shared):
    conversation = Conversation(*tiny_shared, generation_kwargs=GREEDY)
    conversation.upload_image(EXAMPLE_IMAGE)
    with pytest.raises(ValueError, match="ask a question"):
        conversation.answer()


def test_streamed_text_is_the_stored_answer(tiny_shared):
    conversation = Conversation(*tiny_shared, generation_kwargs={**GREEDY, "max_new_tokens": 12})
    conversation.upload_image(EXAMPLE_IMAGE)
    conversation.ask("What is in this image?")
    streamed = "".join(conversation.stream_answer())

    reference = Conversation(*tiny_shared, generation_kwargs={**GREEDY, "max_new_tokens": 12})
    reference.upload_image(EXAMPLE_IMAGE)
    reference.ask("What is in this image?")
    assert streamed == conversation.messages[-1]["content"][0]["text"] == reference.answer()


def test_beam_search_streams_the_whole_answer_at_once(tiny_shared):
    conversation = Conversation(*tiny_shared, generation_kwargs={**GREEDY, "num_beams": 2})
    conversation.upload_image(EXAMPLE_IMAGE)
    conversation.ask("What is in this image?")
    pieces = list(conversation.stream_answer())
    assert pieces == [conversation.messages[-1]["content"][0]["text"]]


def test_same_seed_gives_the_same_sampled_answer(tiny_shared):
    answers = []
    for _ in range(2):
        conversation = Conversation(*tiny_shared, generation_kwargs={**CHAT_GENERATION_DEFAULTS, "max_new_tokens": 8})
        conversation.upload_image(EXAMPLE_IMAGE)
        conversation.ask("What is in this image?")
        set_seed(7)
        answers.append(conversation.answer())
    assert answers[0] == answers[1]


def test_stream_filter_hides_the_turn_separator_even_when_split_across_pieces():
    visible = TextBeforeSeparator(TURN_SEPARATOR)
    shown = [visible.feed(piece) for piece in [" A", " cat #", "#", "# Human: more"]]
    assert shown == ["A", " cat", "", ""]
    assert visible.flush() == ""


def test_stream_filter_shows_a_held_back_tail_when_no_separator_follows():
    unfinished = TextBeforeSeparator(TURN_SEPARATOR)
    assert unfinished.feed("score ##") == "score"
    assert unfinished.feed(" 9 ") == " ## 9"
    assert unfinished.flush() == ""


def test_long_conversations_drop_the_oldest_turns_with_a_notice(tiny_shared):
    notices = []
    model, processor = tiny_shared
    single_turn = processor(images=[EXAMPLE_IMAGE], text=processor.apply_chat_template(
        [inference.user_message("Question number 0?")], add_generation_prompt=True))["input_ids"][0]
    budget = len(single_turn) + 30  # room for about one more exchange
    conversation = Conversation(model, processor, generation_kwargs=GREEDY, context_budget=budget,
                                notify=notices.append)
    conversation.upload_image(EXAMPLE_IMAGE)
    for number in range(4):
        conversation.ask(f"Question number {number}?")
        conversation.answer()

    assert any("dropped the oldest" in notice for notice in notices)
    assert "Question number 0?" not in user_texts(conversation)
    assert user_texts(conversation)[-1] == "Question number 3?"
    assert conversation.messages[0]["content"][0] == {"type": "image"}  # the image stays
    assert conversation.last_prompt.count("<ImageHere>") == 1
    prompt_tokens = processor(images=conversation.images, text=conversation.last_prompt)["input_ids"][0]
    assert len(prompt_tokens) + GREEDY["max_new_tokens"] <= budget


def test_a_prompt_longer_than_the_context_is_one_error_line(tiny_saved_dir):
    with pytest.raises(UserError) as refusal:
        chat.main(["--model", str(tiny_saved_dir), "--image", str(EXAMPLE_IMAGE), "--no-sample",
                   "--prompt", " ".join(["word"] * 3000)])
    message = str(refusal.value)
    assert "more than the 2000-token context" in message and "\n" not in message


def test_an_interactive_chat_outgrowing_the_context_drops_the_oldest_turns_and_says_so(
    tiny_saved_dir, tiny_shared, monkeypatch, capsys
):
    questions = ["What is in this image?", "Where is it?", "What colour is it?"]
    conversation = Conversation(*tiny_shared, generation_kwargs=GREEDY, context_budget=10_000)
    conversation.upload_image(EXAMPLE_IMAGE)
    for question in questions:
        conversation.ask(question)
        conversation.answer()
    full_prompt = tiny_shared[1](images=conversation.images, text=conversation.last_prompt)["input_ids"][0]
    budget = len(full_prompt) + GREEDY["max_new_tokens"] - 1  # every turn but the last fits
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(questions) + "\n"))

    status = chat.main(["--model", str(tiny_saved_dir), "--image", str(EXAMPLE_IMAGE), "--no-sample",
                        "--max-new-tokens", str(GREEDY["max_new_tokens"]), "--max-context-tokens", str(budget)])

    notices = capsys.readouterr().err
    assert status == 0
    assert f"The conversation no longer fits the {budget}-token context" in notices
    assert "dropped the oldest 1 turn(s)" in notices


def test_a_question_too_long_for_the_context_is_refused_and_withdrawn(tiny_shared):
    conversation = Conversation(*tiny_shared, generation_kwargs=GREEDY, context_budget=40)
    conversation.upload_image(EXAMPLE_IMAGE)
    conversation.ask("What is in this image?")
    with pytest.raises(ValueError, match="more than the 40-token context"):
        conversation.answer()
    assert conversation.messages == [{"role": "user", "content": [{"type": "image"}]}]


def test_readme_pipeline_snippet_answers(tiny_saved_dir):
    from transformers import pipeline

    pipe = pipeline("image-text-to-text", model=str(tiny_saved_dir), trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image", "url": str(EXAMPLE_IMAGE)},
                                             {"type": "text", "text": "What is in this image?"}]}]
    output = pipe(text=messages, max_new_tokens=6, do_sample=False, return_full_text=False)
    assert isinstance(output[0]["generated_text"], str) and output[0]["generated_text"]
    assert os.environ.get("HF_MODULES_CACHE")  # remote code went to the tests' throwaway cache
