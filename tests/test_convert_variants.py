"""
The converter on MiniGPT-4 with Llama-2 and MiniGPT-v2 files: which family a checkpoint is, the image size and its
position embeddings, the LoRA (merged or as a PEFT adapter), and bad input. Numerical parity with the original is in
test_parity_variants.py; the Vicuna v0 route in test_convert.py.
"""

import json

import pytest
import torch
from minigpt4_hf.cli.convert import main as convert_main
from minigpt4_hf.conversion import (
    KINDS,
    InputFile,
    check_against_model,
    derive_config,
    detect_variant,
    interpolate_position_embedding,
    plan_conversion,
    plan_default_layernorm,
    plan_lora,
    plan_lora_merge,
    split_lora_tensors,
    text_config_dict,
)
from safetensors import safe_open
from test_convert import INPUTS, assert_refused, edited_checkpoint, fixture_argv, load_source, meta
from test_convert import original_eva_vit_g, output_parent, saved_tensors  # noqa: F401 (output_parent: a fixture)
from test_parity_variants import VARIANTS
from tokenizers import Tokenizer, models
from transformers import AutoModelForImageTextToText, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from processing_minigpt4 import CHAT_TEMPLATES


LLAMA2 = VARIANTS["llama2"]
V2 = VARIANTS["v2"]
V2_CHECKPOINT = V2.folder / "weights" / V2.projection_file
LORA_KEY = "llama_model.base_model.model.model.layers.{layer}.self_attn.{module}.lora_{part}.weight"


def config_of(folder) -> dict:
    return json.loads((folder / "config.json").read_text())


def saved_tensor(folder, name: str) -> torch.Tensor:
    for path in folder.glob("*.safetensors"):
        with safe_open(path, framework="pt") as handle:
            if name in handle.keys():
                return handle.get_tensor(name)
    raise KeyError(name)


def v2_file_tensors() -> dict[str, torch.Tensor]:
    return load_source(V2_CHECKPOINT)["model"]


def llm_file_tensors() -> dict[str, torch.Tensor]:
    return load_source(V2.folder / "weights" / "llama2_chat_tiny" / "pytorch_model.bin")


@pytest.fixture(scope="module")
def converted_v2(tmp_path_factory):
    return V2.convert(tmp_path_factory.mktemp("v2") / "out")


# ---------------------------------------------------------------------------------------------------------------------
# Which family: read from the projection checkpoint, or --variant.


def test_vicuna_projection_converts_as_vicuna0_with_the_qformer(tmp_path):
    assert convert_main(fixture_argv(tmp_path / "out", extra=("--dtype", "float32"))) == 0
    config = config_of(tmp_path / "out")
    assert (config["variant"], config["use_qformer"]) == ("vicuna0", True)


def test_projection_of_four_vit_widths_without_lora_converts_as_llama2(tmp_path):
    output_dir = LLAMA2.convert(tmp_path / "out")
    config = config_of(output_dir)
    assert (config["variant"], config["use_qformer"], config["vision_token_merge"]) == ("llama2", False, 4)
    assert (output_dir / "chat_template.jinja").read_text() == CHAT_TEMPLATES["llama2"]


def test_projection_with_lora_tensors_converts_as_v2(converted_v2):
    assert config_of(converted_v2)["variant"] == "v2"
    assert (converted_v2 / "chat_template.jinja").read_text() == CHAT_TEMPLATES["v2"]


def test_variant_flag_overrides_the_detected_family(tmp_path):
    overrides = tmp_path / "overrides.json"
    overrides.write_text(json.dumps({"vision_config": {"num_attention_heads": 4, "image_size": 112}}))
    output_dir = tmp_path / "out"
    assert convert_main(LLAMA2.argv(output_dir, {"--variant": "v2", "--config-overrides": overrides})) == 0
    assert config_of(output_dir)["variant"] == "v2"
    assert json.loads((output_dir / "generation_config.json").read_text())["temperature"] == 0.6


