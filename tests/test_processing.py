"""MiniGPT4Processor: prompts, labels, padding, images and clear errors on bad input (its parity with the original's
pixels, token ids, prompts and labels is in test_parity_original.py)."""

import io

import numpy as np
import pytest
import torch
from PIL import Image, features
from transformers import AutoTokenizer

from configuration_minigpt4 import DEFAULT_SYSTEM_PROMPT
from conftest import ORIGINAL_TINY, write_image_bomb, write_truncated_png
from processing_minigpt4 import (
    MiniGPT4Processor,
    load_rgb_image,
    sentencepiece_faithful_tokenizer,
    stop_token_ids_for,
    strip_turn_separator,
)


NUM_QUERY_TOKENS = 6
STAGE2_PROMPT = "###Human: <Img><ImageHere></Img> Describe this image in detail. ###Assistant: "


def faithful_fixture_tokenizer():
    """The fixture's own sentencepiece tokenizer.model, as the conversion turns it into a fast tokenizer."""
    return sentencepiece_faithful_tokenizer(AutoTokenizer.from_pretrained(ORIGINAL_TINY / "weights" / "vicuna_tiny"))


@pytest.fixture(scope="module")
def original_processor():
    return MiniGPT4Processor.from_tokenizer(
        faithful_fixture_tokenizer(), image_size=56, num_query_tokens=NUM_QUERY_TOKENS
    )


# ---------------------------------------------------------------------------------------------------------------------
# The original's stop sequences (pixels, token ids, prompts and labels against the original: test_parity_original.py)


def test_stop_sequences_include_the_original_spellings_of_the_turn_separator(original_processor):
    stops = stop_token_ids_for(original_processor.tokenizer)
    assert [280] in stops and [266, 938] in stops  # the tiny vocabulary's analogue of LLaMA's [835], [2277, 29937]
    for stop in stops:
        assert original_processor.tokenizer.decode(stop).strip() == "###"


# ---------------------------------------------------------------------------------------------------------------------
# Prompts, labels, padding


def test_multi_turn_chat_renders_every_finished_turn_then_the_open_one(tiny_shared):
    _, processor = tiny_shared
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image in detail."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A man."}]},
        {"role": "user", "content": "What is he doing?"},
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == (DEFAULT_SYSTEM_PROMPT + "###Human: <Img><ImageHere></Img> Describe this image in detail."
                      "###Assistant: A man.###Human: What is he doing?###Assistant: ")


def test_a_system_message_replaces_the_default_system_text(tiny_shared):
    _, processor = tiny_shared
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == "Be brief.###Human: Hi###Assistant: "


def test_images_inside_chat_messages_are_processed(tiny_shared, example_image):
    _, processor = tiny_shared
    messages = [{"role": "user", "content": [{"type": "image", "image": example_image},
                                             {"type": "text", "text": "What is it?"}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 56, 56)
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == NUM_QUERY_TOKENS
    assert inputs["input_ids"][0, 0] == processor.tokenizer.bos_token_id


def test_suffix_labels_mask_bos_prompt_image_tokens_and_padding(tiny_shared, example_image):
    _, processor = tiny_shared
    inputs = processor(images=[example_image] * 2, text=[STAGE2_PROMPT, "<ImageHere>"],
                       suffix=["A long answer about the picture.###", "Short.###"], return_tensors="pt")
    labels, ids, mask = inputs["labels"], inputs["input_ids"], inputs["attention_mask"]
    for row, suffix in enumerate(["A long answer about the picture.###", "Short.###"]):
        suffix_ids = processor.tokenizer(suffix, add_special_tokens=False)["input_ids"]
        length = int(mask[row].sum())
        assert mask[row, :length].all() and not mask[row, length:].any(), "training batches are right padded"
        assert labels[row, length - len(suffix_ids):length].tolist() == suffix_ids
        assert (labels[row, : length - len(suffix_ids)] == -100).all()
        assert (labels[row, length:] == -100).all()
        assert ids[row, 0] == processor.tokenizer.bos_token_id


def test_suffix_is_cut_to_max_txt_len_tokens(tiny_shared, example_image):
    _, processor = tiny_shared
    inputs = processor(images=[example_image], text=["<ImageHere>"], suffix=["word " * 100], max_txt_len=7)
    assert sum(label != -100 for label in inputs["labels"][0]) == 7


def test_generation_batches_are_left_padded_by_default(tiny_shared, example_image):
    _, processor = tiny_shared
    inputs = processor(images=[example_image] * 2, text=["<ImageHere> Hi", "<ImageHere> A much longer question?"],
                       return_tensors="pt")
    assert inputs["attention_mask"][0, 0] == 0 and inputs["attention_mask"][0, -1] == 1
    assert (inputs["input_ids"][0][inputs["attention_mask"][0] == 0] == processor.tokenizer.pad_token_id).all()


def test_generic_callers_extra_modality_keywords_are_tolerated(tiny_shared, example_image):
    _, processor = tiny_shared
    inputs = processor(text=["<ImageHere> Hi"], images=[example_image], videos=[], audios=[], padding=True,
                       padding_side="left", return_tensors="pt")
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values"}


def test_the_saved_tokenizer_loads_alone_with_auto_tokenizer(tiny_saved_dir, tiny_shared):
    _, processor = tiny_shared
    tokenizer = AutoTokenizer.from_pretrained(tiny_saved_dir, trust_remote_code=True)
    text = "###Human: <Img>"
    assert tokenizer(text)["input_ids"] == processor.tokenizer(text)["input_ids"]
    assert tokenizer.convert_tokens_to_ids("<ImageHere>") == processor.image_token_id


def test_loading_the_processor_never_asks_to_trust_the_model_code(tiny_saved_dir, monkeypatch):
    import transformers.models.auto.configuration_auto as configuration_auto

    def refuse(*args, **kwargs):
        raise AssertionError("the processor resolved the remote-code model config")

    monkeypatch.setattr(configuration_auto, "resolve_trust_remote_code", refuse)
    assert MiniGPT4Processor.from_pretrained(tiny_saved_dir).image_token_id == 1000


def test_processor_round_trips_through_save_pretrained(tiny_shared, tiny_saved_dir, example_image):
    _, processor = tiny_shared
    reloaded = MiniGPT4Processor.from_pretrained(tiny_saved_dir)
    assert (reloaded.num_query_tokens, reloaded.image_token_id) == (NUM_QUERY_TOKENS, processor.image_token_id)
    text = processor.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True)
    assert reloaded.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True) == text
    a = processor(images=example_image, text="<ImageHere> x", return_tensors="pt")
    b = reloaded(images=example_image, text="<ImageHere> x", return_tensors="pt")
    assert all(torch.equal(a[key], b[key]) for key in a)


