"""
Parity with the original MiniGPT-4, in one place: the tiny original-format checkpoints of tests/fixtures/original_tiny,
converted with minigpt4-convert and loaded with the Auto classes, reproduce every value the original code recorded
(tolerances from the fixture's MANIFEST.md: fp32, CPU).

Not compared, by design: the chat variant with repetition_penalty=1.05. The original generated from inputs_embeds
only, so its penalty saw a BOS placeholder and no prompt tokens; transformers' generate penalises the prompt tokens.
The model card and README document the difference.
"""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ORIGINAL_TINY
from PIL import Image
from minigpt4_hf.training import clean_caption  # the shared blip_caption text processor (stage-1 captions)
from transformers import AutoModelForImageTextToText, AutoProcessor


EXPECTED = ORIGINAL_TINY / "expected"
IMAGE_NAMES = ["astronaut", "coffee", "chelsea"]  # the order of the recorded batch
TOLERANCE_FEATURES = {"rtol": 1e-4, "atol": 1e-5}
TOLERANCE_LOGITS = {"rtol": 0.0, "atol": 1e-3}
TOLERANCE_LOSS = {"rtol": 0.0, "atol": 1e-4}
TOLERANCE_NLL = {"rtol": 0.0, "atol": 1e-3}
TOLERANCE_GRADIENT = {"rtol": 1e-3, "atol": 1e-5}
STAGES = {  # fixture name -> (expected .pt file, expected.json section)
    "stage2": ("train_stage2.pt", "stage2_loss"),
    "stage2_two_prompts": ("train_stage2_two_prompts.pt", "stage2_two_prompts_loss"),
    "stage1": ("train_stage1.pt", "stage1_loss"),
}


# ---------------------------------------------------------------------------------------------------------------------
# Fixtures: convert once, load once, compute each recorded quantity once.


@pytest.fixture(scope="module")
def model(converted_tiny_dir):
    return AutoModelForImageTextToText.from_pretrained(converted_tiny_dir, trust_remote_code=True).eval()


@pytest.fixture(scope="module")
def processor(converted_tiny_dir):
    return AutoProcessor.from_pretrained(converted_tiny_dir, trust_remote_code=True)


@pytest.fixture(scope="module")
def expected_json():
    return json.loads((EXPECTED / "expected.json").read_text())


@pytest.fixture(scope="module")
def images():
    return {name: Image.open(ORIGINAL_TINY / "inputs" / f"{name}.png").convert("RGB") for name in IMAGE_NAMES}


def load_expected(filename: str) -> dict:
    return torch.load(EXPECTED / filename, map_location="cpu", weights_only=True)


def load_recorded_pixels() -> dict:
    return torch.load(ORIGINAL_TINY / "inputs" / "pixel_values.pt", map_location="cpu", weights_only=True)


def capture_outputs(modules: dict) -> tuple[dict, list]:
    """Forward hooks storing each module's first output (first element of a tuple) under its name."""
    captured, handles = {}, []
    for name, module in modules.items():
        def hook(_module, _inputs, output, name=name):
            captured.setdefault(name, output[0] if isinstance(output, tuple) else output)
        handles.append(module.register_forward_hook(hook))
    return captured, handles


def language_model_inputs(model) -> tuple[dict, object]:
    """A hook storing the `inputs_embeds` the language model receives."""
    captured = {}

    def hook(_module, _args, kwargs):
        captured.setdefault("inputs_embeds", kwargs["inputs_embeds"].detach().clone())

    return captured, model.language_model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.fixture(scope="module")
