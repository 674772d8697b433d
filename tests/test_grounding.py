"""
MiniGPT-v2 boxes: `processor.post_process_grounding` reads `<p>phrase</p> {<x1><y1><x2><y2>}` answers into pixel
boxes of the original image, reports malformed box text instead of raising, and `format_box` writes a pixel box as
box text. Acceptance: a converted tiny MiniGPT-v2 answers a `[refer]` prompt through `pipeline("image-text-to-text")`.
"""

import pytest
import torch
from PIL import Image
from test_parity_variants import VARIANTS
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

from conftest import ORIGINAL_TINY
from minigpt4_hf.random_models import build_random_model
from processing_minigpt4 import format_box, parse_grounded_answer


SIZE = (200, 100)  # width, height of the original image


def boxes(text: str, image_size=SIZE) -> list[dict]:
    return list(parse_grounded_answer(text, image_size))


# ---------------------------------------------------------------------------------------------------------------------
# Reading answers.


def test_a_bare_box_is_a_phrase_less_box_in_pixels():
    assert boxes("{<4><0><92><100>}") == [{"phrase": None, "box": (8.0, 0.0, 184.0, 100.0)}]


def test_grid_coordinates_scale_to_the_original_width_and_height():
    [found] = boxes("{<50><50><100><100>}", image_size=(451, 300))
    assert found["box"] == (225.5, 150.0, 451.0, 300.0)


def test_each_phrase_gets_its_own_box_in_a_grounded_caption():
    answer = "<p>An astronaut</p> {<18><6><86><100>} poses in front of <p>a flag</p> {<0><0><38><52>}."
    assert boxes(answer) == [
        {"phrase": "An astronaut", "box": (36.0, 6.0, 172.0, 100.0)},
        {"phrase": "a flag", "box": (0.0, 0.0, 76.0, 52.0)},
    ]


def test_boxes_joined_by_delim_all_belong_to_the_phrase():
    found = boxes("<p>sofas</p> {<57><49><70><72>}<delim>{<26><48><43><71>}")
    assert [item["phrase"] for item in found] == ["sofas", "sofas"]
    assert found[1]["box"] == (52.0, 48.0, 86.0, 71.0)


def test_a_box_after_other_words_does_not_belong_to_the_phrase():
    assert boxes("<p>a cat</p> sits near {<1><2><3><4>}")[0]["phrase"] is None


def test_the_answer_text_without_markup_is_kept():
    answer = parse_grounded_answer("<p>An astronaut</p> {<18><6><86><100>} in front of <p>a flag</p> {<0><0><38><52>}.",
                                   SIZE)
    assert answer.text == "An astronaut in front of a flag."


@pytest.mark.parametrize("text, problem", [
    ("{<1><2><3>}", "has 3 numbers; a box has 4"),
    ("{<1><2><3><400>}", "numbers outside 0-100"),
    ("<p>cat</p> {<1><2><3><4>", "is not closed with '}' (phrase 'cat')"),
    ("{<1><two><3><4>}", "holds something other than integers"),
    ("I/ {<[ eachde tw", "cannot be read"),
])
def test_malformed_box_text_is_reported_not_raised(text, problem):
    answer = parse_grounded_answer(text, SIZE)
    assert list(answer) == [] and len(answer.problems) == 1 and problem in answer.problems[0]


def test_well_formed_boxes_are_read_beside_a_malformed_one():
    answer = parse_grounded_answer("<p>a</p> {<1><2><3>} and <p>b</p> {<10><20><30><40>}", SIZE)
    assert [item["phrase"] for item in answer] == ["b"] and len(answer.problems) == 1


def test_text_without_boxes_has_no_boxes_and_no_problems():
    answer = parse_grounded_answer("A cat on a sofa {with braces}.", SIZE)
    assert list(answer) == [] and answer.problems == []


@pytest.fixture(scope="module")
def processor():
    return build_random_model("tiny", variant="v2")[1]


