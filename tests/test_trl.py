"""TRL's SFTTrainer fine-tunes MiniGPT-4 as it does transformers' own VLMs: the converted tiny model, with and without
a LoRA adapter, on `{"images", "messages"}` and `{"images", "prompt", "completion"}` rows (docs/fine-tuning-trl.md)."""

import pytest
import torch
from datasets import Dataset
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from conftest import ORIGINAL_TINY


peft = pytest.importorskip("peft")
trl = pytest.importorskip("trl")
from trl import SFTConfig, SFTTrainer  # noqa: E402
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling  # noqa: E402


CAPTIONS = ["An astronaut in a white suit.", "A cup of coffee on a table.", "A cat lying on a red couch."]
IMAGES = ["astronaut", "coffee", "chelsea"]


def load_model(folder):
    return AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)


def load_processor(folder):
    """The processor as the recipe sets it up for TRL: its chat template writes BOS (TRL adds no special tokens)."""
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    processor.chat_template = "{{ bos_token }}" + processor.chat_template
    return processor


def images():
    return [Image.open(ORIGINAL_TINY / "inputs" / f"{name}.png").convert("RGB") for name in IMAGES]


def message_rows(count: int = 8) -> Dataset:
    pictures = images()
    return Dataset.from_list([
        {"images": [pictures[i % 3]], "messages": [
            {"role": "user", "content": "Describe this image in detail."},
            {"role": "assistant", "content": CAPTIONS[i % 3]},
        ]}
        for i in range(count)
    ])


def prompt_completion_rows(count: int = 8) -> Dataset:
    pictures = images()
    return Dataset.from_list([
        {"images": [pictures[i % 3]],
         "prompt": [{"role": "user", "content": "Describe this image in detail."}],
         "completion": [{"role": "assistant", "content": CAPTIONS[i % 3]}]}
        for i in range(count)
    ])


def sft_config(output_dir, **overrides) -> SFTConfig:
    settings = dict(output_dir=str(output_dir), max_steps=3, per_device_train_batch_size=4, learning_rate=5e-2,
                    logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
                    gradient_checkpointing=False, dataloader_num_workers=0, seed=0)
    return SFTConfig(**{**settings, **overrides})


def step_losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def cloned_state(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def logits_of(model, processor, rows):
    row = rows[0]
    prompt = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": row["messages"][0]["content"]}]}], add_generation_prompt=True)
    inputs = processor(images=row["images"], text=prompt, return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**inputs).logits


@pytest.fixture(scope="module")
def full_run(converted_tiny_dir, tmp_path_factory):
    model, processor = load_model(converted_tiny_dir), load_processor(converted_tiny_dir)
    before = cloned_state(model)
    rows = message_rows()
    trainer = SFTTrainer(model=model, args=sft_config(tmp_path_factory.mktemp("sft")), train_dataset=rows,
                         processing_class=processor)
    trainer.train()
    saved = tmp_path_factory.mktemp("sft_saved")
    trainer.save_model(str(saved))
    return {"trainer": trainer, "model": model, "processor": processor, "before": before, "saved": saved,
            "rows": rows}


@pytest.fixture(scope="module")
def lora_run(converted_tiny_dir, tmp_path_factory):
    model, processor = load_model(converted_tiny_dir), load_processor(converted_tiny_dir)
    before = cloned_state(model)
    rows = message_rows()
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"],
                           modules_to_save=["language_projection"])
    trainer = SFTTrainer(model=model, args=sft_config(tmp_path_factory.mktemp("sft_lora")), train_dataset=rows,
                         processing_class=processor, peft_config=lora)
    trainer.train()
    saved = tmp_path_factory.mktemp("sft_lora_saved")
    trainer.save_model(str(saved))
    return {"trainer": trainer, "processor": processor, "before": before, "saved": saved, "rows": rows}


# ---------------------------------------------------------------------------------------------------------------------
# What TRL's collator hands the model.


def test_trl_collator_gives_the_ids_of_the_processor(converted_tiny_dir):
    plain = AutoProcessor.from_pretrained(converted_tiny_dir, trust_remote_code=True)
    row = message_rows(1)[0]
    text = plain.apply_chat_template([
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["messages"][0]["content"]}]},
        {"role": "assistant", "content": [{"type": "text", "text": row["messages"][1]["content"]}]},
    ])
    expected = plain(images=row["images"], text=text, return_tensors="pt")
    batch = DataCollatorForVisionLanguageModeling(load_processor(converted_tiny_dir))([row])
    assert batch["input_ids"].tolist() == expected["input_ids"].tolist()
    assert batch["input_ids"][0, 0] == plain.tokenizer.bos_token_id
    torch.testing.assert_close(batch["pixel_values"], expected["pixel_values"])


