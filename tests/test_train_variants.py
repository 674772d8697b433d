"""
Training presets of MiniGPT-4 with Llama-2 (stages 1 and 2) and MiniGPT-v2 (stage 3, the released fine-tuning):
prompts, end of answer, labels only on answers, multi-turn conversations, text-only samples, the weighted mixture of
datasets, and a short run of each on tiny models.
"""

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
import minigpt4_hf.cli.train as train
from minigpt4_hf.random_models import build_random_model
from minigpt4_hf.training import (
    ALIGNMENT_PROMPTS,
    TRAINING_PRESETS,
    SampleFormatter,
    TrainingCollator,
    TrainingImageTransform,
    build_training_dataset,
    conversation_turns,
    expand_prompts,
)
from PIL import Image

IGNORE = -100


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llama2():
    return build_random_model("tiny", variant="llama2")


@pytest.fixture(scope="module")
def v2():
    return build_random_model("tiny", variant="v2")


def formatter_for(variant: str, stage: int, size: int, **overrides) -> SampleFormatter:
    """The formatter `scripts/train.py` builds from a preset (the alignment prompts when the preset has a template)."""
    preset = {**TRAINING_PRESETS[variant][stage], **overrides}
    template = preset["prompt_template"]
    return SampleFormatter(
        image_transform=TrainingImageTransform(size=size, mode=preset.get("image_transform", "random_resized_crop")),
        prompts=expand_prompts(template, ALIGNMENT_PROMPTS) if template else [],
        end_symbol=preset["end_symbol"],
        clean_captions=preset["clean_captions"],
        prompt_template=template,
        instruction_format=preset.get("instruction_format", "<Img><ImageHere></Img> {}"),
        followup_format=preset.get("followup_format", "{}"),
    )


def pieces(processor, *texts: str) -> list[int]:
    """Each text tokenized on its own, without BOS, concatenated (the original's segment-wise tokenization)."""
    return [token for text in texts for token in processor.tokenizer(text, add_special_tokens=False)["input_ids"]]


def image_segments(processor, before: str, after: str) -> list[int]:
    """[BOS] before [image tokens] after, as the original's prompt_wrap built it."""
    image_run = [processor.image_token_id] * processor.num_image_tokens
    return [processor.tokenizer.bos_token_id] + pieces(processor, before) + image_run + pieces(processor, after)


def labelled(batch, row: int = 0) -> list[int]:
    return [token for token in batch["labels"][row].tolist() if token != IGNORE]


def an_image(seed: int = 0, size: tuple[int, int] = (40, 30)) -> Image.Image:
    rng = random.Random(seed)
    return Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))


# ---------------------------------------------------------------------------------------------------------------------
# Presets.


def parse(argv: list[str], tmp_path: Path):
    """`(the tool's flags with the preset applied, TrainingArguments)`."""
    return train.parse_arguments([*argv, "--data_path", "x", "--output_dir", str(tmp_path)])


def test_llama2_stage1_is_the_original_stage1_without_a_prompt(tmp_path):
    data_args, args = parse(["--variant", "llama2", "--stage", "1", "--model_name_or_path", "m"], tmp_path)
    assert (data_args.prompt_template, data_args.end_symbol, data_args.max_txt_len) == ("", "\n", 32)
    assert (args.learning_rate, data_args.min_lr, args.warmup_steps, args.max_steps) == (1e-4, 8e-5, 5000, 20000)


def test_llama2_stage2_uses_the_inst_template_and_eos(tmp_path):
    data_args, args = parse(["--variant", "llama2", "--stage", "2", "--model_name_or_path", "m"], tmp_path)
    assert (data_args.prompt_template, data_args.end_symbol, data_args.max_txt_len) == ("[INST] {} [/INST] ", "</s>",
                                                                                         160)
    assert (args.learning_rate, data_args.min_lr, args.warmup_steps, args.max_steps) == (3e-5, 1e-5, 200, 1000)


