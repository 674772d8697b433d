"""MiniGPT4Config: the original's hyperparameters by default, and the parameter counts they give."""

import pytest
import torch

from configuration_minigpt4 import LLAMA_STOP_TOKEN_IDS, MiniGPT4Config
from modeling_minigpt4 import MiniGPT4ForConditionalGeneration


def count(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


@pytest.fixture(scope="module")
def default_model_on_meta():
    with torch.device("meta"):
        return MiniGPT4ForConditionalGeneration(MiniGPT4Config())


def test_default_config_is_minigpt4_with_vicuna_7b():
    config = MiniGPT4Config()
    vision, qformer, text = config.vision_config, config.qformer_config, config.text_config
    assert (vision.image_size, vision.patch_size, vision.num_hidden_layers, vision.hidden_size) == (224, 14, 39, 1408)
    assert (vision.num_attention_heads, vision.intermediate_size, vision.layer_norm_eps) == (16, 6144, 1e-6)
    assert vision.qkv_bias is True
    assert config.vision_layernorm_eps == 1e-5
    assert (qformer.hidden_size, qformer.num_hidden_layers, qformer.cross_attention_frequency) == (768, 12, 2)
    assert qformer.encoder_hidden_size == 1408
    assert config.num_query_tokens == 32
    assert (text.model_type, text.hidden_size, text.num_hidden_layers, text.vocab_size) == ("llama", 4096, 32, 32000)
    assert config.stop_token_ids == LLAMA_STOP_TOKEN_IDS


def test_qformer_cross_attends_to_the_vision_width_whatever_it_was_given():
    config = MiniGPT4Config(vision_config={"hidden_size": 56}, qformer_config={"encoder_hidden_size": 999})
    assert config.qformer_config.encoder_hidden_size == 56


def test_config_round_trips_through_json(tmp_path):
    config = MiniGPT4Config(num_query_tokens=6, image_token_id=1000, stop_token_ids=[[280], [266, 938]],
                            freeze_qformer=False, text_config={"model_type": "llama", "hidden_size": 64})
    config.save_pretrained(tmp_path)
    reloaded = MiniGPT4Config.from_pretrained(tmp_path)
    assert reloaded.to_dict() == config.to_dict()


def test_saved_config_maps_the_auto_classes_to_the_remote_code():
    auto_map = MiniGPT4Config().to_dict()["auto_map"]
    assert auto_map["AutoConfig"] == "configuration_minigpt4.MiniGPT4Config"
    assert auto_map["AutoModel"] == "modeling_minigpt4.MiniGPT4ForConditionalGeneration"
    assert auto_map["AutoModelForImageTextToText"] == "modeling_minigpt4.MiniGPT4ForConditionalGeneration"


def test_empty_stop_sequence_is_rejected():
    with pytest.raises(ValueError, match="stop_token_ids"):
        MiniGPT4Config(stop_token_ids=[[835], []])


def test_vision_parameter_count_matches_the_original_eva_vit_g(default_model_on_meta):
    # Original: 39 blocks of 25,248,768 + patch embedding + positions + CLS, plus ln_vision (2 x 1408).
    original = 39 * 25_248_768 + (1408 * 3 * 14 * 14 + 1408) + 257 * 1408 + 1408 + 2 * 1408
    # transformers stores the q/v biases as one qkv bias whose k third is zero: 1408 more per block.
    assert count(default_model_on_meta.vision_model) == original + 39 * 1408
    assert abs(count(default_model_on_meta.vision_model) / 1e6 - 985.9) < 0.1


def test_qformer_with_queries_has_the_original_parameter_count(default_model_on_meta):
    model = default_model_on_meta
    assert count(model.qformer) + model.query_tokens.numel() == 105_162_240


def test_projection_is_768_to_4096_with_bias(default_model_on_meta):
    projection = default_model_on_meta.language_projection
    assert count(projection) == 3_149_824
    assert tuple(projection.weight.shape) == (4096, 768)


def test_layernorm_after_the_vit_uses_the_original_eps(default_model_on_meta):
    vision = default_model_on_meta.vision_model
    assert vision.post_layernorm.eps == 1e-5
    assert vision.encoder.layers[0].layer_norm1.eps == 1e-6
