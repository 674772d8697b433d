"""
One model, three bridges: MiniGPT-4 with Vicuna v0 (Q-Former), MiniGPT-4 with Llama-2 and MiniGPT-v2 (class token
dropped, 4 consecutive patch tokens concatenated) are configs of the same MiniGPT4ForConditionalGeneration.
"""

import pytest
import torch
from minigpt4_hf.random_models import build_random_model

from configuration_minigpt4 import LLAMA_STOP_TOKEN_IDS, MiniGPT4Config
from modeling_minigpt4 import MiniGPT4ForConditionalGeneration


def variant_config(variant: str, **fields) -> MiniGPT4Config:
    """The real sizes of a released family (224 px; MiniGPT-v2 at 448 px)."""
    image_size = 448 if variant == "v2" else 224
    return MiniGPT4Config(variant=variant, use_qformer=variant == "vicuna0",
                          vision_config={"image_size": image_size}, **fields)


@pytest.fixture(scope="module")
def tiny_v2():
    return build_random_model("tiny", variant="v2")


# ---------------------------------------------------------------------------------------------------------------------
# Configuration


@pytest.mark.parametrize("variant, tokens", [("vicuna0", 32), ("llama2", 64), ("v2", 256)])
def test_each_variant_has_the_released_number_of_image_tokens(variant, tokens):
    assert variant_config(variant).num_image_tokens == tokens


def test_the_merge_width_sets_the_number_of_image_tokens():
    config = MiniGPT4Config(use_qformer=False, vision_token_merge=2)
    assert config.num_image_tokens == 128


@pytest.mark.parametrize("merge", [0, 3])
def test_a_merge_that_does_not_divide_the_patches_is_rejected(merge):
    with pytest.raises(ValueError, match="vision_token_merge"):
        MiniGPT4Config(use_qformer=False, vision_token_merge=merge)


def test_an_unknown_variant_is_rejected():
    with pytest.raises(ValueError, match="vicuna0, llama2, v2"):
        MiniGPT4Config(variant="v3")


@pytest.mark.parametrize("variant, stops", [
    ("vicuna0", LLAMA_STOP_TOKEN_IDS), ("llama2", [[2], *LLAMA_STOP_TOKEN_IDS]), ("v2", [[2]]),
])
def test_default_stop_sequences_follow_the_variant(variant, stops):
    assert variant_config(variant).stop_token_ids == stops


def test_variant_and_bridge_round_trip_through_json(tmp_path):
    config = variant_config("v2", vision_token_merge=4)
    config.save_pretrained(tmp_path)
    reloaded = MiniGPT4Config.from_pretrained(tmp_path)
    assert (reloaded.variant, reloaded.use_qformer, reloaded.num_image_tokens) == ("v2", False, 256)


# ---------------------------------------------------------------------------------------------------------------------
# Model


@pytest.mark.parametrize("variant", ["llama2", "v2"])
def test_without_qformer_there_are_no_qformer_or_query_token_weights(variant):
    with torch.device("meta"):
        model = MiniGPT4ForConditionalGeneration(variant_config(variant))
    names = list(model.state_dict())
    assert not any(name.startswith(("model.qformer.", "model.query_tokens")) for name in names)
    assert model.qformer is None and model.query_tokens is None


def test_projection_without_qformer_is_5632_to_4096_with_bias():
    with torch.device("meta"):
        model = MiniGPT4ForConditionalGeneration(variant_config("llama2"))
    projection = model.language_projection
    assert tuple(projection.weight.shape) == (4096, 4 * 1408)
    assert sum(parameter.numel() for parameter in projection.parameters()) == 23_072_768


def test_layernorm_after_the_vit_starts_as_ones_and_zeros_with_eps_1e5(tiny_v2):
    model, _ = tiny_v2
    post_layernorm = model.vision_model.post_layernorm
    assert post_layernorm.eps == 1e-5
    assert torch.equal(post_layernorm.weight, torch.ones_like(post_layernorm.weight))
    assert torch.equal(post_layernorm.bias, torch.zeros_like(post_layernorm.bias))


def test_image_token_t_concatenates_patches_4t_to_4t_plus_3_of_one_row(tiny_v2, example_image):
    model, processor = tiny_v2
    pixel_values = processor.image_processor(example_image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        output = model.get_image_features(pixel_values, return_dict=True)
    patches = output.last_hidden_state[0, 1:]  # (64, 56): an 8 x 8 grid in raster order, class token dropped
    merged = output.merged_patch_embeds[0]  # (16, 224)
    for token in range(16):
        assert torch.equal(merged[token], torch.cat([patches[4 * token + j] for j in range(4)]))
    assert output.qformer_last_hidden_state is None


def test_image_features_are_the_projection_of_the_merged_patches(tiny_v2, example_image):
    model, processor = tiny_v2
    pixel_values = processor.image_processor(example_image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        output = model.get_image_features(pixel_values, return_dict=True)
        expected = model.language_projection(output.merged_patch_embeds)
    assert output.pooler_output.shape == (1, 16, 64)
    torch.testing.assert_close(output.pooler_output, expected)


def test_processor_expands_each_image_to_num_image_tokens(tiny_v2, example_image):
    model, processor = tiny_v2
    inputs = processor(images=[example_image] * 2, text="<Img><ImageHere></Img> and <Img><ImageHere></Img>")
    assert inputs["input_ids"][0].count(processor.image_token_id) == 2 * model.config.num_image_tokens == 32


def test_merge_bridge_model_generates(tiny_v2, example_image):
    model, processor = tiny_v2
    inputs = processor(images=example_image, text="<s>[INST] <Img><ImageHere></Img> [vqa] what? [/INST]",
                       return_tensors="pt")
    prompt_length = inputs["input_ids"].shape[1]
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(generated[0, :prompt_length], inputs["input_ids"][0])
    assert 1 <= generated.shape[1] - prompt_length <= 3


def test_merge_bridge_model_round_trips_through_save_pretrained(tiny_v2, tmp_path, example_image):
    model, processor = tiny_v2
    model.save_pretrained(tmp_path)
    reloaded = MiniGPT4ForConditionalGeneration.from_pretrained(tmp_path).eval()
    pixel_values = processor.image_processor(example_image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        assert torch.equal(reloaded.get_image_features(pixel_values), model.get_image_features(pixel_values))
    assert reloaded.qformer is None


def test_only_the_projection_trains_without_qformer(tiny_v2):
    model, _ = tiny_v2
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable == {"model.language_projection.weight", "model.language_projection.bias"}