def test_v2_fine_tuning_preset_is_the_released_recipe(tmp_path):
    data_args, args = parse(["--variant", "v2", "--stage", "3", "--model_name_or_path", "m"], tmp_path)
    assert (args.learning_rate, data_args.min_lr, data_args.warmup_lr, args.warmup_steps) == (1e-5, 1e-6, 1e-6, 1000)
    assert (args.weight_decay, args.max_steps) == (0.05, 50000)
    assert (data_args.lora_r, data_args.lora_alpha, data_args.lora_dropout) == (64, 16, 0.05)
    assert data_args.lora_target_modules == ["q_proj", "v_proj"]
    assert (data_args.prompt_template, data_args.end_symbol, data_args.max_txt_len) == ("[INST] {} [/INST]", "</s>",
                                                                                         1024)
    assert data_args.instruction_format == "<Img><ImageHere></Img> {} " and data_args.image_transform == "resize"


def test_variant_defaults_to_the_model_config(tmp_path, v2):
    model, processor = v2
    model.save_pretrained(tmp_path / "v2-model")
    data_args, _ = parse(["--stage", "3", "--model_name_or_path", str(tmp_path / "v2-model")], tmp_path)
    assert data_args.variant == "v2" and data_args.max_txt_len == 1024


def test_a_stage_the_variant_has_no_preset_for_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(["--variant", "v2", "--stage", "2", "--model_name_or_path", "m"], tmp_path)
    assert exit_info.value.code == 2
    assert "--stage 2: the v2 variant has the presets --stage 3" in capsys.readouterr().err


def test_a_variant_other_than_the_model_config_is_refused(tmp_path, v2, capsys):
    model, _ = v2
    model.save_pretrained(tmp_path / "v2-model")
    with pytest.raises(SystemExit) as exit_info:
        parse(["--variant", "llama2", "--stage", "2", "--model_name_or_path", str(tmp_path / "v2-model")], tmp_path)
    assert exit_info.value.code == 2
    assert "is a v2 model" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# Samples and labels.


def test_llama2_stage2_sample_labels_only_the_answer_and_its_eos(llama2):
    _, processor = llama2
    formatter = formatter_for("llama2", 2, size=56)
    sample = formatter({"image": an_image(), "text": "A red box.", "sample_id": "0"}, random.Random(0))
    assert sample["prompt"] in {f"[INST] {prompt} [/INST] " for prompt in ALIGNMENT_PROMPTS}
    assert sample["target"] == "A red box.</s>"
    batch = TrainingCollator(processor, max_txt_len=160)([sample])
    before, after = sample["prompt"].split("<ImageHere>")
    answer = pieces(processor, "A red box.") + [processor.tokenizer.eos_token_id]
    assert batch["input_ids"][0].tolist() == image_segments(processor, before, after) + answer
    assert labelled(batch) == answer
    assert batch["input_ids"][0].tolist().count(processor.tokenizer.bos_token_id) == 1  # one BOS in training


def test_llama2_stage1_sample_is_the_image_then_the_cleaned_caption(llama2):
    _, processor = llama2
    sample = formatter_for("llama2", 1, size=56)({"image": an_image(), "text": "A Red box!", "sample_id": "0"},
                                                 random.Random(0))
    assert (sample["prompt"], sample["target"]) == ("<ImageHere>", "a red box\n")


def test_v2_instruction_sample_is_wrapped_as_the_original_datasets_did(v2):
    _, processor = v2
    formatter = formatter_for("v2", 3, size=112)
    record = {"image": an_image(), "instruction": "[refer] where is the box?", "text": "{<10><20><60><90>}",
              "sample_id": "0"}
    sample = formatter(record, random.Random(0))
    assert sample["prompt"] == "[INST] <Img><ImageHere></Img> [refer] where is the box?  [/INST]"  # two spaces
    assert sample["target"] == "{<10><20><60><90>}</s>"
    batch = TrainingCollator(processor, max_txt_len=1024)([sample])
    answer = pieces(processor, "{<10><20><60><90>}") + [processor.tokenizer.eos_token_id]
    assert labelled(batch) == answer
    assert batch["pixel_values"].shape == (1, 3, 112, 112)


