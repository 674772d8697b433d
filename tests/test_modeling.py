"""MiniGPT4ForConditionalGeneration: the data path, the loss, freezing, saving and loading, generation."""

import pytest
import safetensors.torch
import torch
from transformers import AutoModelForImageTextToText

from conftest import saved_folder
from modeling_minigpt4 import MiniGPT4ForConditionalGeneration, MiniGPT4Model


QUESTION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}]


def chat_inputs(processor, images, questions=None, **kwargs):
    """Left-padded generation inputs, one image and one question per row."""
    questions = questions or ["What is in the picture?"] * len(images)
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
            add_generation_prompt=True,
        )
        for q in questions
    ]
    return processor(images=images, text=prompts, return_tensors="pt", **kwargs)


def new_tokens(generated, inputs):
    return generated[:, inputs["input_ids"].shape[1]:]


def capture_language_model_inputs(model):
    captured = {}

    def hook(module, args, kwargs):
        captured.setdefault("inputs_embeds", kwargs["inputs_embeds"].detach().clone())

    return captured, model.language_model.register_forward_pre_hook(hook, with_kwargs=True)


# ---------------------------------------------------------------------------------------------------------------------
# Data path


def test_image_features_have_one_soft_token_per_query(tiny_shared, example_image):
    model, processor = tiny_shared
    pixel_values = processor.image_processor([example_image, example_image], return_tensors="pt")["pixel_values"]
    features = model.get_image_features(pixel_values)
    assert features.shape == (2, model.config.num_query_tokens, model.config.text_config.hidden_size)


def test_forward_returns_logits_cache_and_image_features(tiny_shared, example_image):
    model, processor = tiny_shared
    inputs = chat_inputs(processor, [example_image])
    output = model(**inputs)
    assert output.logits.shape == (*inputs["input_ids"].shape, model.config.text_config.vocab_size)
    assert output.image_features.shape == (1, 6, 64)
    assert output.past_key_values is output.cache
    assert output.cache.get_seq_length() == inputs["input_ids"].shape[1]
    assert output.loss is None


def test_image_features_replace_the_image_tokens_in_order(tiny_shared, example_image):
    model, processor = tiny_shared
    second_image = example_image.rotate(90)
    text = "Compare <Img><ImageHere></Img> with <Img><ImageHere></Img> please."
    inputs = processor(images=[example_image, second_image], text=text, return_tensors="pt")
    captured, handle = capture_language_model_inputs(model)
    try:
        model(**inputs)
    finally:
        handle.remove()
    features = model.get_image_features(inputs["pixel_values"])
    image_positions = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().squeeze(-1)
    spliced = captured["inputs_embeds"][0, image_positions]
    torch.testing.assert_close(spliced, features.reshape(-1, features.shape[-1]))
    text_positions = (inputs["input_ids"][0] != model.config.image_token_id).nonzero().squeeze(-1)
    expected_text = model.get_input_embeddings()(inputs["input_ids"][0, text_positions])
    torch.testing.assert_close(captured["inputs_embeds"][0, text_positions], expected_text)


def test_image_count_mismatch_raises_with_both_counts(tiny_shared, example_image):
    model, processor = tiny_shared
    inputs = chat_inputs(processor, [example_image])
    two_images = torch.cat([inputs["pixel_values"]] * 2)
    with pytest.raises(ValueError, match=r"6 image tokens.*2 image\(s\) were given"):
        model(input_ids=inputs["input_ids"], pixel_values=two_images)


def test_image_tokens_without_images_raise(tiny_shared, example_image):
    model, processor = tiny_shared
    inputs = chat_inputs(processor, [example_image])
    with pytest.raises(ValueError, match="6 image tokens but 0 images"):
        model(input_ids=inputs["input_ids"])


def test_prompt_longer_than_the_context_raises(tiny, example_image):
    model, processor = tiny
    model.config.text_config.max_position_embeddings = 32
    inputs = chat_inputs(processor, [example_image])
    with pytest.raises(ValueError, match=r"69 tokens long.*context of 32 tokens"):
        model(**inputs)