def test_qformer_checkpoint_given_for_llama2_is_not_used(tmp_path, capsys):
    output_dir = tmp_path / "out"
    argv = LLAMA2.argv(output_dir, {"--qformer-checkpoint": INPUTS["--qformer-checkpoint"]})
    assert convert_main(argv) == 0
    tensors = saved_tensors(output_dir)
    assert not any(name.startswith(("model.qformer.", "model.query_tokens")) for name in tensors)
    assert torch.equal(tensors["model.vision_model.post_layernorm.weight"], torch.ones(56))  # not BLIP-2's ln_vision
    assert "no Q-Former and no BLIP-2 ln_vision in this variant" in capsys.readouterr().out


def test_ln_vision_without_qformer_is_ones_and_zeros(converted_v2):
    assert torch.equal(saved_tensor(converted_v2, "model.vision_model.post_layernorm.weight"), torch.ones(56))
    assert torch.equal(saved_tensor(converted_v2, "model.vision_model.post_layernorm.bias"), torch.zeros(56))
    assert config_of(converted_v2)["vision_layernorm_eps"] == 1e-5


# ---------------------------------------------------------------------------------------------------------------------
# Image size and position embeddings.


def test_position_embedding_interpolation_keeps_the_class_token_and_resizes_the_grid():
    position_embedding = torch.randn(1, 17, 8)
    resized = interpolate_position_embedding(position_embedding, grid=8)
    assert resized.shape == (1, 65, 8) and resized.dtype == torch.float32
    assert torch.equal(resized[:, 0], position_embedding[:, 0])
    grid = position_embedding[0, 1:].reshape(4, 4, 8).permute(2, 0, 1)[None]
    expected = torch.nn.functional.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False)
    torch.testing.assert_close(resized[0, 1:], expected[0].permute(1, 2, 0).reshape(64, 8), rtol=0, atol=0)


def test_v2_runs_at_448_px_unless_the_overrides_say_otherwise(tmp_path):
    overrides = tmp_path / "overrides.json"
    overrides.write_text(json.dumps({"vision_config": {"num_attention_heads": 4}}))
    output_dir = tmp_path / "out"
    assert convert_main(V2.argv(output_dir, {"--config-overrides": overrides})) == 0
    config = config_of(output_dir)
    assert config["vision_config"]["image_size"] == 448
    assert saved_tensor(output_dir, "model.vision_model.embeddings.position_embedding").shape == (1, 32 * 32 + 1, 56)
    processor_config = json.loads((output_dir / "processor_config.json").read_text())
    assert processor_config["num_image_tokens"] == 256
    assert processor_config["image_processor"]["size"] == {"height": 448, "width": 448}


def test_position_embeddings_are_resized_to_the_requested_image_size(tmp_path):
    overrides = tmp_path / "overrides.json"
    overrides.write_text(json.dumps({"vision_config": {"num_attention_heads": 4, "image_size": 112}}))
    output_dir = tmp_path / "out"
    assert convert_main(LLAMA2.argv(output_dir, {"--config-overrides": overrides})) == 0  # Llama-2 at 112 px
    stored = load_source(LLAMA2.folder / "weights" / "eva_vit_g.pth")["pos_embed"]
    saved = saved_tensor(output_dir, "model.vision_model.embeddings.position_embedding")
    assert torch.equal(saved, interpolate_position_embedding(stored, grid=8))
    assert config_of(output_dir)["vision_config"]["image_size"] == 112


# ---------------------------------------------------------------------------------------------------------------------
# LoRA.


def merged_weight(module: str, layer: int, alpha: float, rank: int = 4) -> torch.Tensor:
    lora = v2_file_tensors()
    weight = llm_file_tensors()[f"model.layers.{layer}.self_attn.{module}.weight"]
    lora_a = lora[LORA_KEY.format(layer=layer, module=module, part="A")]
    lora_b = lora[LORA_KEY.format(layer=layer, module=module, part="B")]
    return weight.float() + alpha / rank * (lora_b.float() @ lora_a.float())