def test_multi_turn_conversation_labels_every_answer_and_no_question(v2):
    _, processor = v2
    conversation = [
        {"from": "human", "value": "<image>\nWhat colour is the box?"}, {"from": "gpt", "value": "Red."},
        {"from": "human", "value": "And the corner?"}, {"from": "gpt", "value": "Blue."},
        {"from": "human", "value": "Is it square?"}, {"from": "gpt", "value": "Yes."},
    ]
    sample = formatter_for("v2", 3, size=112)({"image": an_image(), "conversation": conversation, "sample_id": "0"},
                                              random.Random(0))
    assert sample["prompt"] == "[INST] <Img><ImageHere></Img> What colour is the box?  [/INST]"
    assert sample["target"] == ["Red.</s>", "<s>[INST] And the corner?  [/INST]", "Blue.</s>",
                                "<s>[INST] Is it square?  [/INST]", "Yes.</s>"]
    batch = TrainingCollator(processor, max_txt_len=1024)([sample])
    bos, eos = processor.tokenizer.bos_token_id, processor.tokenizer.eos_token_id
    red, blue, yes = (pieces(processor, text) + [eos] for text in ("Red.", "Blue.", "Yes."))
    second, third = ([bos] + pieces(processor, text) for text in ("[INST] And the corner?  [/INST]",
                                                                   "[INST] Is it square?  [/INST]"))
    before, after = sample["prompt"].split("<ImageHere>")
    ids = batch["input_ids"][0].tolist()
    prompt = image_segments(processor, before, after)
    assert ids == prompt + red + second + blue + third + yes  # later questions start with their own BOS
    labels = batch["labels"][0].tolist()
    assert labels == [IGNORE] * len(prompt) + red + [IGNORE] * len(second) + blue + [IGNORE] * len(third) + yes


def test_multi_turn_target_is_cut_to_max_txt_len(v2):
    _, processor = v2
    sample = {"image": an_image(), "prompt": "[INST] <Img><ImageHere></Img> q  [/INST]",
              "target": ["Red.</s>", "<s>[INST] And the corner?  [/INST]", "Blue.</s>"]}
    full = TrainingCollator(processor, max_txt_len=1024)([sample])
    cut = TrainingCollator(processor, max_txt_len=5)([sample])
    prompt_length = len(full["input_ids"][0]) - len(pieces(processor, "Red.", "</s>", "<s>[INST] And the corner?  "
                                                                       "[/INST]", "Blue.", "</s>"))
    assert cut["input_ids"].shape[1] == prompt_length + 5
    assert cut["input_ids"][0].tolist() == full["input_ids"][0, : prompt_length + 5].tolist()


def test_chat_messages_are_read_as_conversations():
    messages = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": [{"type": "text", "text": "Yo."}]}]
    assert conversation_turns(messages) == [("Hi?", "Yo.")]
    assert conversation_turns(json.dumps(messages)) == [("Hi?", "Yo.")]


@pytest.mark.parametrize("turns", [
    [{"from": "gpt", "value": "answer first"}, {"from": "human", "value": "q"}],
    [{"from": "human", "value": "a question without an answer"}],
])
def test_conversations_out_of_order_are_unusable(turns):
    from minigpt4_hf.training import UnusableSampleError

    with pytest.raises(UnusableSampleError, match="do not alternate"):
        conversation_turns(turns)


def test_text_only_samples_mix_with_image_samples_in_a_batch(v2):
    _, processor = v2
    formatter = formatter_for("v2", 3, size=112)
    with_image = formatter({"image": an_image(), "instruction": "[vqa] what colour?", "text": "red",
                            "sample_id": "0"}, random.Random(0))
    text_only = formatter({"image": None, "instruction": "Name a colour.", "text": "Blue", "sample_id": "1"},
                          random.Random(0))
    assert text_only["prompt"] == "[INST] Name a colour. [/INST]" and text_only["image"] is None
    batch = TrainingCollator(processor, max_txt_len=1024)([with_image, text_only])
    assert batch["pixel_values"].shape[0] == 1
    assert (batch["input_ids"][1] == processor.image_token_id).sum() == 0
    assert labelled(batch, 1) == pieces(processor, "Blue") + [processor.tokenizer.eos_token_id]