def test_float32_pixels_work_with_a_bfloat16_model(tiny, example_image):
    model, processor = tiny
    model = model.to(torch.bfloat16)
    inputs = chat_inputs(processor, [example_image])
    assert inputs["pixel_values"].dtype == torch.float32
    output = model(**inputs)
    assert output.logits.dtype == torch.bfloat16
    assert torch.isfinite(output.logits.float()).all()


# ---------------------------------------------------------------------------------------------------------------------
# Backbone and head


def test_backbone_returns_the_hidden_states_that_the_head_turns_into_logits(tiny_shared, example_image):
    model, processor = tiny_shared
    inputs = chat_inputs(processor, [example_image])
    hidden = model.model(**inputs)
    assert hidden.last_hidden_state.shape == (*inputs["input_ids"].shape, model.config.text_config.hidden_size)
    assert hidden.image_features.shape == (1, 6, 64)
    assert hidden.past_key_values.get_seq_length() == inputs["input_ids"].shape[1]
    torch.testing.assert_close(model.lm_head(hidden.last_hidden_state), model(**inputs).logits, rtol=0, atol=0)


def test_base_model_is_the_backbone_and_the_output_embeddings_are_the_head(tiny_shared):
    model, _ = tiny_shared
    assert model.base_model is model.model and isinstance(model.model, MiniGPT4Model)
    assert model.get_output_embeddings() is model.lm_head
    assert model.get_decoder() is model.language_model is model.model.language_model
    assert model.get_input_embeddings() is model.language_model.get_input_embeddings()


def test_logits_to_keep_scores_only_the_last_positions(tiny_shared, example_image):
    model, processor = tiny_shared
    inputs = chat_inputs(processor, [example_image])
    torch.testing.assert_close(model(**inputs, logits_to_keep=2).logits, model(**inputs).logits[:, -2:])


def test_tied_word_embeddings_share_the_head_with_the_input_embeddings(tmp_path):
    from minigpt4_hf.random_models import build_random_model

    model, _ = build_random_model("tiny", tie_word_embeddings=True)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    model.save_pretrained(tmp_path)
    reloaded = MiniGPT4ForConditionalGeneration.from_pretrained(tmp_path)
    assert reloaded.lm_head.weight is reloaded.get_input_embeddings().weight
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)


# ---------------------------------------------------------------------------------------------------------------------
# Loss


def test_loss_is_the_mean_cross_entropy_over_labelled_next_tokens(tiny_shared, example_image):
    model, processor = tiny_shared
    inputs = processor(images=[example_image] * 2, text=["<ImageHere>", "<ImageHere> a cat"],
                       suffix=["a photo of an astronaut\n", "looks\n"], max_txt_len=32, return_tensors="pt")
    output = model(**inputs)
    logits, labels = output.logits[:, :-1], inputs["labels"][:, 1:]
    mask = labels != -100
    expected = torch.nn.functional.cross_entropy(logits[mask], labels[mask])
    torch.testing.assert_close(output.loss, expected)


def test_loss_honours_num_items_in_batch_for_gradient_accumulation(tiny_shared, example_image):
    model, processor = tiny_shared
    inputs = processor(images=[example_image], text=["<ImageHere>"], suffix=["a photo\n"], return_tensors="pt")
    mean_loss = model(**inputs).loss
    targets = int((inputs["labels"][:, 1:] != -100).sum())
    summed_over_twice_as_many = model(**inputs, num_items_in_batch=torch.tensor(2 * targets)).loss
    torch.testing.assert_close(summed_over_twice_as_many, mean_loss / 2)


def with_image_ids_in_labels(inputs, image_token_id: int) -> torch.LongTensor:
    """The labels a collator that copies `input_ids` (TRL's) gives: the image placeholders are left in."""
    image_positions = inputs["input_ids"] == image_token_id
    return torch.where(image_positions, inputs["input_ids"], inputs["labels"])