# ---------------------------------------------------------------------------------------------------------------------
# Decoding


def test_decode_answers_strips_the_prompt_and_the_turn_separator(tiny_shared):
    _, processor = tiny_shared
    prompt = processor.tokenizer("###Human: Hi###Assistant: ")["input_ids"]
    answer = processor.tokenizer("A man on a horse.###Human: more", add_special_tokens=False)["input_ids"]
    assert processor.decode_answers([prompt + answer], prompt_length=len(prompt)) == ["A man on a horse."]


def test_post_processing_drops_the_trailing_turn_separator():
    assert strip_turn_separator("A man.###") == "A man."
    assert strip_turn_separator("no separator") == "no separator"


# ---------------------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "LA", "I;16"])
def test_images_of_any_mode_become_rgb(mode):
    image = Image.new(mode, (5, 4))
    converted = load_rgb_image(image)
    assert converted.mode == "RGB" and converted.size == (5, 4)


def test_alpha_is_dropped_not_composited_like_the_original():
    image = Image.new("RGBA", (2, 2), (10, 20, 30, 0))
    assert load_rgb_image(image).getpixel((0, 0)) == (10, 20, 30)


def test_sixteen_bit_images_are_scaled_not_clipped():
    image = Image.fromarray(np.full((2, 2), 32768, dtype=np.uint16))
    assert load_rgb_image(image).getpixel((0, 0)) == (128, 128, 128)


def _palette_with_transparency() -> Image.Image:
    image = Image.new("P", (6, 4), 1)
    image.putpalette([0, 0, 0, 200, 30, 40] + [0] * 762)
    image.info["transparency"] = 0
    return image


def _animated_gif(path) -> None:
    frames = [Image.new("RGB", (6, 4), colour) for colour in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)