@pytest.mark.parametrize("alpha_flag, alpha", [(None, 16), ("1", 1)])
def test_lora_is_merged_with_scaling_alpha_over_rank_read_from_shapes(tmp_path, alpha_flag, alpha):
    output_dir = tmp_path / "out"
    assert convert_main(V2.argv(output_dir, {"--lora-alpha": alpha_flag})) == 0
    for layer in (0, 1):
        for module in ("q_proj", "v_proj"):
            saved = saved_tensor(output_dir, f"model.language_model.layers.{layer}.self_attn.{module}.weight")
            torch.testing.assert_close(saved, merged_weight(module, layer, alpha), rtol=0, atol=0)
    untouched = saved_tensor(output_dir, "model.language_model.layers.0.self_attn.k_proj.weight")
    assert torch.equal(untouched, llm_file_tensors()["model.layers.0.self_attn.k_proj.weight"])


def test_lora_is_merged_in_float32_then_cast(tmp_path):
    output_dir = tmp_path / "out"
    assert convert_main(V2.argv(output_dir, {"--dtype": "float16"})) == 0
    saved = saved_tensor(output_dir, "model.language_model.layers.1.self_attn.v_proj.weight")
    assert torch.equal(saved, merged_weight("v_proj", 1, alpha=1).half())


def test_newer_peft_key_spelling_with_default_converts_the_same(tmp_path, converted_v2):
    def respell(checkpoint):
        checkpoint["model"] = {key.replace(".weight", ".default.weight") if "lora_" in key else key: value
                               for key, value in checkpoint["model"].items()}
    projection = edited_checkpoint(tmp_path, V2_CHECKPOINT, "minigptv2_default.pth", respell)
    output_dir = tmp_path / "out"
    assert convert_main(V2.argv(output_dir, {"--projection-checkpoint": projection})) == 0
    reference, converted = saved_tensors(converted_v2), saved_tensors(output_dir)
    assert converted.keys() == reference.keys()
    assert all(torch.equal(converted[name], reference[name]) for name in reference)


@pytest.fixture(scope="module")
def converted_v2_adapter(tmp_path_factory):
    return V2.convert(tmp_path_factory.mktemp("v2_adapter") / "out", "--lora", "adapter")


def test_lora_adapter_is_a_standard_peft_folder_with_the_released_settings(converted_v2_adapter):
    adapter = converted_v2_adapter / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["lora_dropout"]) == ("LORA", 4, 1, 0.05)
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"] and config["bias"] == "none"
    with safe_open(adapter / "adapter_model.safetensors", framework="pt") as handle:
        assert len(list(handle.keys())) == 8  # every LoRA tensor of the checkpoint


def test_lora_adapter_leaves_the_language_model_weights_as_they_were(converted_v2_adapter):
    saved = saved_tensor(converted_v2_adapter, "model.language_model.layers.0.self_attn.q_proj.weight")
    assert torch.equal(saved, llm_file_tensors()["model.layers.0.self_attn.q_proj.weight"])