def test_image_token_labels_count_as_ignored(tiny_shared, example_image):
    model, processor = tiny_shared
    inputs = processor(images=[example_image] * 2, text=["<ImageHere>", "<ImageHere> a cat"],
                       suffix=["a photo of an astronaut\n", "looks\n"], max_txt_len=32, return_tensors="pt")
    labels = with_image_ids_in_labels(inputs, model.config.image_token_id)
    assert (labels == model.config.image_token_id).sum() == 2 * model.config.num_query_tokens
    assert torch.equal(model(**{**inputs, "labels": labels}).loss, model(**inputs).loss)


def test_labels_reach_a_replaced_forward_with_image_positions_ignored(tiny, example_image):
    model, processor = tiny
    inputs = processor(images=[example_image] * 2, text=["<ImageHere>", "<ImageHere> a cat"],
                       suffix=["a photo\n", "looks\n"], return_tensors="pt")
    received = {}

    def replaced_forward(*args, labels=None, **kwargs):  # as trainers do (TRL's fused LM head)
        received["labels"] = labels
        return "output"

    model.forward = replaced_forward
    assert model(**{**inputs, "labels": with_image_ids_in_labels(inputs, model.config.image_token_id)}) == "output"
    assert torch.equal(received["labels"], inputs["labels"])  # padding and prompt stay -100, targets unchanged


# ---------------------------------------------------------------------------------------------------------------------
# Freezing


def trainable_names(model):
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


def test_only_the_projection_trains_by_default(tiny_shared):
    model, _ = tiny_shared
    assert trainable_names(model) == {"model.language_projection.weight", "model.language_projection.bias"}


def test_config_switches_unfreeze_each_part(tiny_shared):
    from minigpt4_hf.random_models import build_random_model

    model, _ = build_random_model("tiny", freeze_qformer=False, freeze_vision_model=False)
    names = trainable_names(model)
    assert "model.query_tokens" in names
    assert any(name.startswith("model.qformer.") for name in names)
    assert any(name.startswith("model.vision_model.") for name in names)
    assert not any(name.startswith(("model.language_model.", "lm_head.")) for name in names)


def test_frozen_modules_stay_in_eval_mode_after_train(tiny):
    model, _ = tiny
    model.train()
    assert model.training and model.language_projection.training
    for part in (model.vision_model, model.qformer, model.language_model):
        assert not any(module.training for module in part.modules())


def test_apply_freezing_arguments_override_the_config_for_that_call_only(tiny):
    model, _ = tiny
    model.apply_freezing(freeze_qformer=False)
    assert {name.split(".")[1] for name in trainable_names(model)} == {"language_projection", "qformer", "query_tokens"}
    assert all(parameter.requires_grad for parameter in model.qformer.parameters())
    assert model.config.freeze_qformer is True
    model.apply_freezing()
    assert trainable_names(model) == {"model.language_projection.weight", "model.language_projection.bias"}


def test_a_part_unfrozen_for_a_run_trains_in_train_mode(tiny):
    model, _ = tiny
    model.apply_freezing(freeze_qformer=False)
    model.train()
    assert all(module.training for module in model.qformer.modules())
    assert not model.vision_model.training and not model.language_model.training


def test_frozen_modules_follow_train_mode_when_the_config_says_so(tiny):
    model, _ = tiny
    model.config.frozen_modules_in_eval_mode = False
    model.train()
    assert all(module.training for module in model.modules())
    assert trainable_names(model) == {"model.language_projection.weight", "model.language_projection.bias"}