def image_features(model, processor, images):
    """Every intermediate of `encode_img` on the batch of three images, as the original's hooks recorded them."""
    vision, qformer = model.vision_model, model.qformer
    captured, handles = capture_outputs({
        "vit_patch_embed": vision.embeddings.patch_embedding,
        "vit_block0": vision.encoder.layers[0],
        "vit_block1": vision.encoder.layers[1],
        "ln_vision_out": vision.post_layernorm,
        "qformer_embeddings_out": qformer.layernorm,
        "qformer_layer0": qformer.encoder.layer[0],
        "qformer_layer1": qformer.encoder.layer[1],
    })
    # The post-layernorm (ln_vision) runs on all tokens first, then again on the pooled class token: keep the first.
    handles.append(vision.post_layernorm.register_forward_pre_hook(
        lambda _module, inputs: captured.setdefault("vit_out", inputs[0])
    ))
    pixel_values = processor.image_processor([images[name] for name in IMAGE_NAMES], return_tensors="pt")
    with torch.no_grad():
        features = model.get_image_features(pixel_values["pixel_values"], return_dict=True)
    for handle in handles:
        handle.remove()
    captured["vit_patch_embed"] = captured["vit_patch_embed"].flatten(2).transpose(1, 2)  # conv map -> tokens
    captured["qformer_out"] = features.qformer_last_hidden_state
    captured["llama_proj_out"] = captured["inputs_llama"] = features.pooler_output
    # The image tokens' attention in a processed prompt (the original's atts_llama).
    prompts = processor(images=[images[name] for name in IMAGE_NAMES], text=["<ImageHere>"] * 3, return_tensors="pt")
    image_positions = prompts["input_ids"] == processor.image_token_id
    captured["atts_llama"] = prompts["attention_mask"][image_positions].view(3, -1)
    return captured


def chat_record(model, processor, image, prompt: str, max_new_tokens: int) -> dict:
    """
    What the original's chat fixture records for one prompt and image: the prompt and its text segments' ids, the
    language model's input embeddings (image rows too), the last prompt logits, greedy generation with its processed
    scores, the teacher-forced raw logits and the answer.
    """
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    prompt_length = inputs["input_ids"].shape[1]
    captured, handle = language_model_inputs(model)
    with torch.no_grad():
        last_prompt_logits = model(**inputs).logits[0, -1]
    handle.remove()
    with torch.no_grad():
        generated = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, repetition_penalty=1.0,
            output_scores=True, return_dict_in_generate=True,
        )
    new_ids = generated.sequences[0, prompt_length:]
    teacher_forced_ids = torch.cat([inputs["input_ids"], new_ids[None, :-1]], dim=1)
    with torch.no_grad():
        teacher_forced = model(
            input_ids=teacher_forced_ids, pixel_values=inputs["pixel_values"],
            attention_mask=torch.ones_like(teacher_forced_ids),
        ).logits[0, prompt_length - 1:]
    ids = inputs["input_ids"][0].tolist()
    image_positions = [i for i, token in enumerate(ids) if token == processor.image_token_id]
    image_mask = inputs["input_ids"][0] == processor.image_token_id
    return {
        "prompt": prompt,
        "segment_token_ids": [ids[: image_positions[0]], ids[image_positions[-1] + 1:]],
        "context_embs": captured["inputs_embeds"][0],
        "image_embs": captured["inputs_embeds"][0][image_mask],
        "last_prompt_logits": last_prompt_logits,
        "step_scores_processed": torch.stack([scores[0] for scores in generated.scores]),
        "step_logits_raw_teacher_forced": teacher_forced,
        "generated_ids": new_ids,
        "answer_text": processor.decode_answers(generated.sequences, prompt_length=prompt_length)[0],
    }


@pytest.fixture(scope="module")
def chat_results(model, processor, images):
    """Per image: the chat as the original ran it (single turn, greedy, 20 new tokens), and what to compare."""
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image in detail."}]}
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    results = {}
    for name in IMAGE_NAMES:
        results[name] = chat_record(model, processor, images[name], prompt, max_new_tokens=20)
    return results