def test_model_with_the_loaded_adapter_equals_the_merged_model(converted_v2_adapter, converted_v2):
    inputs = {"input_ids": torch.tensor([[1, 1, 267, 271, 942, 285, 274, 932, 286, 271, 942]])}
    merged = AutoModelForImageTextToText.from_pretrained(converted_v2, trust_remote_code=True).eval()
    model = AutoModelForImageTextToText.from_pretrained(converted_v2_adapter, trust_remote_code=True).eval()
    with torch.no_grad():
        without_adapter = model(**inputs).logits
        model.load_adapter(str(converted_v2_adapter / "adapter"))
        with_adapter = model(**inputs).logits
        expected = merged(**inputs).logits
    torch.testing.assert_close(with_adapter, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(without_adapter, expected, atol=1e-2)  # the LoRA matters


# ---------------------------------------------------------------------------------------------------------------------
# Full-size shapes (meta tensors): the released MiniGPT-v2 file on Llama-2-7B-chat.


def llama2_7b_chat() -> tuple[dict, LlamaConfig]:
    config = LlamaConfig(vocab_size=32000, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                         intermediate_size=11008, rms_norm_eps=1e-5)
    with torch.device("meta"):
        return dict(LlamaForCausalLM(config).state_dict()), config


def released_v2_checkpoint() -> dict:
    state = {"llama_proj.weight": meta(4096, 5632), "llama_proj.bias": meta(4096)}
    for layer in range(32):
        for module in ("q_proj", "v_proj"):
            state[LORA_KEY.format(layer=layer, module=module, part="A")] = meta(64, 4096)
            state[LORA_KEY.format(layer=layer, module=module, part="B")] = meta(4096, 64)
    return state


def test_full_size_v2_file_plans_448_px_256_tokens_and_consumes_all_128_lora_tensors():
    llm_state, llm_config = llama2_7b_chat()
    projection = InputFile.from_state_dict(KINDS["projection"], released_v2_checkpoint(),
                                           "--projection-checkpoint minigptv2_checkpoint.pth")
    lora_tensors = split_lora_tensors(projection)
    plan = plan_conversion([
        InputFile.from_state_dict(KINDS["vit"], original_eva_vit_g(), "--vit-checkpoint eva_vit_g.pth"),
        projection,
        InputFile.from_state_dict(KINDS["llm"], llm_state, "--llm Llama-2-7b-chat-hf"),
    ])
    variant = detect_variant(plan, has_lora=bool(lora_tensors))
    plan_default_layernorm(plan)
    lora = plan_lora(plan, lora_tensors, alpha=16)
    plan_lora_merge(plan, lora)
    config = derive_config(plan, text_config_dict(llm_config), overrides={}, variant=variant)
    assert variant == "v2" and len(lora_tensors) == 128
    assert (lora.rank, lora.scaling, len(lora.modules)) == (64, 0.25, 64)
    assert (config.vision_config.image_size, config.num_image_tokens) == (448, 256)
    assert plan.shape("model.vision_model.embeddings.position_embedding") == (1, 1025, 1408)
    names = check_against_model(plan, config)
    assert not any(name.startswith(("model.qformer.", "model.query_tokens")) for name in names)


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: a clear message naming file and key, exit code 2, nothing left in the output's parent folder.


def edited_v2_checkpoint(tmp_path, edit) -> str:
    return edited_checkpoint(tmp_path, V2_CHECKPOINT, "minigptv2_checkpoint.pth", edit)


def test_lora_keys_matching_no_layer_are_refused(output_parent, tmp_path):
    def rename(checkpoint):
        checkpoint["model"] = {key.replace("q_proj", "qkv_proj"): value for key, value in checkpoint["model"].items()}
    projection = edited_v2_checkpoint(tmp_path, rename)
    key = LORA_KEY.format(layer=0, module="qkv_proj", part="A")
    assert_refused(V2.argv(output_parent / "out", {"--projection-checkpoint": projection}), output_parent,
                   f"--projection-checkpoint {projection}: key '{key}' matches no layer of the language model")


def test_lora_of_another_width_is_refused(output_parent, tmp_path):
    key = LORA_KEY.format(layer=1, module="v_proj", part="A")

    def widen(checkpoint):
        checkpoint["model"][key] = torch.zeros(4, 80)
    projection = edited_v2_checkpoint(tmp_path, widen)
    assert_refused(V2.argv(output_parent / "out", {"--projection-checkpoint": projection}), output_parent,
                   f"--projection-checkpoint {projection}: keys '{key}' [4, 80]", "do not fit",
                   "'model.layers.1.self_attn.v_proj.weight' in --llm")


def test_lora_for_more_layers_than_the_language_model_is_refused(output_parent, tmp_path):
    key = LORA_KEY.format(layer=2, module="q_proj", part="A")

    def add_layer(checkpoint):
        for part, shape in (("A", (4, 64)), ("B", (64, 4))):
            checkpoint["model"][LORA_KEY.format(layer=2, module="q_proj", part=part)] = torch.zeros(shape)
    projection = edited_v2_checkpoint(tmp_path, add_layer)
    assert_refused(V2.argv(output_parent / "out", {"--projection-checkpoint": projection}), output_parent,
                   f"key '{key}' is LoRA for layer 2, but the language model in --llm has 2 layers")


def test_projection_fitting_no_bridge_is_refused(output_parent, tmp_path):
    def narrow(checkpoint):
        checkpoint["model"]["llama_proj.weight"] = torch.zeros(64, 100)
    projection = edited_checkpoint(tmp_path, LLAMA2.folder / "weights" / LLAMA2.projection_file, "proj.pth", narrow)
    assert_refused(LLAMA2.argv(output_parent / "out", {"--projection-checkpoint": projection}), output_parent, f"'llama_proj.weight' in --projection-checkpoint {projection} has shape [64, 100]",
                   "fits no MiniGPT bridge", "Q-Former width 768", "4 x the ViT width 56 = 224")


def test_variant_flag_that_does_not_fit_the_projection_is_refused(output_parent):
    assert_refused(LLAMA2.argv(output_parent / "out", {"--variant": "vicuna0"}), output_parent,
                   "--variant vicuna0 does not fit 'llama_proj.weight'")


def test_vicuna_projection_without_qformer_checkpoint_is_refused(output_parent, tmp_path):
    def from_768(checkpoint):  # the real Q-Former width, which the converter assumes without the BLIP-2 file
        checkpoint["model"]["llama_proj.weight"] = torch.zeros(64, 768)
    projection = edited_checkpoint(tmp_path, INPUTS["--projection-checkpoint"], "pretrained_minigpt4.pth", from_768)
    argv = fixture_argv(output_parent / "out", {"--qformer-checkpoint": None, "--projection-checkpoint": projection})
    assert_refused(argv, output_parent, "is MiniGPT-4 with Vicuna, which needs the BLIP-2 Q-Former",
                   "pass --qformer-checkpoint")


def test_448_px_with_position_embeddings_that_are_not_a_square_is_refused(output_parent, tmp_path):
    def cut(state):
        state["pos_embed"] = state["pos_embed"][:, :16]  # 15 patch positions: no square grid
    vit = edited_checkpoint(tmp_path, V2.folder / "weights" / "eva_vit_g.pth", "eva_vit_g.pth", cut)
    overrides = tmp_path / "overrides.json"
    overrides.write_text(json.dumps({"vision_config": {"num_attention_heads": 4}}))  # v2's own 448 px
    argv = V2.argv(output_parent / "out", {"--vit-checkpoint": vit, "--config-overrides": overrides})
    assert_refused(argv, output_parent,
                   f"'pos_embed' in --vit-checkpoint {vit} has shape [1, 16, 56]: not 1 + a square grid",
                   "cannot run at 448 px")


def tiny_llm_with_vocabulary(tmp_path, vocabulary: int = 32000):
    """A tiny LLaMA (width 64, as the fixtures' projections) with a full-size vocabulary and its tokenizer."""
    folder = tmp_path / f"vocabulary-{vocabulary}"
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"piece{i}": i for i in range(3, vocabulary)}}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                        bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(vocab_size=vocabulary, hidden_size=64, intermediate_size=172, num_hidden_layers=1,
                         num_attention_heads=4)
    LlamaForCausalLM(config).half().save_pretrained(folder)
    return folder


def test_llama2_tokenizer_with_a_vicuna_v0_projection_is_refused(output_parent, tmp_path):
    llm = tiny_llm_with_vocabulary(tmp_path)
    assert_refused(fixture_argv(output_parent / "out", {"--llm": llm}), output_parent,
                   f"--llm {llm}: the tokenizer has 32000 tokens", "MiniGPT-4 with Vicuna v0",
                   "vocabulary is 32001")


def test_vicuna_v0_tokenizer_with_a_llama2_projection_is_refused(output_parent, tmp_path):
    llm = tiny_llm_with_vocabulary(tmp_path, vocabulary=32001)
    assert_refused(LLAMA2.argv(output_parent / "out", {"--llm": llm}), output_parent,
                   f"--llm {llm}: the tokenizer has 32001 tokens, the vocabulary of Vicuna v0",
                   "Pass meta-llama/Llama-2-7b-chat-hf")