def test_lora_in_the_frozen_language_model_trains_with_its_dropout_active(tiny, example_image):
    from peft import LoraConfig, get_peft_model

    model, processor = tiny
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["q_proj", "v_proj"],
                      modules_to_save=["language_projection"])
    peft_model = get_peft_model(model, lora)
    for name, parameter in peft_model.named_parameters():
        if "lora_B" in name:  # zero at initialisation, when dropout before it changes nothing
            torch.nn.init.normal_(parameter.data, std=0.5)
    peft_model.train()
    attention = model.language_model.layers[0].self_attn
    assert attention.q_proj.lora_dropout["default"].training and attention.q_proj.lora_A["default"].training
    assert not attention.q_proj.base_layer.training and not attention.k_proj.training
    assert not model.vision_model.training and not model.qformer.training
    assert model.config.freeze_language_model is True

    inputs = chat_inputs(processor, [example_image])
    torch.manual_seed(0)
    first, second = peft_model(**inputs).logits, peft_model(**inputs).logits
    assert not torch.equal(first, second)  # dropout is on
    peft_model.eval()
    assert torch.equal(peft_model(**inputs).logits, peft_model(**inputs).logits)


def test_an_optimizer_step_changes_only_the_projection(tiny, example_image):
    model, processor = tiny
    model.train()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = processor(images=[example_image], text=["<ImageHere>"], suffix=["an astronaut\n"], return_tensors="pt")
    model(**inputs).loss.backward()
    optimizer.step()
    changed = {name for name, tensor in model.state_dict().items() if not torch.equal(tensor, before[name])}
    assert changed == {"model.language_projection.weight", "model.language_projection.bias"}
    frozen_with_grads = [n for n, p in model.named_parameters() if p.grad is not None and not p.requires_grad]
    assert frozen_with_grads == []


def test_freezing_holds_after_from_pretrained(tiny_saved_dir):
    model = AutoModelForImageTextToText.from_pretrained(tiny_saved_dir, trust_remote_code=True)
    assert trainable_names(model) == {"model.language_projection.weight", "model.language_projection.bias"}
    model.train()
    assert not model.vision_model.training and not model.language_model.training


def test_activation_checkpointing_of_the_lm_still_trains_the_projection(tiny, example_image):
    model, processor = tiny
    model.activation_checkpointing_enable()
    model.train()
    inputs = processor(images=[example_image], text=["<ImageHere>"], suffix=["an astronaut\n"], return_tensors="pt")
    model(**inputs).loss.backward()
    assert model.language_projection.weight.grad is not None
    assert model.language_projection.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------------------
# Saving and loading


def test_save_and_load_round_trip_is_bit_exact(tiny_shared, tiny_saved_dir, example_image):
    model, processor = tiny_shared
    reloaded = MiniGPT4ForConditionalGeneration.from_pretrained(tiny_saved_dir)
    original_state, reloaded_state = model.state_dict(), reloaded.state_dict()
    assert original_state.keys() == reloaded_state.keys()
    assert all(torch.equal(original_state[name], reloaded_state[name]) for name in original_state)
    inputs = chat_inputs(processor, [example_image])
    assert torch.equal(model(**inputs).logits, reloaded(**inputs).logits)


