"""
Prompts per variant: the chat templates of MiniGPT-4 with Llama-2 and MiniGPT-v2, their BOS ids, task identifiers,
and already formatted training prompts with `suffix=`. The ids against the original are in test_parity_variants.py.
"""

import pytest
from jinja2.exceptions import TemplateError
from minigpt4_hf.random_models import build_random_model

from configuration_minigpt4 import DEFAULT_SYSTEM_PROMPT


IMAGE = "<Img><ImageHere></Img>"


def user(text: str, with_image: bool = True, **keys) -> dict:
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": text}]
    return {"role": "user", "content": content, **keys}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


@pytest.fixture(scope="module")
def llama2_processor():
    return build_random_model("tiny", variant="llama2")[1]


@pytest.fixture(scope="module")
def v2_processor():
    return build_random_model("tiny", variant="v2")[1]


# ---------------------------------------------------------------------------------------------------------------------
# MiniGPT-4 with Llama-2: `CONV_VISION_LLama2`.


def test_llama2_prompt_is_the_system_text_then_inst_with_a_trailing_space(llama2_processor):
    prompt = llama2_processor.apply_chat_template([user("What is this?")], add_generation_prompt=True)
    assert prompt == DEFAULT_SYSTEM_PROMPT + f"<s>[INST] {IMAGE} What is this? [/INST] "


def test_llama2_multi_turn_keeps_answers_without_separator(llama2_processor):
    messages = [user("What is this?"), assistant("A cat."), user("Is it asleep?", with_image=False)]
    prompt = llama2_processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == DEFAULT_SYSTEM_PROMPT + (
        f"<s>[INST] {IMAGE} What is this? [/INST] A cat.<s>[INST] Is it asleep? [/INST] "
    )


def test_llama2_prompt_has_a_second_bos_after_the_system_text(llama2_processor):
    prompt = llama2_processor.apply_chat_template([user("What is this?")], add_generation_prompt=True)
    ids = llama2_processor(text=prompt.replace(IMAGE, ""))["input_ids"][0]
    bos = llama2_processor.tokenizer.bos_token_id
    assert ids[0] == bos and ids.count(bos) == 2 and ids[1] != bos


# ---------------------------------------------------------------------------------------------------------------------
# MiniGPT-v2: `CONV_VISION_minigptv2` / demo_v2.py.


def test_v2_prompt_has_no_system_text_and_no_space_after_inst(v2_processor):
    prompt = v2_processor.apply_chat_template([user("[vqa] What is this?")], add_generation_prompt=True)
    assert prompt == f"<s>[INST] {IMAGE} [vqa] What is this? [/INST]"


def test_v2_prompt_starts_with_two_bos_ids_as_the_original_demo(v2_processor):
    prompt = v2_processor.apply_chat_template([user("[vqa] What is this?")], add_generation_prompt=True)
    ids = v2_processor(text=prompt.replace(IMAGE, ""))["input_ids"][0]
    bos = v2_processor.tokenizer.bos_token_id
    assert ids[:2] == [bos, bos] and ids[2] != bos


def test_tokenizing_chat_template_keeps_both_bos_ids(v2_processor, example_image):
    messages = [{"role": "user", "content": [{"type": "image", "image": example_image},
                                             {"type": "text", "text": "[vqa] What is this?"}]}]
    inputs = v2_processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    ids, bos = inputs["input_ids"][0], v2_processor.tokenizer.bos_token_id
    assert ids[:2] == [bos, bos] and ids[2] != bos


def test_tokenizing_chat_template_without_special_tokens_keeps_only_the_literal_bos(v2_processor, example_image):
    messages = [{"role": "user", "content": [{"type": "image", "image": example_image},
                                             {"type": "text", "text": "[vqa] What is this?"}]}]
    inputs = v2_processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                              processor_kwargs={"add_special_tokens": False})
    bos = v2_processor.tokenizer.bos_token_id
    assert inputs["input_ids"][0][0] == bos and inputs["input_ids"][0][1] != bos