def stage_batch(processor, images, section: dict, indices: list[int]):
    """The training batch of one recorded stage (rows `indices`), built by the processor with `suffix=`."""
    prompts = section["prompt_used"]
    if prompts is None:  # stage 1: no prompt at all, [BOS][image][caption + end_sym]
        prompts = "<ImageHere>"
        answers = [clean_caption(caption) for caption in section["raw_captions_before_blip_caption_processor"]]
    else:
        answers = section["answers"]
    prompts = prompts if isinstance(prompts, list) else [prompts] * len(answers)
    return processor(
        images=[images[section["images"][i]] for i in indices],
        text=[prompts[i] for i in indices],
        suffix=[answers[i] + section["end_sym"] for i in indices],
        max_txt_len=section["max_txt_len"],
        return_tensors="pt",
    )


def per_position_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`(B, T, V), (B, T) -> (B, T - 1)`: cross-entropy of the shifted logits, 0 where the label is -100."""
    batch, length = labels.shape
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), reduction="none", ignore_index=-100
    ).view(batch, length - 1)


@pytest.fixture(scope="module")
def stage_results(model, processor, images, expected_json):
    """Per stage: batch loss, targets, masks, inputs_embeds, per-position NLL, bs=1 runs, train-mode gradients."""
    results = {}
    for stage, (_, section_name) in STAGES.items():
        section = expected_json[section_name]
        batch = stage_batch(processor, images, section, [0, 1])
        captured, handle = language_model_inputs(model)
        with torch.no_grad():
            output = model(**batch)
        handle.remove()
        nll = per_position_nll(output.logits, batch["labels"])
        result = {
            "loss_batch": output.loss,
            "targets": batch["labels"],
            "attention_mask": batch["attention_mask"],
            "inputs_embeds": captured["inputs_embeds"],
            "per_position_nll": nll,
            "loss_reduction_none": nll.sum(dim=1) / nll.shape[1],
        }
        single_losses = []
        for i in range(2):
            single = stage_batch(processor, images, section, [i])
            with torch.no_grad():
                single_losses.append(model(**single).loss)
            result[f"sample{i}_bs1_targets"] = single["labels"]
            result[f"sample{i}_bs1_attention_mask"] = single["attention_mask"]
        result["loss_per_sample_bs1"] = torch.stack(single_losses)

        model.train()
        model.zero_grad(set_to_none=True)
        train_output = model(**batch)
        train_output.loss.backward()
        result["loss_train_mode"] = train_output.loss.detach()
        result["grad_llama_proj_weight"] = model.language_projection.weight.grad.clone()
        result["grad_llama_proj_bias"] = model.language_projection.bias.grad.clone()
        model.zero_grad(set_to_none=True)
        model.eval()
        results[stage] = result
    return results


# ---------------------------------------------------------------------------------------------------------------------
# Preprocessing and tokenization.


def test_pixel_values_match_original(processor, images):
    expected = load_recorded_pixels()
    assert expected["names"] == IMAGE_NAMES
    pixel_values = processor.image_processor([images[name] for name in IMAGE_NAMES], return_tensors="pt")
    torch.testing.assert_close(pixel_values["pixel_values"], expected["pixel_values"], rtol=0.0, atol=1e-6)


def test_resized_uint8_image_matches_original_exactly(processor, images):
    expected = load_recorded_pixels()["resized_uint8_hwc"]
    image_processor = processor.image_processor
    size = image_processor.size  # a SizeDict of the target height and width
    for index, name in enumerate(IMAGE_NAMES):
        channels_first = np.asarray(images[name]).transpose(2, 0, 1)
        resized = image_processor.resize(channels_first, size=size, resample=image_processor.resample)
        assert torch.equal(torch.from_numpy(np.ascontiguousarray(resized.transpose(1, 2, 0))), expected[index])


def test_converted_tokenizer_reproduces_original_tokenization_probes(processor, expected_json):
    tokenizer = processor.tokenizer
    for probe in expected_json["tokenization_probes"]:
        if probe["text"] == processor.image_token:  # the placeholder is now one special token, by design
            assert tokenizer(probe["text"], add_special_tokens=False)["input_ids"] == [processor.image_token_id]
            continue
        assert tokenizer(probe["text"], add_special_tokens=False)["input_ids"] == probe["ids_no_special"], probe
        assert tokenizer(probe["text"])["input_ids"] == probe["ids_with_special"], probe
        assert tokenizer.decode(probe["ids_with_special"], skip_special_tokens=True) == probe["decode_skip_special"]


# ---------------------------------------------------------------------------------------------------------------------
# Image features (a): ViT -> ln_vision -> Q-Former -> projection.

IMAGE_FEATURE_NAMES = [
    "vit_patch_embed", "vit_block0", "vit_block1", "vit_out", "ln_vision_out", "qformer_embeddings_out",
    "qformer_layer0", "qformer_layer1", "qformer_out", "llama_proj_out", "inputs_llama",
]


@pytest.mark.parametrize("name", IMAGE_FEATURE_NAMES)
def test_image_feature_matches_original(image_features, name):
    expected = load_expected("image_features.pt")[name]
    torch.testing.assert_close(image_features[name], expected, **TOLERANCE_FEATURES)


def test_image_tokens_are_attended_like_original(image_features):
    assert torch.equal(image_features["atts_llama"], load_expected("image_features.pt")["atts_llama"])


# ---------------------------------------------------------------------------------------------------------------------
# Chat (c): prompt, context, logits, greedy generation.


@pytest.mark.parametrize("image", IMAGE_NAMES)
def test_chat_prompt_string_matches_original(chat_results, expected_json, image):
    recorded = next(entry for entry in expected_json["chat"]["greedy"] if entry["image"] == image)
    assert chat_results[image]["prompt"] == recorded["prompt"]


@pytest.mark.parametrize("image", IMAGE_NAMES)
def test_chat_segment_token_ids_match_original(chat_results, expected_json, image):
    recorded = next(entry for entry in expected_json["chat"]["greedy"] if entry["image"] == image)
    assert chat_results[image]["segment_token_ids"] == recorded["segment_token_ids"]


@pytest.mark.parametrize("image", IMAGE_NAMES)
def test_chat_context_embeddings_match_original(chat_results, image):
    expected = load_expected("chat.pt")[f"chat_{image}_context_embs"]
    torch.testing.assert_close(chat_results[image]["context_embs"], expected, **TOLERANCE_FEATURES)


@pytest.mark.parametrize("image", IMAGE_NAMES)
def test_chat_image_embeddings_match_original(chat_results, image):
    expected = load_expected("chat.pt")[f"chat_{image}_image_embs"]
    torch.testing.assert_close(chat_results[image]["image_embs"], expected, **TOLERANCE_FEATURES)


@pytest.mark.parametrize("image", IMAGE_NAMES)
def test_last_prompt_logits_match_original(chat_results, image):
    expected = load_expected("chat.pt")[f"chat_{image}_last_prompt_logits"]
    torch.testing.assert_close(chat_results[image]["last_prompt_logits"], expected, **TOLERANCE_LOGITS)


@pytest.mark.parametrize("image", IMAGE_NAMES)
def test_cached_step_scores_match_original(chat_results, image):
    expected = load_expected("chat.pt")[f"chat_{image}_step_scores_processed"]
    torch.testing.assert_close(chat_results[image]["step_scores_processed"], expected, **TOLERANCE_LOGITS)


@pytest.mark.parametrize("image", IMAGE_NAMES)
def test_teacher_forced_logits_match_original(chat_results, image):
    expected = load_expected("chat.pt")[f"chat_{image}_step_logits_raw_teacher_forced"]
    torch.testing.assert_close(chat_results[image]["step_logits_raw_teacher_forced"], expected, **TOLERANCE_LOGITS)


@pytest.mark.parametrize("image", IMAGE_NAMES)
def test_greedy_generated_ids_match_original(chat_results, image):
    expected = load_expected("chat.pt")[f"chat_{image}_generated_ids"]
    assert chat_results[image]["generated_ids"].tolist() == expected.tolist()


@pytest.mark.parametrize("image", IMAGE_NAMES)
def test_chat_answer_text_matches_original(chat_results, expected_json, image):
    recorded = next(entry for entry in expected_json["chat"]["greedy"] if entry["image"] == image)
    assert chat_results[image]["answer_text"] == recorded["answer_text"]


# ---------------------------------------------------------------------------------------------------------------------
# Training (b, b', d): stage-2 with one prompt, with per-sample prompts, stage-1 captions.


def test_stage1_captions_are_cleaned_like_blip_caption(expected_json):
    processing = expected_json["stage1_caption_processing"]
    assert [clean_caption(caption) for caption in processing["raw"]] == processing["blip_caption"]


def expected_stage(stage: str, quantity: str) -> torch.Tensor:
    return load_expected(STAGES[stage][0])[f"{stage}_{quantity}"]


@pytest.mark.parametrize("stage", STAGES)
def test_training_targets_match_original(stage_results, stage):
    assert torch.equal(stage_results[stage]["targets"], expected_stage(stage, "targets"))


@pytest.mark.parametrize("stage", STAGES)
def test_training_attention_mask_matches_original(stage_results, stage):
    assert torch.equal(stage_results[stage]["attention_mask"], expected_stage(stage, "attention_mask"))


@pytest.mark.parametrize("stage", STAGES)
def test_training_inputs_embeds_match_original_where_attended(stage_results, stage):
    # Padding positions differ by design (the original padded with the '$$' embedding); they are not attended.
    attended = expected_stage(stage, "attention_mask").bool()
    torch.testing.assert_close(
        stage_results[stage]["inputs_embeds"][attended], expected_stage(stage, "inputs_embeds")[attended],
        **TOLERANCE_FEATURES,
    )


@pytest.mark.parametrize("stage", STAGES)
def test_training_batch_loss_matches_original(stage_results, stage):
    torch.testing.assert_close(
        stage_results[stage]["loss_batch"], expected_stage(stage, "loss_batch"), **TOLERANCE_LOSS
    )


@pytest.mark.parametrize("stage", STAGES)
def test_training_per_position_nll_matches_original(stage_results, stage):
    torch.testing.assert_close(
        stage_results[stage]["per_position_nll"], expected_stage(stage, "per_position_nll"), **TOLERANCE_NLL
    )


@pytest.mark.parametrize("stage", STAGES)
def test_training_reduction_none_losses_match_original(stage_results, stage):
    torch.testing.assert_close(
        stage_results[stage]["loss_reduction_none"], expected_stage(stage, "loss_reduction_none"), **TOLERANCE_LOSS
    )


@pytest.mark.parametrize("stage", STAGES)
def test_training_per_sample_bs1_losses_match_original(stage_results, stage):
    torch.testing.assert_close(
        stage_results[stage]["loss_per_sample_bs1"], expected_stage(stage, "loss_per_sample_bs1"), **TOLERANCE_LOSS
    )


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("sample", [0, 1])
def test_training_bs1_targets_and_masks_match_original(stage_results, stage, sample):
    for quantity in ("targets", "attention_mask"):
        key = f"sample{sample}_bs1_{quantity}"
        assert torch.equal(stage_results[stage][key], expected_stage(stage, key)), key


@pytest.mark.parametrize("stage", STAGES)
def test_training_train_mode_loss_matches_original(stage_results, stage):
    torch.testing.assert_close(
        stage_results[stage]["loss_train_mode"], expected_stage(stage, "loss_train_mode"), **TOLERANCE_LOSS
    )


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("parameter", ["weight", "bias"])
def test_llama_proj_gradient_matches_original(stage_results, stage, parameter):
    torch.testing.assert_close(
        stage_results[stage][f"grad_llama_proj_{parameter}"],
        expected_stage(stage, f"grad_llama_proj_{parameter}"),
        **TOLERANCE_GRADIENT,
    )