def test_post_process_grounding_reads_each_answer_with_its_image_size(processor):
    results = processor.post_process_grounding(["{<0><0><50><50>}", "no box"], [(100, 100), (10, 10)])
    assert list(results[0]) == [{"phrase": None, "box": (0.0, 0.0, 50.0, 50.0)}] and list(results[1]) == []


def test_post_process_grounding_needs_one_image_size_per_text(processor):
    with pytest.raises(ValueError, match="2 text"):
        processor.post_process_grounding(["a", "b"], [(10, 10)])


def test_the_processor_writes_boxes_too(processor):
    assert processor.format_box((0, 0, 100, 50), (200, 100)) == "{<0><0><50><50>}"


# ---------------------------------------------------------------------------------------------------------------------
# Writing boxes ([identify] prompts).


def test_format_box_truncates_to_the_grid_like_the_original_datasets():
    assert format_box((8.9, 0, 414.9, 300), (451, 300)) == "{<1><0><91><100>}"


def test_format_box_round_trips_through_parsing_within_one_grid_step():
    box = (37.0, 12.5, 160.2, 99.0)
    [found] = boxes(format_box(box, SIZE))
    assert all(0 <= original - read < SIZE[i % 2] / 100 for i, (original, read) in enumerate(zip(box, found["box"])))


def test_format_box_refuses_a_box_outside_the_image():
    with pytest.raises(ValueError, match="inside a 200x100 image"):
        format_box((0, 0, 250, 50), SIZE)


# ---------------------------------------------------------------------------------------------------------------------
# Acceptance: a converted tiny MiniGPT-v2 answers a [refer] prompt through the pipeline; the answer has pixel boxes.


def teach_answer(model, processor, image, messages: list[dict], answer: str) -> None:
    """
    Random weights cannot answer with a box: fit the output layer so that the model answers `messages` with `answer`
    (the hidden states under teacher forcing are those of greedy decoding once the answer is produced).
    """
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    batch = processor(images=image, text=prompt, suffix=answer + "</s>", return_tensors="pt")
    head = model.get_output_embeddings()
    captured = {}

    def keep_input(_module, args, _output) -> None:
        captured.setdefault("hidden", args[0])

    handle = head.register_forward_hook(keep_input)
    with torch.no_grad():
        model(**batch)
    handle.remove()
    labelled = batch["labels"][0, 1:] != -100
    hidden, targets = captured["hidden"][0, :-1][labelled], batch["labels"][0, 1:][labelled]
    weight = head.weight.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([weight], lr=0.1)
    for _ in range(200):
        loss = torch.nn.functional.cross_entropy(hidden @ weight.T, targets)
        if loss < 0.005:  # every answer token far ahead of the others
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        head.weight.copy_(weight)


@pytest.fixture(scope="module")
def taught_v2_dir(tmp_path_factory):
    folder = VARIANTS["v2"].convert(tmp_path_factory.mktemp("grounding") / "converted")
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    image = Image.open(ORIGINAL_TINY / "inputs" / "chelsea.png").convert("RGB")
    teach_answer(model, processor, image, [refer_message(image)], "{<4><0><92><100>}")
    taught = folder.parent / "taught"
    model.save_pretrained(taught)
    processor.save_pretrained(taught)
    return taught


def refer_message(image) -> dict:
    return {"role": "user", "task": "refer",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": "where is the tabby cat?"}]}


def test_converted_v2_answers_a_refer_prompt_through_the_pipeline_with_pixel_boxes(taught_v2_dir):
    image = Image.open(ORIGINAL_TINY / "inputs" / "chelsea.png").convert("RGB")
    answerer = pipeline("image-text-to-text", model=str(taught_v2_dir), trust_remote_code=True)
    output = answerer(text=[refer_message(image)], max_new_tokens=24, do_sample=False, return_full_text=False)
    answer = output[0]["generated_text"]
    grounded = answerer.processor.post_process_grounding([answer], [image.size])[0]
    assert answer.strip() == "{<4><0><92><100>}"
    assert list(grounded) == [{"phrase": None, "box": (4 * 451 / 100, 0.0, 92 * 451 / 100, 300.0)}]
    assert grounded.problems == []