def test_v2_earlier_answers_render_as_end_of_sequence_like_the_demo(v2_processor):
    messages = [user("[refer] the cat"), assistant("{<4><0><92><100>}"), user("[refer] the dog", with_image=False)]
    prompt = v2_processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == f"<s>[INST] {IMAGE} [refer] the cat [/INST]</s><s>[INST] [refer] the dog [/INST]"


def test_v2_earlier_answers_are_kept_on_request(v2_processor):
    messages = [user("[refer] the cat"), assistant("{<4><0><92><100>}"), user("[refer] the dog", with_image=False)]
    prompt = v2_processor.apply_chat_template(messages, add_generation_prompt=True, keep_previous_answers=True)
    assert prompt == f"<s>[INST] {IMAGE} [refer] the cat [/INST]{{<4><0><92><100>}}<s>[INST] [refer] the dog [/INST]"


def test_a_v2_system_message_comes_first(v2_processor):
    messages = [{"role": "system", "content": "Be brief."}, user("[vqa] What?")]
    prompt = v2_processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == f"Be brief.<s>[INST] {IMAGE} [vqa] What? [/INST]"


# ---------------------------------------------------------------------------------------------------------------------
# Task identifiers: plain text at the start of the user's words; `task=` writes them.


def test_task_argument_writes_the_identifier_into_the_last_user_message(v2_processor):
    messages = [user("the cat"), assistant("{<4><0><92><100>}"), user("the dog", with_image=False)]
    prompt = v2_processor.apply_chat_template(messages, add_generation_prompt=True, task="refer")
    assert prompt == f"<s>[INST] {IMAGE} the cat [/INST]</s><s>[INST] [refer] the dog [/INST]"


def test_task_key_of_a_message_writes_its_identifier(v2_processor):
    prompt = v2_processor.apply_chat_template([user("where is the cat?", task="refer")], add_generation_prompt=True)
    assert prompt == f"<s>[INST] {IMAGE} [refer] where is the cat? [/INST]"


def test_task_is_written_once_when_the_text_already_starts_with_it(v2_processor):
    prompt = v2_processor.apply_chat_template([user("[refer] the cat")], add_generation_prompt=True, task="[refer]")
    assert prompt == f"<s>[INST] {IMAGE} [refer] the cat [/INST]"


def test_task_without_text_is_the_identifier_alone(v2_processor):
    prompt = v2_processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}],
                                              add_generation_prompt=True, task="caption")
    assert prompt == f"<s>[INST] {IMAGE} [caption] [/INST]"


def test_unknown_task_is_refused_naming_the_known_ones(v2_processor):
    with pytest.raises(TemplateError, match="Unknown task reg; MiniGPT-v2 knows vqa, caption, grounding, refer"):
        v2_processor.apply_chat_template([user("the cat")], add_generation_prompt=True, task="reg")


def test_task_for_another_variant_is_refused(llama2_processor):
    with pytest.raises(TemplateError, match="MiniGPT-v2 prompts"):
        llama2_processor.apply_chat_template([user("the cat")], add_generation_prompt=True, task="refer")


# ---------------------------------------------------------------------------------------------------------------------
# Training prompts: already formatted, `suffix=` answer + "</s>", one BOS, labels on the answer only.


def test_training_prompt_gets_one_bos_and_labels_only_on_the_answer(v2_processor, example_image):
    prompt = f"[INST] {IMAGE} [refer] where is the cat ?  [/INST]"
    inputs = v2_processor(images=example_image, text=prompt, suffix="{<4><0><92><100>}</s>")
    ids, labels = inputs["input_ids"][0], inputs["labels"][0]
    tokenizer = v2_processor.tokenizer
    answer = tokenizer("{<4><0><92><100>}", add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    assert labels[-len(answer) - 1:] == answer + [tokenizer.eos_token_id]
    assert set(labels[: -len(answer) - 1]) == {-100}


def test_end_text_in_the_suffix_becomes_the_eos_id(llama2_processor, example_image):
    prompt = f"[INST] {IMAGE} Describe this image in detail. [/INST] "
    inputs = llama2_processor(images=example_image, text=prompt, suffix="A cat.</s>")
    assert inputs["labels"][0][-1] == llama2_processor.tokenizer.eos_token_id
    assert inputs["input_ids"][0][-1] == llama2_processor.tokenizer.eos_token_id
