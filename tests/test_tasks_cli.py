"""
`--task` and boxes in minigpt4-chat and minigpt4-caption, on a tiny MiniGPT-v2: the task identifier goes into the
prompt, and the boxes of an answer are printed (chat) or written to the JSON Lines (caption) in pixels of each image.

A random tiny model does not write boxes, so the language model's output is replaced by a fixed answer (the generated
token ids of that text); the prompt, the processor, the decoding and the box parsing are the real ones.
"""

import io
import json

import pytest
import torch
from PIL import Image

import minigpt4_hf.cli.caption as caption
import minigpt4_hf.cli.chat as chat
from minigpt4_hf.cli.options import UserError
from modeling_minigpt4 import MiniGPT4ForConditionalGeneration


@pytest.fixture
def answer_with(monkeypatch, tiny_v2_saved_dir):
    """Makes `generate` answer `text` (then EOS); returns the prompts it was given, decoded."""
    from processing_minigpt4 import MiniGPT4Processor

    tokenizer = MiniGPT4Processor.from_pretrained(tiny_v2_saved_dir).tokenizer
    prompts = []

    def install(text: str) -> list[str]:
        answer = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

        def fake_generate(self, input_ids=None, streamer=None, **kwargs):
            prompts.extend(tokenizer.batch_decode(input_ids))
            if streamer is not None:  # as generate() feeds a streamer: the prompt, each new token, the end
                streamer.put(input_ids)
                for token in answer:
                    streamer.put(torch.tensor([token]))
                streamer.end()
            return torch.cat([input_ids, torch.tensor([answer] * input_ids.shape[0])], dim=1)

        monkeypatch.setattr(MiniGPT4ForConditionalGeneration, "generate", fake_generate)
        return prompts

    return install


def image_file(folder, name: str, size: tuple[int, int]) -> str:
    path = folder / name
    Image.new("RGB", size, (200, 30, 30)).save(path)
    return str(path)


def test_chat_prints_each_box_in_pixels_after_the_answer(tiny_v2_saved_dir, answer_with, tmp_path, capsys):
    answer_with("<p>a red box</p> {<10><20><50><100>}")
    image = image_file(tmp_path, "wide.png", (200, 100))
    assert chat.main(["--model", str(tiny_v2_saved_dir), "--image", image, "--prompt", "the box",
                      "--task", "refer"]) == 0
    assert capsys.readouterr().out.splitlines() == ["<p>a red box</p> {<10><20><50><100>}",
                                                    "box: a red box (20, 20, 100, 100) px"]


def test_chat_task_starts_the_question_with_its_identifier(tiny_v2_saved_dir, answer_with, tmp_path):
    prompts = answer_with("{<0><0><100><100>}")
    image = image_file(tmp_path, "square.png", (64, 64))
    chat.main(["--model", str(tiny_v2_saved_dir), "--image", image, "--prompt", "the box", "--task", "refer"])
    assert prompts[0].endswith("</Img> [refer] the box [/INST]")


def test_chat_reports_unreadable_box_text_on_stderr(tiny_v2_saved_dir, answer_with, tmp_path, capsys):
    answer_with("it is here {<10><20><50>}")
    image = image_file(tmp_path, "square.png", (64, 64))
    assert chat.main(["--model", str(tiny_v2_saved_dir), "--image", image, "--prompt", "where?",
                      "--task", "refer"]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == ["it is here {<10><20><50>}"]
    assert "[boxes] box '{<10><20><50>}' has 3 numbers" in captured.err


def test_chat_task_command_changes_the_identifier_of_later_questions(tiny_v2_saved_dir, answer_with, tmp_path,
                                                                     monkeypatch, capsys):
    prompts = answer_with("<p>cat</p> {<0><0><50><50>}")
    image = image_file(tmp_path, "square.png", (100, 100))
    monkeypatch.setattr("sys.stdin", io.StringIO("what is it?\n/task grounding\ndescribe it\n/task\nthanks\n"))
    assert chat.main(["--model", str(tiny_v2_saved_dir), "--image", image]) == 0
    last_questions = [prompt.rsplit("[INST] ", 1)[-1] for prompt in prompts]
    assert last_questions[0].endswith("</Img> what is it? [/INST]") and "[refer]" not in last_questions[0]
    assert last_questions[1:] == ["[grounding] describe it [/INST]", "thanks [/INST]"]
    assert capsys.readouterr().out.count("box: cat (0, 0, 50, 50) px") == 3


def test_task_for_a_model_other_than_v2_is_refused_before_loading(tiny_saved_dir, tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("minigpt4_hf.inference.load_model_and_processor", no_loading)
    image = image_file(tmp_path, "square.png", (64, 64))
    with pytest.raises(UserError, match="--task refer: task identifiers are MiniGPT-v2 prompts"):
        chat.main(["--model", str(tiny_saved_dir), "--image", image, "--prompt", "where?", "--task", "refer"])


def test_caption_writes_task_and_pixel_boxes_of_each_image(tiny_v2_saved_dir, answer_with, tmp_path):
    answer_with("<p>sofas</p> {<10><20><30><40>}<delim>{<50><50><100><100>}")
    folder = tmp_path / "images"
    folder.mkdir()
    image_file(folder, "a.png", (200, 100))
    image_file(folder, "b.png", (50, 400))
    output = tmp_path / "boxes.jsonl"
    assert caption.main(["--model", str(tiny_v2_saved_dir), "--images", str(folder), "--output", str(output), "--task",
                         "grounding", "--prompt", "describe this image in detail", "--max-new-tokens", "5"]) == 0
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [line["task"] for line in lines] == ["grounding", "grounding"]
    assert lines[0]["boxes"] == [{"phrase": "sofas", "box": [20, 20, 60, 40]},
                                 {"phrase": "sofas", "box": [100, 50, 200, 100]}]
    assert lines[1]["boxes"] == [{"phrase": "sofas", "box": [5, 80, 15, 160]},
                                 {"phrase": "sofas", "box": [25, 200, 50, 400]}]
    assert "box_problems" not in lines[0]


def test_caption_of_a_vicuna_model_writes_no_boxes(tiny_saved_dir, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    image_file(folder, "a.png", (64, 64))
    output = tmp_path / "captions.jsonl"
    assert caption.main(["--model", str(tiny_saved_dir), "--images", str(folder), "--output", str(output),
                         "--max-new-tokens", "3"]) == 0
    line = json.loads(output.read_text())
    assert "answer" in line and "boxes" not in line and "task" not in line