def in_the_earlier_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys as the converter and `save_pretrained` wrote them before the backbone/head split (the BLIP-2 layout)."""
    earlier = {}
    for key, tensor in state_dict.items():
        if key.startswith("model.language_model."):
            key = "language_model.model." + key.removeprefix("model.language_model.")
        elif key.startswith("lm_head."):
            key = "language_model." + key
        else:
            key = key.removeprefix("model.")
        earlier[key] = tensor.contiguous()
    return earlier


@pytest.fixture(scope="module")
def earlier_layout_dir(tiny_shared, tmp_path_factory):
    model, processor = tiny_shared
    folder = saved_folder(tmp_path_factory, "earlier_layout", model, processor)
    safetensors.torch.save_file(in_the_earlier_layout(model.state_dict()), str(folder / "model.safetensors"),
                                metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("auto", [False, True], ids=["class", "auto-remote-code"])
def test_folder_in_the_earlier_layout_loads_with_identical_logits(tiny_shared, earlier_layout_dir, example_image,
                                                                  auto):
    model, processor = tiny_shared
    assert "language_model.model.embed_tokens.weight" in safetensors.torch.load_file(
        str(earlier_layout_dir / "model.safetensors"))
    if auto:
        loaded, info = AutoModelForImageTextToText.from_pretrained(earlier_layout_dir, trust_remote_code=True,
                                                                   output_loading_info=True)
    else:
        loaded, info = MiniGPT4ForConditionalGeneration.from_pretrained(earlier_layout_dir, output_loading_info=True)
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == (set(), set(), set())
    inputs = chat_inputs(processor, [example_image])
    assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)


def test_folder_in_the_earlier_layout_is_saved_again_in_the_current_one(tiny_shared, earlier_layout_dir, tmp_path):
    model, _ = tiny_shared
    MiniGPT4ForConditionalGeneration.from_pretrained(earlier_layout_dir).save_pretrained(tmp_path)
    assert safetensors.torch.load_file(str(tmp_path / "model.safetensors")).keys() == model.state_dict().keys()


def test_backbone_loads_alone_from_a_saved_folder(tiny_shared, tiny_saved_dir, example_image):
    model, processor = tiny_shared
    backbone = MiniGPT4Model.from_pretrained(tiny_saved_dir)
    inputs = chat_inputs(processor, [example_image])
    torch.testing.assert_close(backbone(**inputs).last_hidden_state, model.model(**inputs).last_hidden_state,
                               rtol=0, atol=0)


def test_sharded_safetensors_reload_to_the_same_weights(tiny_shared, tmp_path):
    model, _ = tiny_shared
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    reloaded = MiniGPT4ForConditionalGeneration.from_pretrained(tmp_path)
    assert all(torch.equal(t, reloaded.state_dict()[n]) for n, t in model.state_dict().items())


def test_bfloat16_loading_gives_bfloat16_weights(tiny_saved_dir):
    model = AutoModelForImageTextToText.from_pretrained(tiny_saved_dir, dtype=torch.bfloat16, trust_remote_code=True)
    assert model.language_model.dtype == torch.bfloat16
    assert model.vision_model.dtype == torch.bfloat16


def test_device_map_auto_loads_and_generates_the_same(tiny_shared, tiny_saved_dir, example_image):
    model, processor = tiny_shared
    mapped = AutoModelForImageTextToText.from_pretrained(tiny_saved_dir, device_map="auto", trust_remote_code=True)
    inputs = chat_inputs(processor, [example_image])
    expected = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(mapped.generate(**inputs, max_new_tokens=5, do_sample=False), expected)


def test_resize_token_embeddings_grows_the_language_model_vocabulary(tiny):
    model, _ = tiny
    model.resize_token_embeddings(1010, mean_resizing=False)
    assert model.get_input_embeddings().num_embeddings == 1010
    assert model.get_output_embeddings().out_features == 1010
    assert model.config.text_config.vocab_size == 1010


def test_sdpa_is_the_default_attention(tiny_shared):
    model, _ = tiny_shared
    assert model.vision_model.config._attn_implementation == "sdpa"
    assert model.language_model.config._attn_implementation == "sdpa"


# ---------------------------------------------------------------------------------------------------------------------
# Generation


def test_generate_returns_the_prompt_followed_by_new_tokens(tiny_shared, example_image):
    model, processor = tiny_shared
    inputs = chat_inputs(processor, [example_image])
    generated = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 6
    assert torch.equal(generated[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])


def test_generate_with_and_without_cache_agree(tiny_shared, example_image):
    model, processor = tiny_shared
    inputs = chat_inputs(processor, [example_image])
    cached = model.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=True)
    uncached = model.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_generate_encodes_the_image_once(tiny_shared, example_image):
    model, processor = tiny_shared
    calls = []
    handle = model.vision_model.register_forward_hook(lambda *args: calls.append(1))
    try:
        model.generate(**chat_inputs(processor, [example_image]), max_new_tokens=5, min_new_tokens=5,
                       do_sample=False)
    finally:
        handle.remove()
    assert len(calls) == 1


def test_batched_left_padded_greedy_equals_each_row_alone(tiny_shared, example_image):
    model, processor = tiny_shared
    images = [example_image, example_image.rotate(45), example_image.convert("L")]
    questions = ["What is in the picture?", "Describe it.", "Tell me everything you see in this image, please."]
    batch = chat_inputs(processor, images, questions)
    assert (batch["attention_mask"][:, 0] == 0).any(), "rows must be left padded"
    batched = new_tokens(model.generate(**batch, max_new_tokens=10, do_sample=False), batch)
    for row, (image, question) in enumerate(zip(images, questions)):
        single = chat_inputs(processor, [image], [question])
        alone = new_tokens(model.generate(**single, max_new_tokens=10, do_sample=False), single)[0]
        assert batched[row, : alone.shape[0]].tolist() == alone.tolist()


def test_beam_search_with_images_runs(tiny_shared, example_image):
    model, processor = tiny_shared
    inputs = chat_inputs(processor, [example_image, example_image.rotate(90)])
    generated = model.generate(**inputs, max_new_tokens=4, num_beams=2, do_sample=False)
    assert generated.shape[0] == 2


class TestPerRowStop:
    """Rows stop on their own at the end of the assistant turn (config.stop_token_ids)."""

    @pytest.fixture
    def model_and_batch(self, tiny, example_image):
        model, processor = tiny
        prompts = [
            processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
                add_generation_prompt=True,
            )
            for question in ("Describe it.", "Why?")
        ]
        # A tiny random model barely looks at the prompt: the second answer is started so that the rows differ.
        batch = processor(images=[example_image, example_image.rotate(180)], text=[prompts[0], prompts[1] + "Because"],
                          return_tensors="pt")
        model.config.stop_token_ids = [[999_999]]  # unreachable: see the free-running continuations first
        free = new_tokens(model.generate(**batch, max_new_tokens=12, min_new_tokens=12, do_sample=False), batch)
        return model, batch, free

    @staticmethod
    def stop_sequence_only_in_row_zero(free, length):
        for start in range(2, 8):
            candidate = free[0, start : start + length].tolist()
            rows = [row.tolist() for row in free]
            first_hit = [next((i for i in range(len(r) - length + 1) if r[i : i + length] == candidate), None)
                         for r in rows]
            if first_hit[0] == start and first_hit[1] is None:
                return candidate, start
        pytest.skip("random continuations share every candidate token")

    @pytest.mark.parametrize("length", [1, 2], ids=["single-token", "two-token"])
    def test_each_row_stops_at_its_own_stop_sequence(self, model_and_batch, length):
        model, batch, free = model_and_batch
        stop, start = self.stop_sequence_only_in_row_zero(free, length)
        model.config.stop_token_ids = [stop]
        out = new_tokens(model.generate(**batch, max_new_tokens=12, do_sample=False), batch)
        end = start + length
        assert out[0, :end].tolist() == free[0, :end].tolist()
        assert (out[0, end:] == model.generation_config.pad_token_id).all()
        assert out[1].tolist() == free[1].tolist()

    def test_rows_still_stop_when_the_caller_passes_eos_and_pad_ids(self, model_and_batch):
        model, batch, free = model_and_batch
        stop, start = self.stop_sequence_only_in_row_zero(free, 1)
        model.config.stop_token_ids = [stop]
        out = new_tokens(model.generate(**batch, max_new_tokens=12, do_sample=False, eos_token_id=[2],
                                        pad_token_id=0), batch)
        assert out[0, : start + 1].tolist() == free[0, : start + 1].tolist()
        assert (out[0, start + 1 :] == 0).all()
        assert out[1].tolist() == free[1].tolist()


def test_streaming_yields_the_generated_answer(tiny_shared, example_image):
    from threading import Thread

    from transformers import TextIteratorStreamer

    model, processor = tiny_shared
    inputs = chat_inputs(processor, [example_image])
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    thread = Thread(target=model.generate, kwargs={**inputs, "max_new_tokens": 8, "do_sample": False,
                                                    "streamer": streamer})
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    expected = processor.tokenizer.decode(new_tokens(generated, inputs)[0], skip_special_tokens=True)
    assert streamed == expected
