"""What vLLM's Transformers modeling backend requires of a remote-code VLM (docs/vllm.md), checked on CPU: the model
as vLLM builds it (`AutoModel.from_config`, the text attention swapped for its own, called with its arguments) and the
processor outputs it reads. vLLM itself needs CUDA and is not run here."""

import pytest
import torch
from transformers import AttentionInterface, AutoConfig, AutoModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from conftest import saved_folder
from modeling_minigpt4 import MiniGPT4ForConditionalGeneration, MiniGPT4Model


RECORDING_ATTENTION = "minigpt4_test_recording_attention"
VLLM_AUTO_MAP = {"AutoConfig": "configuration_minigpt4.MiniGPT4Config", "AutoModel": "modeling_minigpt4.MiniGPT4Model"}
recorded_kwargs: list[dict] = []


def recording_attention(module, query, key, value, attention_mask, **kwargs):
    recorded_kwargs.append(kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(RECORDING_ATTENTION, recording_attention)


def vllm_config(folder):
    """The config as vLLM builds the model from it: `hf_overrides={"auto_map": ...}` (docs/vllm.md), its attention."""
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    config.auto_map = VLLM_AUTO_MAP
    config.get_text_config()._attn_implementation = RECORDING_ATTENTION
    return config


@pytest.fixture(scope="module")
def served_dir(tiny_shared, tmp_path_factory):
    """A folder of its own: transformers keeps the class an Auto class gave for a folder's config for the process."""
    return saved_folder(tmp_path_factory, "served_by_vllm", *tiny_shared)


@pytest.fixture(scope="module")
def vllm_model(served_dir):
    return AutoModel.from_config(vllm_config(served_dir), trust_remote_code=True).eval()


def vllm_forward(model, inputs_embeds, **kwargs):
    """The call of vLLM's `Base.forward`: embeddings, positions, no cache, a tuple back, its own kwargs passed on."""
    positions = torch.arange(inputs_embeds.shape[1])[None]
    return model(input_ids=None, inputs_embeds=inputs_embeds, position_ids=positions, use_cache=False,
                 return_dict=False, **kwargs)


def test_auto_model_mapped_to_the_backbone_builds_the_model_without_head(vllm_model):
    assert type(vllm_model).__name__ == "MiniGPT4Model"
    assert type(vllm_model).__module__.startswith("transformers_modules.")  # the folder's remote code
    assert not any(name.startswith("lm_head") for name, _ in vllm_model.named_parameters())


def test_backbone_called_as_vllm_does_returns_hidden_states_first(vllm_model):
    embeds = vllm_model.get_input_embeddings()(torch.tensor([[1, 20, 30, 40, 50]]))
    with torch.no_grad():
        outputs = vllm_forward(vllm_model, embeds)
    assert isinstance(outputs, tuple)
    assert outputs[0].shape == (1, 5, vllm_model.config.text_config.hidden_size)


def test_backbone_hidden_states_are_those_the_head_of_the_full_model_reads(tiny_shared, served_dir):
    model, _ = tiny_shared
    backbone = AutoModel.from_pretrained(served_dir, config=vllm_config(served_dir), trust_remote_code=True)
    embeds = model.get_input_embeddings()(torch.tensor([[1, 20, 30, 40, 50]]))
    with torch.no_grad():
        hidden = vllm_forward(backbone, embeds)[0]
        torch.testing.assert_close(model.lm_head(hidden), model(inputs_embeds=embeds).logits)


def test_language_model_attention_goes_through_the_attention_interface_with_the_callers_kwargs(vllm_model):
    recorded_kwargs.clear()
    embeds = vllm_model.get_input_embeddings()(torch.tensor([[1, 20, 30]]))
    marker = object()
    with torch.no_grad():
        vllm_forward(vllm_model, embeds, attention_instances=marker)
    assert len(recorded_kwargs) == vllm_model.config.text_config.num_hidden_layers
    assert all(kwargs.get("attention_instances") is marker for kwargs in recorded_kwargs)


def test_models_declare_support_for_the_attention_backends():
    assert MiniGPT4Model.is_backend_compatible()
    assert MiniGPT4ForConditionalGeneration.is_backend_compatible()


def test_encoder_and_decoder_lookups_find_the_vision_model_and_the_language_model(vllm_model):
    assert vllm_model.get_encoder(modality="image") is vllm_model.vision_model
    assert vllm_model.get_decoder() is vllm_model.language_model
    assert vllm_model.language_model.get_input_embeddings() is vllm_model.get_input_embeddings()


def test_image_features_are_one_run_of_query_tokens_per_image(tiny_shared, example_image):
    model, processor = tiny_shared
    pixel_values = processor.image_processor([example_image] * 3, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values)
        pooled = model.model.get_image_features(pixel_values, return_dict=True).pooler_output
    assert features.shape == (3, model.config.num_query_tokens, model.config.text_config.hidden_size)
    torch.testing.assert_close(pooled, features, rtol=0, atol=0)


def test_placeholder_mask_covers_exactly_the_image_tokens(tiny_shared, example_image):
    model, processor = tiny_shared
    inputs = processor(images=[example_image] * 2, text=["<ImageHere> a", "b <ImageHere>"], return_tensors="pt")
    embeds = model.get_input_embeddings()(inputs["input_ids"].clamp(max=model.config.text_config.vocab_size - 1))
    features = torch.zeros(2, model.config.num_query_tokens, model.config.text_config.hidden_size)
    mask = model.model.get_placeholder_mask(inputs["input_ids"], embeds, features)
    assert mask.shape == (*inputs["input_ids"].shape, 1)
    assert torch.equal(mask[..., 0], inputs["input_ids"] == model.config.image_token_id)
    with pytest.raises(ValueError, match="image tokens"):
        model.model.get_placeholder_mask(inputs["input_ids"], embeds, features[:1])


def test_processor_names_the_image_token_and_its_id(tiny_shared):
    _, processor = tiny_shared
    assert processor.image_token == "<ImageHere>"
    assert processor.tokenizer.convert_tokens_to_ids(processor.image_token) == processor.image_token_id


def test_processor_counts_the_image_tokens_of_any_image_size(tiny_shared):
    _, processor = tiny_shared
    counts = processor._get_num_multimodal_tokens(image_sizes=[[20, 30], [480, 640]])
    assert counts.num_image_tokens == [processor.num_query_tokens] * 2
    assert counts.num_image_patches == [1, 1]


def test_processor_marks_image_tokens_in_mm_token_type_ids(tiny_shared, example_image):
    _, processor = tiny_shared
    inputs = processor(images=[example_image], text=["<ImageHere> a", "b"], return_mm_token_type_ids=True,
                       return_tensors="pt")
    assert torch.equal(inputs["mm_token_type_ids"], (inputs["input_ids"] == processor.image_token_id).long())