# ---------------------------------------------------------------------------------------------------------------------
# The mixture of datasets.


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_mixture_draws_each_dataset_in_proportion_to_its_ratio(tmp_path):
    sources = [
        write_jsonl(tmp_path / f"{name}.jsonl",
                    [{"id": f"{name}-{i}", "instruction": f"question {i}", "answer": "ok"} for i in range(20)])
        for name in ("refer", "vqa", "caption")
    ]
    formatter = formatter_for("v2", 3, size=112)
    data = build_training_dataset([str(path) for path in sources], formatter, ratios=[50, 30, 20], seed=42,
                                  shuffle_buffer=10)
    stream = iter(data.dataset)
    drawn = [next(stream)["sample_id"] for _ in range(600)]
    counts = Counter(sample_id.split("-")[0] for sample_id in drawn)
    assert abs(counts["refer"] - 300) <= 40 and abs(counts["vqa"] - 180) <= 36 and abs(counts["caption"] - 120) <= 32
    again = iter(build_training_dataset([str(path) for path in sources], formatter, ratios=[50, 30, 20], seed=42,
                                        shuffle_buffer=10).dataset)
    assert [next(again)["sample_id"] for _ in range(30)] == drawn[:30]  # the same seed draws the same samples


# ---------------------------------------------------------------------------------------------------------------------
# Runs.


@pytest.fixture(scope="module")
def v2_data(tmp_path_factory) -> list[Path]:
    """Three sources as the v2 mixture has them: task instructions, conversations (LLaVA), text-only instructions."""
    folder = tmp_path_factory.mktemp("v2_data")
    for index in range(4):
        an_image(index, (60, 40)).save(folder / f"{index}.png")
    tasks = write_jsonl(folder / "tasks.jsonl", [
        {"image": f"{index}.png", "instruction": f"[refer] where is box {index}?", "answer": "{<0><0><50><50>}"}
        for index in range(4)
    ])
    conversations = write_jsonl(folder / "conversations.jsonl", [
        {"image": f"{index}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Some colour."},
            {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]}
        for index in range(4)
    ])
    text_only = write_jsonl(folder / "unnatural.jsonl", [
        {"instruction": f"Count to {index}.", "answer": " ".join(str(n) for n in range(index + 1))} for index in range(4)
    ])
    return [tasks, conversations, text_only]


def short_run_flags(output_dir: Path, model_dir: Path, data: list[Path], variant: str, stage: int, **extra):
    flags = {"max_steps": 2, "per_device_train_batch_size": 2, "warmup_steps": 1, "logging_steps": 1,
             "save_strategy": "no", "use_cpu": True, "report_to": "none", "disable_tqdm": True,
             "dataloader_num_workers": 0, **extra}
    argv = ["--variant", variant, "--stage", str(stage), "--model_name_or_path", str(model_dir), "--output_dir",
            str(output_dir), "--data_path", *[str(path) for path in data]]
    for name, value in flags.items():
        argv += [f"--{name}", *([str(item) for item in value] if isinstance(value, list) else [str(value)])]
    return argv


def test_v2_fine_tuning_runs_on_a_mixture_with_conversations(tmp_path, v2, v2_data):
    model, processor = v2
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    result = train.main(short_run_flags(tmp_path / "out", tmp_path / "model", v2_data, "v2", 3,
                                        data_ratios=[1, 1, 1], lora_r=8))
    assert result["global_step"] == 2
    losses = [entry["loss"] for entry in result["log_history"] if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    adapter = json.loads((tmp_path / "out" / "lora_adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 8 and adapter["lora_alpha"] == 16
    assert sorted({name.rsplit(".", 1)[-1] for name in adapter["target_modules"]}) == ["q_proj", "v_proj"]


def test_llama2_stage2_runs_on_captions(tmp_path, llama2):
    model, processor = llama2
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    folder = tmp_path / "captions"
    folder.mkdir()
    for index in range(4):
        an_image(index).save(folder / f"{index}.png")
    data = write_jsonl(folder / "captions.jsonl", [{"image": f"{i}.png", "caption": f"Box {i}."} for i in range(4)])
    result = train.main(short_run_flags(tmp_path / "out", tmp_path / "model", [data], "llama2", 2))
    assert result["global_step"] == 2
    assert (tmp_path / "out" / "language_projection.safetensors").is_file()