def _exif_jpeg(path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotated 90 degrees
    exif[0x010F] = "camera maker"
    Image.new("RGB", (6, 4), (90, 120, 200)).save(path, exif=exif)


IMAGE_FILES = {  # file name -> writer
    "grayscale.jpg": lambda path: Image.new("L", (6, 4), 120).save(path),
    "rgba.png": lambda path: Image.new("RGBA", (6, 4), (10, 20, 30, 0)).save(path),
    "la.png": lambda path: Image.new("LA", (6, 4), (70, 0)).save(path),
    "palette_with_transparency.png": lambda path: _palette_with_transparency().save(path),
    "palette_with_transparency.gif": lambda path: _palette_with_transparency().save(path),
    "cmyk.jpg": lambda path: Image.new("CMYK", (6, 4), (0, 255, 255, 0)).save(path),
    "sixteen_bit.png": lambda path: Image.fromarray(np.full((4, 6), 65535, dtype=np.uint16)).save(path),
    "sixteen_bit.tiff": lambda path: Image.fromarray(np.full((4, 6), 65535, dtype=np.uint16)).save(path),
    "animated.gif": _animated_gif,
    "lossless.webp": lambda path: Image.new("RGB", (6, 4), (10, 200, 30)).save(path, lossless=True),
    "exif.jpg": _exif_jpeg,
}


@pytest.mark.parametrize("name", IMAGE_FILES)
def test_image_files_of_every_kind_decode_to_rgb(tmp_path, name):
    if name.endswith(".webp") and not features.check("webp"):
        pytest.skip("this Pillow has no WebP support")
    path = tmp_path / name
    IMAGE_FILES[name](path)

    image = load_rgb_image(path)

    assert image.mode == "RGB" and image.size == (6, 4)


def test_an_animated_gif_gives_its_first_frame(tmp_path):
    _animated_gif(tmp_path / "animated.gif")
    assert load_rgb_image(tmp_path / "animated.gif").getpixel((0, 0)) == (255, 0, 0)


def test_a_sixteen_bit_file_is_scaled_not_clipped(tmp_path):
    IMAGE_FILES["sixteen_bit.png"](tmp_path / "white.png")
    assert load_rgb_image(tmp_path / "white.png").getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("name, write, reason", [
    ("truncated.png", write_truncated_png, "truncated"),
    ("empty.jpg", lambda path: path.write_bytes(b""), "cannot identify image file"),
    ("bomb.png", write_image_bomb, "exceeds limit"),  # 400 megapixels: refused before decoding
])
def test_broken_empty_and_huge_files_are_refused_in_one_line_naming_them(tmp_path, name, write, reason):
    path = tmp_path / name
    write(path)
    with pytest.raises(ValueError) as refusal:
        load_rgb_image(path)
    message = str(refusal.value)
    assert name in message and reason in message and "\n" not in message


@pytest.mark.parametrize("size", [(1, 1), (3000, 20)])
def test_tiny_and_odd_sized_images_are_resized_to_the_model_size(tiny_shared, size):
    _, processor = tiny_shared
    inputs = processor(images=Image.new("RGB", size), text="<ImageHere>", return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 56, 56)


def test_a_file_that_is_not_an_image_raises_naming_it(tiny_shared, tmp_path):
    _, processor = tiny_shared
    bogus = tmp_path / "notes.jpg"
    bogus.write_text("not an image")
    with pytest.raises(ValueError, match="notes.jpg"):
        processor(images=str(bogus), text="<ImageHere>")


def test_encoded_image_bytes_are_decoded_and_bad_bytes_raise():
    buffer = io.BytesIO()
    Image.new("RGBA", (3, 2), (1, 2, 3, 4)).save(buffer, format="PNG")
    assert load_rgb_image(buffer.getvalue()).getpixel((0, 0)) == (1, 2, 3)
    with pytest.raises(ValueError, match="Could not read an image from the image bytes"):
        load_rgb_image(b"not an image")


def test_a_missing_image_file_raises_naming_it(tiny_shared, tmp_path):
    _, processor = tiny_shared
    with pytest.raises(ValueError, match="not found.*missing.png"):
        processor(images=str(tmp_path / "missing.png"), text="<ImageHere>")


def test_images_without_placeholders_raise(tiny_shared, example_image):
    _, processor = tiny_shared
    with pytest.raises(ValueError, match="0 '<ImageHere>' placeholder.*1 image"):
        processor(images=example_image, text="Describe the picture.")


def test_more_placeholders_than_images_raise(tiny_shared, example_image):
    _, processor = tiny_shared
    with pytest.raises(ValueError, match="2 '<ImageHere>' placeholder.*1 image"):
        processor(images=[example_image], text="<ImageHere> and <ImageHere>")


def test_placeholders_without_images_raise(tiny_shared):
    _, processor = tiny_shared
    with pytest.raises(ValueError, match="1 '<ImageHere>' placeholder.*0 image"):
        processor(text="<ImageHere> what?")


def test_text_is_required(tiny_shared, example_image):
    _, processor = tiny_shared
    with pytest.raises(ValueError, match="apply_chat_template"):
        processor(images=example_image)


def test_per_text_image_lists_must_match_each_text(tiny_shared, example_image):
    _, processor = tiny_shared
    with pytest.raises(ValueError, match="Text 1 has 1 .* 0 image"):
        processor(images=[[example_image], []], text=["<ImageHere>", "<ImageHere>"])


def test_a_prompt_longer_than_max_length_raises_instead_of_cutting_image_tokens(tiny_shared, example_image):
    _, processor = tiny_shared
    with pytest.raises(ValueError, match="more than max_length=5"):
        processor(images=example_image, text="<ImageHere> hello there", max_length=5)


def test_text_without_images_needs_no_pixels(tiny_shared):
    _, processor = tiny_shared
    inputs = processor(text="Hello", return_tensors="pt")
    assert "pixel_values" not in inputs


def test_a_truncated_file_is_refused_even_when_another_library_allows_truncated_images(tmp_path, monkeypatch):
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # what lmms-eval's task module does on import
    write_truncated_png(tmp_path / "cut.png")
    with pytest.raises(ValueError, match="cut.png.*truncated"):
        load_rgb_image(tmp_path / "cut.png")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the process-wide setting is left as it was