def test_prompt_completion_rows_give_the_processor_training_rows(converted_tiny_dir):
    plain = AutoProcessor.from_pretrained(converted_tiny_dir, trust_remote_code=True)
    row = prompt_completion_rows(1)[0]
    prompt = plain.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": row["prompt"][0]["content"]}]}], add_generation_prompt=True)
    expected = plain(images=row["images"], text=prompt, suffix=row["completion"][0]["content"] + "###",
                     return_tensors="pt")
    batch = DataCollatorForVisionLanguageModeling(load_processor(converted_tiny_dir), completion_only_loss=True)([row])
    assert batch["input_ids"].tolist() == expected["input_ids"].tolist()
    assert batch["labels"].tolist() == expected["labels"].tolist()  # the loss on the answer only, as the original


# ---------------------------------------------------------------------------------------------------------------------
# Fine-tuning the projection.


def test_sft_trainer_lowers_the_loss(full_run):
    losses = step_losses(full_run["trainer"])
    assert len(losses) == 3
    assert losses[-1] < losses[0]


def test_sft_trainer_changes_only_the_projection(full_run):
    after = full_run["model"].state_dict()
    changed = {name for name, tensor in full_run["before"].items() if not torch.equal(tensor, after[name])}
    assert changed == {"model.language_projection.weight", "model.language_projection.bias"}


def test_sft_result_reloads_with_the_auto_classes(full_run):
    reloaded = load_model(full_run["saved"])
    processor = AutoProcessor.from_pretrained(full_run["saved"], trust_remote_code=True)
    trained = full_run["model"]
    assert torch.equal(reloaded.language_projection.weight, trained.language_projection.weight)
    torch.testing.assert_close(logits_of(reloaded, processor, full_run["rows"]),
                               logits_of(trained, processor, full_run["rows"]), rtol=0, atol=0)


def test_prompt_completion_rows_train_too(converted_tiny_dir, tmp_path):
    model, processor = load_model(converted_tiny_dir), load_processor(converted_tiny_dir)
    trainer = SFTTrainer(model=model, args=sft_config(tmp_path, max_steps=2), train_dataset=prompt_completion_rows(),
                         processing_class=processor)
    trainer.train()
    losses = step_losses(trainer)
    assert len(losses) == 2 and losses[-1] < losses[0]


# ---------------------------------------------------------------------------------------------------------------------
# LoRA on the language model (peft_config=).


def test_lora_run_lowers_the_loss(lora_run):
    losses = step_losses(lora_run["trainer"])
    assert len(losses) == 3
    assert losses[-1] < losses[0]


def test_lora_run_trains_adapters_and_projection_and_leaves_the_base_weights(lora_run):
    peft_model = lora_run["trainer"].model
    trained = {name for name, parameter in peft_model.named_parameters() if parameter.requires_grad}
    assert trained and all("lora_" in name or "language_projection.modules_to_save" in name for name in trained)
    assert any(".self_attn.q_proj.lora_B." in name for name in trained)
    base = peft_model.get_base_model()
    after = {name.replace(".base_layer", ""): tensor for name, tensor in base.state_dict().items()
             if "lora_" not in name and "modules_to_save" not in name}
    after = {name.replace("language_projection.original_module", "language_projection"): tensor
             for name, tensor in after.items()}
    assert after.keys() == lora_run["before"].keys()
    assert all(torch.equal(after[name], tensor) for name, tensor in lora_run["before"].items())
    adapter_b = peft_model.get_parameter(next(name for name in trained if ".q_proj.lora_B." in name))
    assert adapter_b.abs().sum() > 0


def test_lora_adapter_saves_and_reloads_onto_the_base_model(lora_run, converted_tiny_dir):
    saved = lora_run["saved"]
    assert (saved / "adapter_config.json").exists() and (saved / "adapter_model.safetensors").exists()
    reloaded = peft.PeftModel.from_pretrained(load_model(converted_tiny_dir), saved)
    processor = lora_run["processor"]
    torch.testing.assert_close(logits_of(reloaded, processor, lora_run["rows"]),
                               logits_of(lora_run["trainer"].model, processor, lora_run["rows"]), rtol=0, atol=0)
