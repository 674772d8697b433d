"""
The model card of each released family (MiniGPT-4 with Vicuna v0, MiniGPT-4 with Llama-2, MiniGPT-v2): Hub metadata,
base models, licence, sections (MiniGPT-v2's tasks and box format), and the memory tables of its sizes.
"""

import re

import pytest
import torch
from huggingface_hub import ModelCard
from minigpt4_hf.memory_table import RELEASED_MODELS, memory_tables, released_config
from minigpt4_hf.model_card import (
    BLIP2_HUB_ID,
    build_model_card,
    default_base_models,
    language_model_name,
)
from minigpt4_hf.random_models import EXAMPLE_IMAGE, build_random_model

from processing_minigpt4 import TASK_IDENTIFIERS


VARIANTS = ("vicuna0", "llama2", "v2")
SECTIONS = ("## Usage", "## Architecture", "## Memory", "## Provenance", "## Parity with the original",
            "## Limitations", "## License")


@pytest.fixture(scope="module")
def tiny_models():
    return {variant: build_random_model("tiny", variant=variant) for variant in VARIANTS}


def card_of(model, model_id: str = "someone/minigpt") -> ModelCard:
    counts = {name: tensor.numel() for name, tensor in model.state_dict().items()}
    card = build_model_card(model.config, model_id, inputs=[], dtype=torch.float16, parameter_counts=counts,
                            base_models=default_base_models(model.config) or ["someone/base"])
    return ModelCard(str(card))  # as the Hub reads README.md back


@pytest.mark.parametrize("variant, license_", [("vicuna0", "other"), ("llama2", "llama2"), ("v2", "llama2")])
def test_card_metadata_of_each_variant(tiny_models, variant, license_):
    data = card_of(tiny_models[variant][0]).data
    assert data.license == license_
    assert (data.license_name is not None) == (variant == "vicuna0")
    assert data.pipeline_tag == "image-text-to-text" and data.library_name == "transformers"
    assert data.language == ["en"] and data.base_model
    assert {"minigpt4", "custom_code"} <= set(data.tags)
    assert ("minigpt-v2" in data.tags) == (variant == "v2") and ("llama-2" in data.tags) == (variant != "vicuna0")


@pytest.mark.parametrize("variant", VARIANTS)
def test_card_has_every_section_in_order(tiny_models, variant):
    text = card_of(tiny_models[variant][0]).text
    positions = [text.index(heading) for heading in SECTIONS]
    assert positions == sorted(positions)


def test_only_the_v2_card_explains_tasks_and_boxes(tiny_models):
    text = card_of(tiny_models["v2"][0]).text
    tasks = text[text.index("## Tasks and boxes"):text.index("## Architecture")]
    assert [f"`[{task}]`" in tasks for task in TASK_IDENTIFIERS] == [True] * len(TASK_IDENTIFIERS)
    assert "{<x1><y1><x2><y2>}" in tasks and "0-100 grid" in tasks and "<delim>" in tasks
    assert "post_process_grounding" in tasks and "format_box" in tasks
    for variant in ("vicuna0", "llama2"):
        assert "## Tasks and boxes" not in card_of(tiny_models[variant][0]).text


@pytest.mark.parametrize("variant, licence", [("llama2", "Llama 2 Community License"),
                                              ("v2", "Llama 2 Community License"), ("vicuna0", "Vicuna v0")])
def test_card_licence_section_names_the_language_models_licence(tiny_models, variant, licence):
    text = card_of(tiny_models[variant][0]).text
    assert licence in text[text.index("## License"):]


def test_memory_section_lists_the_parts_the_variant_has(tiny_models):
    for variant in VARIANTS:
        text = card_of(tiny_models[variant][0]).text
        memory = text[text.index("## Memory"):text.index("## Provenance")]
        assert ("Q-Former + queries" in memory) == (variant == "vicuna0")
        assert "`--load-in-4bit`" in memory and "language model" in memory


@pytest.mark.parametrize("name", list(RELEASED_MODELS))
def test_full_size_configs_name_their_base_models(name):
    config = released_config(*RELEASED_MODELS[name])
    llm = {"vicuna0": ("lmsys/vicuna-7b-delta-v0" if "7B" in name else "lmsys/vicuna-13b-delta-v0"),
           "llama2": "meta-llama/Llama-2-7b-chat-hf", "v2": "meta-llama/Llama-2-7b-chat-hf"}[config.variant]
    assert default_base_models(config) == [BLIP2_HUB_ID, llm]
    assert language_model_name(config) in name


def test_memory_tables_of_the_released_sizes():
    tables = memory_tables({name: released_config(*spec) for name, spec in RELEASED_MODELS.items()
                            if spec[0] != "vicuna0" or "7B" in name})
    rows = {tuple(cell.strip(" *") for cell in line.strip("|").split("|")[:2]): line for line in tables.splitlines()
            if line.startswith("|")}
    assert ("MiniGPT-4 Llama-2-7B-chat", "projection (llama_proj)") in rows  # Linear 5632 -> 4096: 23.1 M
    assert "23.1 M" in rows[("MiniGPT-4 Llama-2-7B-chat", "projection (llama_proj)")]
    assert ("MiniGPT-v2 Llama-2-7B-chat", "Q-Former + queries") not in rows
    assert "987.0 M" in rows[("MiniGPT-v2 Llama-2-7B-chat", "vision (EVA ViT-g + ln_vision)")]  # 1025 positions
    assert "3.1 M" in rows[("MiniGPT-4 Vicuna-7B v0", "projection (llama_proj)")]


def test_v2_usage_snippet_runs_against_a_saved_folder(tiny_models, tmp_path):
    model, processor = tiny_models["v2"]
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    code = re.search(r"```python\n(.*?)```", card_of(model, str(tmp_path)).text, re.S).group(1)
    code = code.replace('image_path = "example.jpg"', f'image_path = "{EXAMPLE_IMAGE}"')
    code = code.replace("max_new_tokens=500", "max_new_tokens=4")
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert "[refer]" in namespace["prompt"]
    assert isinstance(namespace["answer"], str)
