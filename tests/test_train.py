"""minigpt4-train and minigpt4_hf.training: the two-stage recipe on the HF Trainer, with a tiny model and tiny
datasets written at test time (a cc_sbu_align folder and webdataset tar shards, each with one corrupt image)."""

import io
import itertools
import json
import math
import os
import random
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
import minigpt4_hf.cli.train as train
from conftest import ORIGINAL_TINY, REPO_ROOT, saved_folder
from minigpt4_hf.inference import load_model_and_processor
from minigpt4_hf.inputs import InputError, check_model_path
from minigpt4_hf.random_models import build_random_model
from PIL import Image
from minigpt4_hf.training import (
    ALIGNMENT_PROMPTS,
    STAGE2_PROMPT_TEMPLATE,
    STAGE_PRESETS,
    ImageTextDataset,
    SampleFormatter,
    TrainingCollator,
    TrainingImageTransform,
    build_training_dataset,
    clean_caption,
    decay_parameter_names,
    expand_prompts,
    init_projection,
    load_cc_sbu_align,
    prepare_model_for_training,
    random_resized_crop_box,
)
from transformers import TrainerCallback

CAPTIONS = [
    "A red square on a plain background.",
    "The picture shows a small blue box!",
    "Green colour fills the frame; nothing else.",
    "A yellow image (bright) with a dark corner.",
]
CORRUPT_ID = "3"
MISSING_ID = "8"
# OpenAI CLIP normalisation of the original blip processors (minigpt4/processors/blip_processors.py@22d8888).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _jpeg(index: int, size: tuple[int, int] | None = None) -> bytes:
    rng = random.Random(index)
    size = size or (48 + (7 * index) % 40, 40 + (5 * index) % 30)
    image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    image.paste(tuple(rng.randrange(256) for _ in range(3)), (0, 0, size[0] // 2, size[1] // 2))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG")
    return buffer.getvalue()


def _add_to_tar(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def write_shards(folder: Path, prefix: str, num_shards: int, per_shard: int, corrupt: tuple[int, int] | None = None,
                 image_size: tuple[int, int] | None = None) -> Path:
    """Webdataset shards as img2dataset writes them: `{key}.jpg` + `{key}.json` (with `caption`) + `{key}.txt`."""
    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(num_shards):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as archive:
            for item in range(per_shard):
                key = f"{prefix}{shard:05d}{item:04d}"
                caption = CAPTIONS[item % len(CAPTIONS)]
                image = b"garbage, not a jpeg" if (shard, item) == corrupt else _jpeg(item, image_size)
                _add_to_tar(archive, f"{key}.jpg", image)
                _add_to_tar(archive, f"{key}.json", json.dumps({"caption": caption, "key": key}).encode())
                _add_to_tar(archive, f"{key}.txt", caption.encode())
    return folder


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny model's matrices are too small for threads to pay off; on a busy machine they cost 5x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny model whose frozen language model is sharper than the default init (weights ~ N(0, 0.2)), so that its
    predictions depend on the image tokens and training the projection visibly lowers the loss."""
    model, processor = build_random_model("tiny")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in [*model.language_model.parameters(), *model.lm_head.parameters()]:
            if parameter.ndim >= 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return saved_folder(tmp_path_factory, "sharp_tiny_minigpt4", model, processor)


@pytest.fixture(scope="module")
def cc_sbu_dir(tmp_path_factory) -> Path:
    """cc_sbu_align layout: 8 images (image 3 corrupt) and a 9th annotation whose image file is missing."""
    folder = tmp_path_factory.mktemp("cc_sbu_align")
    (folder / "image").mkdir()
    annotations = []
    for index in range(9):
        annotations.append({"image_id": str(index), "caption": CAPTIONS[index % len(CAPTIONS)]})
        if str(index) != MISSING_ID:
            data = b"not a jpeg at all" if str(index) == CORRUPT_ID else _jpeg(index)
            (folder / "image" / f"{index}.jpg").write_bytes(data)
    (folder / "filter_cap.json").write_text(json.dumps({"annotations": annotations}))
    return folder


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory) -> Path:
    """Two shards of 6 samples; sample 2 of shard 1 is corrupt."""
    return write_shards(tmp_path_factory.mktemp("laion"), "L", 2, 6, corrupt=(1, 2))


def common_flags(output_dir: Path, model_dir: Path, data: list, stage: int = 2, **overrides) -> list[str]:
    flags = {"max_steps": 6, "per_device_train_batch_size": 2, "learning_rate": 1e-2, "warmup_steps": 2,
             "logging_steps": 1, "save_strategy": "no", "use_cpu": True, "report_to": "none", "disable_tqdm": True,
             "dataloader_num_workers": 0}
    flags.update(overrides)
    argv = ["--stage", str(stage), "--model", str(model_dir), "--output-dir", str(output_dir),
            "--data-path", *[str(path) for path in data]]
    for name, value in flags.items():
        argv += [f"--{name}", *([str(item) for item in value] if isinstance(value, list) else [str(value)])]
    return argv


def load_projection(folder: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(folder / "language_projection.safetensors"))


class RecordLearningRates(TrainerCallback):
    """The learning rate each optimizer step uses, by step index (0-based), and the optimizer's parameter groups."""

    def __init__(self):
        self.rates: dict[int, float] = {}
        self.groups: list[tuple[float, list[tuple[int, ...]]]] = []

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.groups = [(group["weight_decay"], [tuple(p.shape) for p in group["params"]])
                       for group in optimizer.param_groups]

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.rates[state.global_step] = optimizer.param_groups[0]["lr"]


class StopAfterStep(TrainerCallback):
    """Simulates an interruption right after the checkpoint of `step` is written."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


@pytest.fixture(scope="module")
def stage2_run(tmp_path_factory, model_dir, cc_sbu_dir):
    """One stage-2 run on the cc_sbu_align folder: 20 steps at a high learning rate, every step logged, a checkpoint
    at the end."""
    output_dir = tmp_path_factory.mktemp("stage2_run")
    rates = RecordLearningRates()
    argv = common_flags(output_dir, model_dir, [cc_sbu_dir], max_steps=20, per_device_train_batch_size=4,
                        learning_rate=5e-2, min_lr=1e-2, warmup_lr=1e-4, warmup_steps=5, save_strategy="steps",
                        save_steps=20)
    result = train.main(argv, extra_callbacks=[rates])
    return {"output_dir": output_dir, "result": result, "rates": rates.rates, "groups": rates.groups}


# ----------------------------------------------------------------------------------------------------------------------
# Recipe pieces.


def test_clean_caption_matches_the_original_blip_caption_processor():
    expected = json.loads((ORIGINAL_TINY / "expected" / "expected.json").read_text())["stage1_caption_processing"]
    assert [clean_caption(raw) for raw in expected["raw"]] == expected["blip_caption"]
    assert clean_caption(" ".join(["word"] * 60)) == " ".join(["word"] * 50)


def test_random_resized_crop_boxes_stay_within_scale_and_ratio():
    rng = random.Random(0)
    for _ in range(200):
        width, height = rng.randint(40, 400), rng.randint(40, 400)
        left, top, crop_width, crop_height = random_resized_crop_box(width, height, rng)
        assert 0 <= left and left + crop_width <= width and 0 <= top and top + crop_height <= height
        is_center_fallback = (left, top) == ((width - crop_width) // 2, (height - crop_height) // 2) and (
            crop_width == width or crop_height == height)
        if not is_center_fallback:
            # rounding the sides to whole pixels moves the area and ratio a little past the sampled range
            assert 0.5 * 0.95 <= crop_width * crop_height / (width * height) <= 1.0
            assert 3 / 4 * 0.95 <= crop_width / crop_height <= 4 / 3 * 1.05


def test_random_resized_crop_falls_back_to_a_ratio_clamped_center_crop():
    # A 400x20 strip: no crop of half its area or more has an aspect ratio within [3/4, 4/3].
    assert random_resized_crop_box(400, 20, random.Random(0)) == ((400 - 27) // 2, 0, 27, 20)
    assert random_resized_crop_box(20, 400, random.Random(0)) == (0, (400 - 27) // 2, 20, 27)


def test_training_transform_gives_model_size_without_flipping():
    gradient = Image.linear_gradient("L").rotate(90).convert("RGB").resize((120, 80))  # dark left, bright right
    transform = TrainingImageTransform(size=56)
    for seed in range(10):
        crop = transform(gradient, random.Random(seed))
        assert crop.size == (56, 56)
        row = crop.convert("L").getdata()
        assert row[0] < row[55]  # left stays darker than right: never mirrored
    resized = TrainingImageTransform(size=56, mode="resize")(gradient, random.Random(0))
    assert resized.size == (56, 56)
    with pytest.raises(ValueError, match="random_resized_crop, resize"):
        TrainingImageTransform(size=56, mode="flip")


def test_collator_pixels_are_the_crop_with_clip_normalisation(tiny_shared):
    _, processor = tiny_shared
    crop = TrainingImageTransform(size=56)(Image.open(ORIGINAL_TINY / "inputs" / "coffee.png").convert("RGB"),
                                           random.Random(1))
    batch = TrainingCollator(processor, max_txt_len=32)(
        [{"image": crop, "prompt": "<ImageHere>", "target": "a cup\n", "sample_id": "0"}]
    )
    pixels = torch.tensor(list(crop.getdata()), dtype=torch.float32).view(56, 56, 3).permute(2, 0, 1) / 255.0
    expected = (pixels - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    torch.testing.assert_close(batch["pixel_values"][0], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("stage", [1, 2])
def test_collator_reproduces_the_original_training_targets(tiny_shared, stage):
    """Labels and attention mask equal the original's targets for its stage-1 and stage-2 fixture batches."""
    _, processor = tiny_shared
    fixture = json.loads((ORIGINAL_TINY / "expected" / "expected.json").read_text())[f"stage{stage}_loss"]
    tensors = torch.load(ORIGINAL_TINY / "expected" / f"train_stage{stage}.pt", weights_only=True)
    preset = STAGE_PRESETS[stage]
    formatter = SampleFormatter(
        image_transform=TrainingImageTransform(size=56),
        prompts=[fixture["prompt_used"]] if fixture["prompt_used"] else [],
        end_symbol=preset["end_symbol"],
        clean_captions=preset["clean_captions"],
    )
    raw = fixture.get("raw_captions_before_blip_caption_processor", fixture["answers"])
    samples = [
        formatter({"image": str(ORIGINAL_TINY / "inputs" / f"{name}.png"), "text": text, "sample_id": name},
                  random.Random(0))
        for name, text in zip(fixture["images"], raw)
    ]
    batch = TrainingCollator(processor, max_txt_len=preset["max_txt_len"])(samples)
    assert torch.equal(batch["labels"], tensors[f"stage{stage}_targets"])
    assert torch.equal(batch["attention_mask"], tensors[f"stage{stage}_attention_mask"])


def test_stage2_draws_one_of_the_four_alignment_prompts_per_sample(cc_sbu_dir):
    formatter = SampleFormatter(TrainingImageTransform(size=56), prompts=expand_prompts(STAGE2_PROMPT_TEMPLATE,
                                                                                         ALIGNMENT_PROMPTS))
    dataset = ImageTextDataset(load_cc_sbu_align(cc_sbu_dir), {"image": "image", "text": "text", "id": "sample_id"},
                               formatter, seed=0)
    expected_prompts = {f"###Human: {prompt} ###Assistant: " for prompt in ALIGNMENT_PROMPTS}
    drawn = set()
    for epoch in range(6):
        dataset.set_epoch(epoch)
        drawn |= {dataset[index]["prompt"] for index in range(len(dataset))}
    assert drawn == expected_prompts
    dataset.set_epoch(0)
    assert dataset[0]["prompt"] == dataset[0]["prompt"]  # a sample's draw depends on (seed, epoch, sample) only
    assert dataset[0]["target"] == CAPTIONS[0] + "###"


def test_weight_decay_goes_to_matrices_only(tiny):
    model, _ = tiny
    model = prepare_model_for_training(model, unfreeze_qformer=True)
    names = decay_parameter_names(model)
    assert "model.language_projection.weight" in names and "model.query_tokens" in names
    assert not [name for name in names if name.endswith("bias") or "layernorm" in name.lower()]
    assert not [name for name in names
                if not name.startswith(("model.language_projection", "model.qformer", "model.query_tokens"))]


def test_preparing_for_training_leaves_the_config_as_loaded(tiny):
    model, _ = tiny
    flags = {name: value for name, value in model.config.to_dict().items() if name.startswith("freeze")}
    peft_model = prepare_model_for_training(model, unfreeze_qformer=True, lora_r=4, lora_alpha=8)
    peft_model.train()
    assert {name: value for name, value in model.config.to_dict().items() if name.startswith("freeze")} == flags
    assert model.qformer.training and not model.vision_model.training


def test_unfreeze_qformer_trains_the_qformer_and_query_tokens(tiny):
    model, _ = tiny
    model = prepare_model_for_training(model, unfreeze_qformer=True)
    trainable = {name.split(".")[1] for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable == {"language_projection", "qformer", "query_tokens"}
    model.train()
    assert model.qformer.training and not model.vision_model.training and not model.language_model.training


# ----------------------------------------------------------------------------------------------------------------------
# Presets and the command line.


def test_stage_presets_set_the_original_recipe(model_dir, tmp_path):
    args, training_args = train.parse_arguments(
        ["--stage", "1", "--model", str(model_dir), "--data-path", "x", "--output-dir", str(tmp_path)]
    )
    assert (training_args.learning_rate, args.min_lr, args.warmup_lr) == (1e-4, 8e-5, 1e-6)
    assert (training_args.warmup_steps, training_args.max_steps) == (5000, 20000)
    assert training_args.per_device_train_batch_size == 64
    assert (training_args.weight_decay, training_args.max_grad_norm) == (0.05, 0.0)
    assert (args.max_txt_len, args.end_symbol, args.prompt_template) == (32, "\n", "")
    assert args.clean_captions and args.lr_schedule == "linear_warmup_cosine"
    assert training_args.remove_unused_columns is False

    args, training_args = train.parse_arguments(
        ["--stage", "2", "--model", str(model_dir), "--data-path", "x", "--output-dir", str(tmp_path)]
    )
    assert (training_args.learning_rate, args.min_lr, training_args.warmup_steps) == (3e-5, 1e-5, 200)
    assert (training_args.max_steps, training_args.per_device_train_batch_size) == (1000, 12)
    assert (args.max_txt_len, args.end_symbol) == (160, "###")
    assert args.prompt_template == "###Human: {} ###Assistant: " and not args.clean_captions


def test_command_line_flags_override_the_preset_in_either_spelling(model_dir, tmp_path):
    args, training_args = train.parse_arguments(
        ["--stage", "1", "--model_name_or_path", str(model_dir), "--data_path", "a", "b", "--output-dir",
         str(tmp_path), "--learning_rate", "2e-4", "--max-steps", "7", "--end_symbol", "\\n###",
         "--clean-captions", "False", "--remove_unused_columns", "True", "--lr-scheduler-type", "constant"]
    )
    assert (training_args.learning_rate, training_args.max_steps) == (2e-4, 7)
    assert training_args.per_device_train_batch_size == 64  # not given: still the preset's
    assert args.end_symbol == "\n###" and not args.clean_captions
    assert args.data_path == ["a", "b"]
    assert training_args.remove_unused_columns is False  # the collator needs the raw fields
    assert args.lr_schedule == "trainer"


def test_help_shows_each_stage_presets_values():
    text = " ".join(train.build_parser().format_help().split())
    assert "vicuna0 stage 1: 0.0001; vicuna0 stage 2: 3e-05" in text  # --learning-rate, not the Trainer's 5e-05
    assert "vicuna0 stage 1: 32; vicuna0 stage 2: 160" in text  # --max-txt-len
    assert "v2 stage 3: 1e-05" in text and "v2 stage 3: 1024" in text


def test_deepspeed_zero2_config_leaves_optimizer_and_schedule_to_the_trainer():
    config = json.loads((REPO_ROOT / "minigpt4_hf" / "ds_zero2.json").read_text())
    assert config["zero_optimization"]["stage"] == 2
    assert "optimizer" not in config and "scheduler" not in config
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert config[key] == "auto"


# ----------------------------------------------------------------------------------------------------------------------
# Data sources.


def test_corrupt_and_missing_images_are_skipped_and_reported(cc_sbu_dir, caplog):
    formatter = SampleFormatter(TrainingImageTransform(size=56))
    with caplog.at_level("WARNING"):
        data = build_training_dataset([str(cc_sbu_dir)], formatter)
        dataset = data.dataset
        samples = [dataset[index] for index in range(len(dataset))]
    assert len(dataset) == 8  # the annotation without a file is dropped when the folder is read
    assert CORRUPT_ID not in {sample["sample_id"] for sample in samples}
    assert all(sample["image"].size == (56, 56) for sample in samples)
    assert set(data.skipped.reasons) == {CORRUPT_ID, MISSING_ID}
    assert str(cc_sbu_dir / "image" / f"{MISSING_ID}.jpg") in caplog.text
    assert str(cc_sbu_dir / "image" / f"{CORRUPT_ID}.jpg") in caplog.text


def test_webdataset_shards_stream_with_corrupt_samples_skipped(shards_dir):
    formatter = SampleFormatter(TrainingImageTransform(size=56), clean_captions=True, end_symbol="\n")
    data = build_training_dataset([str(shards_dir / "{00000..00001}.tar")], formatter, shuffle_buffer=4)
    assert data.is_streaming
    samples = list(itertools.islice(data.dataset, 44))  # the stream repeats without end, like resampled shards
    corrupt_key = f"{shards_dir / '00001.tar'}#L000010002"
    readable_keys = {f"{shards_dir / f'{shard:05d}.tar'}#L{shard:05d}{item:04d}" for shard in range(2)
                     for item in range(6)} - {corrupt_key}
    assert {sample["sample_id"] for sample in samples} == readable_keys
    assert corrupt_key in data.skipped.reasons
    assert {sample["target"] for sample in samples} == {clean_caption(caption) + "\n" for caption in CAPTIONS}
    assert all(sample["image"].size == (56, 56) for sample in samples)
    glob_data = build_training_dataset([str(shards_dir / "*.tar")], formatter, shuffle_buffer=4)
    assert {sample["sample_id"] for sample in itertools.islice(glob_data.dataset, 44)} == readable_keys


def test_a_stream_without_any_readable_image_stops_with_an_error(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    with tarfile.open(broken / "00000.tar", "w") as archive:
        for item in range(3):
            _add_to_tar(archive, f"K{item}.jpg", b"not an image")
            _add_to_tar(archive, f"K{item}.txt", b"a caption")
    data = build_training_dataset([str(broken)], SampleFormatter(TrainingImageTransform(size=56)))
    with pytest.raises(RuntimeError, match="all unusable"):
        next(iter(data.dataset))
    assert data.skipped.count == 3


def test_sources_are_mixed_by_ratio(tmp_path):
    first = write_shards(tmp_path / "first", "A", 1, 60, image_size=(8, 8))
    second = write_shards(tmp_path / "second", "B", 1, 60, image_size=(8, 8))
    formatter = SampleFormatter(TrainingImageTransform(size=8, mode="resize"))
    data = build_training_dataset([str(first), str(second)], formatter, ratios=[3, 1], seed=1)
    stream = iter(data.dataset)
    drawn = [next(stream)["sample_id"].rsplit("#", 1)[1][0] for _ in range(60)]
    assert 36 <= drawn.count("A") <= 54  # expected 45 of 60


def test_saved_hf_dataset_with_named_columns(tmp_path):
    import datasets

    pictures = [{"bytes": _jpeg(index), "path": None} for index in range(4)] + [{"bytes": b"broken", "path": None}]
    saved = datasets.Dataset.from_dict(
        {"picture": pictures, "description": CAPTIONS + ["a broken one"]},
        features=datasets.Features({"picture": datasets.Image(), "description": datasets.Value("string")}),
    )
    saved.save_to_disk(tmp_path / "saved")
    formatter = SampleFormatter(TrainingImageTransform(size=56))
    with pytest.raises(ValueError, match="--image_column"):
        build_training_dataset([str(tmp_path / "saved")], formatter)
    data = build_training_dataset([str(tmp_path / "saved")], formatter, image_column="picture",
                                  text_column="description")
    samples = [data.dataset[index] for index in range(len(data.dataset))]
    assert [sample["target"] for sample in samples[:4]] == [caption + "###" for caption in CAPTIONS]
    assert samples[4]["sample_id"] == "0" and data.skipped.count == 1  # the broken row gives way to the next


def test_a_data_path_that_names_nothing_is_a_clear_error(tmp_path):
    formatter = SampleFormatter(TrainingImageTransform(size=56))
    for path in (tmp_path / "missing", tmp_path / "shards" / "*.tar", f"{tmp_path}/x-{{000..002}}.tar"):
        with pytest.raises(ValueError, match="matches no file or folder"):
            build_training_dataset([str(path)], formatter)


def test_collator_explains_removed_columns(tiny_shared):
    _, processor = tiny_shared
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        TrainingCollator(processor)([{"sample_id": "0"}])


def test_init_projection_reads_the_original_pth_file(tiny):
    model, _ = tiny
    init_projection(model, ORIGINAL_TINY / "weights" / "pretrained_minigpt4.pth")
    original = torch.load(ORIGINAL_TINY / "weights" / "pretrained_minigpt4.pth", weights_only=True)["model"]
    assert torch.equal(model.language_projection.weight, original["llama_proj.weight"])
    assert torch.equal(model.language_projection.bias, original["llama_proj.bias"])


def test_init_projection_rejects_another_model_size(tiny, tmp_path):
    model, _ = tiny
    safetensors.torch.save_file({"language_projection.weight": torch.zeros(8, 4),
                                 "language_projection.bias": torch.zeros(8)}, str(tmp_path / "p.safetensors"))
    with pytest.raises(ValueError, match="shape"):
        init_projection(model, tmp_path / "p.safetensors")


# ----------------------------------------------------------------------------------------------------------------------
# Training runs.


def test_loss_falls(stage2_run):
    losses = [entry["loss"] for entry in stage2_run["result"]["log_history"] if "loss" in entry]
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5


def test_only_the_projection_changes(stage2_run, model_dir):
    before = safetensors.torch.load_file(str(model_dir / "model.safetensors"))
    after = safetensors.torch.load_file(str(stage2_run["output_dir"] / "model.safetensors"))
    assert before.keys() == after.keys()
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert changed == {"model.language_projection.weight", "model.language_projection.bias"}
    projection = load_projection(stage2_run["output_dir"])
    assert all(torch.equal(projection[key], after[f"model.{key}"]) for key in projection)


def test_learning_rates_follow_the_original_schedule(stage2_run):
    """LAVIS `LinearWarmupCosineLRScheduler.step(cur_epoch, cur_step)` with warmup = one epoch, as both configs."""
    init_lr, min_lr, warmup_lr, warmup_steps, max_steps = 5e-2, 1e-2, 1e-4, 5, 20
    iters_per_epoch, max_epoch = warmup_steps, max_steps // warmup_steps

    def original(cur_epoch: int, cur_step: int) -> float:
        total_cur_step = cur_epoch * iters_per_epoch + cur_step
        if total_cur_step < warmup_steps:
            return min(init_lr, warmup_lr + (init_lr - warmup_lr) * cur_step / max(warmup_steps, 1))
        return (init_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * total_cur_step / (max_epoch * iters_per_epoch))) \
            + min_lr

    rates = stage2_run["rates"]
    assert sorted(rates) == list(range(max_steps))
    for step, rate in rates.items():
        assert rate == pytest.approx(original(step // iters_per_epoch, step % iters_per_epoch), rel=1e-9)


def test_optimizer_decays_the_projection_matrix_but_not_its_bias(stage2_run):
    assert sorted(stage2_run["groups"]) == [(0.0, [(64,)]), (0.05, [(64, 48)])]


def test_skipped_images_are_reported_by_the_run(stage2_run):
    assert set(stage2_run["result"]["skipped_images"]) == {CORRUPT_ID, MISSING_ID}


def test_output_folder_loads_with_the_auto_classes(stage2_run):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    output_dir = stage2_run["output_dir"]
    model = AutoModelForImageTextToText.from_pretrained(output_dir, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(output_dir, trust_remote_code=True)
    projection = load_projection(output_dir)
    assert torch.equal(model.language_projection.weight, projection["language_projection.weight"])
    assert model.config.freeze_language_model and model.config.freeze_qformer
    inputs = processor(images=[Image.open(ORIGINAL_TINY / "inputs" / "coffee.png")], text=["<ImageHere> a"],
                       return_tensors="pt")
    assert model(**inputs).logits.shape[:2] == inputs["input_ids"].shape


def test_stage2_training_warm_starts_from_a_stage1_projection(stage2_run, model_dir, cc_sbu_dir, tmp_path):
    projection_file = stage2_run["output_dir"] / "language_projection.safetensors"
    result = train.main(common_flags(tmp_path, model_dir, [cc_sbu_dir], max_steps=1, learning_rate=0.0,
                                     init_projection=projection_file))
    assert result["global_step"] == 1
    trained = load_projection(tmp_path)
    assert all(torch.equal(trained[key], value) for key, value in load_projection(stage2_run["output_dir"]).items())


def test_stage1_run_on_mixed_shards_and_folder(model_dir, shards_dir, cc_sbu_dir, tmp_path):
    result = train.main(common_flags(tmp_path, model_dir, [shards_dir, cc_sbu_dir], stage=1, max_steps=5,
                                     per_device_train_batch_size=4, data_ratios=[115, 14]))
    assert result["global_step"] == 5
    assert f"{shards_dir / '00001.tar'}#L000010002" in result["skipped_images"]
    before = safetensors.torch.load_file(str(model_dir / "model.safetensors"))["model.language_projection.weight"]
    assert not torch.equal(load_projection(tmp_path)["language_projection.weight"], before)


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_run(model_dir, cc_sbu_dir, tmp_path):
    # 7 readable samples, batch 2: 4 steps per epoch; the interruption falls mid-epoch and the run crosses an epoch.
    flags = {"max_steps": 8, "save_strategy": "steps", "save_steps": 3}
    train.main(common_flags(tmp_path / "whole", model_dir, [cc_sbu_dir], **flags))
    interrupted = tmp_path / "interrupted"
    train.main(common_flags(interrupted, model_dir, [cc_sbu_dir], **flags), extra_callbacks=[StopAfterStep(3)])
    assert (interrupted / "checkpoint-3").is_dir() and not (interrupted / "checkpoint-6").exists()
    checkpoint_files = {path.name for path in (interrupted / "checkpoint-3").iterdir()}
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "model.safetensors"} <= checkpoint_files
    assert set(safetensors.torch.load_file(str(interrupted / "checkpoint-3" / "model.safetensors"))) == {
        "model.language_projection.weight", "model.language_projection.bias"}  # trainable weights only
    result = train.main(common_flags(interrupted, model_dir, [cc_sbu_dir], **flags,
                                     resume_from_checkpoint=interrupted / "checkpoint-3"))
    assert result["global_step"] == 8
    whole, resumed = load_projection(tmp_path / "whole"), load_projection(interrupted)
    assert all(torch.equal(whole[key], resumed[key]) for key in whole)


def test_a_projection_checkpoint_on_its_base_model_gives_the_full_model(stage2_run, model_dir, tmp_path):
    """The way docs/command-line.md ('Trainer checkpoints') gives from a checkpoint to a full model."""
    checkpoint = stage2_run["output_dir"] / "checkpoint-20"
    with pytest.raises(InputError, match="is a Trainer checkpoint"):
        check_model_path(checkpoint)

    model, processor = load_model_and_processor(str(model_dir), device="cpu")
    init_projection(model, checkpoint / "model.safetensors")
    model.save_pretrained(tmp_path / "full")
    processor.save_pretrained(tmp_path / "full")

    reloaded, _ = load_model_and_processor(str(tmp_path / "full"), device="cpu")
    final = load_projection(stage2_run["output_dir"])  # the run ended at its checkpoint: the same projection
    assert torch.equal(reloaded.language_projection.weight, final["language_projection.weight"])
    assert torch.equal(reloaded.language_projection.bias, final["language_projection.bias"])


def test_resumed_streaming_run_ends_with_the_weights_of_an_uninterrupted_run(model_dir, shards_dir, cc_sbu_dir,
                                                                            tmp_path):
    data = [shards_dir, cc_sbu_dir]
    flags = {"max_steps": 6, "save_strategy": "steps", "save_steps": 3, "data_ratios": [3, 1]}
    train.main(common_flags(tmp_path / "whole", model_dir, data, stage=1, **flags))
    interrupted = tmp_path / "interrupted"
    train.main(common_flags(interrupted, model_dir, data, stage=1, **flags), extra_callbacks=[StopAfterStep(3)])
    train.main(common_flags(interrupted, model_dir, data, stage=1, **flags, resume_from_checkpoint="last"))
    whole, resumed = load_projection(tmp_path / "whole"), load_projection(interrupted)
    assert all(torch.equal(whole[key], resumed[key]) for key in whole)


def test_trainer_precision_and_checkpointing_switches_work(model_dir, cc_sbu_dir, tmp_path):
    result = train.main(common_flags(tmp_path, model_dir, [cc_sbu_dir], max_steps=2, dtype="bfloat16",
                                     bf16=True, activation_checkpointing=True, gradient_accumulation_steps=2))
    losses = [entry["loss"] for entry in result["log_history"] if "loss" in entry]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    saved = safetensors.torch.load_file(str(tmp_path / "model.safetensors"))
    assert saved["model.language_model.embed_tokens.weight"].dtype == torch.bfloat16


def test_gradient_accumulation_matches_the_full_batch(model_dir, cc_sbu_dir, tmp_path):
    train.main(common_flags(tmp_path / "full", model_dir, [cc_sbu_dir], max_steps=3,
                            per_device_train_batch_size=4))
    train.main(common_flags(tmp_path / "accumulated", model_dir, [cc_sbu_dir], max_steps=3,
                            per_device_train_batch_size=2, gradient_accumulation_steps=2))
    full, accumulated = load_projection(tmp_path / "full"), load_projection(tmp_path / "accumulated")
    for key in full:
        torch.testing.assert_close(accumulated[key], full[key], rtol=0, atol=1e-6)


def test_lora_trains_the_language_model_and_merges(model_dir, cc_sbu_dir, tmp_path):
    from peft import PeftModel

    from modeling_minigpt4 import MiniGPT4ForConditionalGeneration

    lora = {"max_steps": 4, "lora_r": 4, "lora_alpha": 8, "lora_target_modules": ["q_proj", "v_proj"]}
    train.main(common_flags(tmp_path / "merged", model_dir, [cc_sbu_dir], **lora, merge_lora=True))
    train.main(common_flags(tmp_path / "adapter", model_dir, [cc_sbu_dir], **lora))

    base = safetensors.torch.load_file(str(model_dir / "model.safetensors"))
    merged = safetensors.torch.load_file(str(tmp_path / "merged" / "model.safetensors"))
    changed = {key for key in base if not torch.equal(base[key], merged[key])}
    assert changed == {"model.language_projection.weight", "model.language_projection.bias"} | {
        key for key in base
        if key.startswith("model.language_model.") and key.endswith(("q_proj.weight", "v_proj.weight"))
    }
    assert not (tmp_path / "merged" / "lora_adapter").exists()

    # Unmerged: the folder holds the base language model and the adapter sits beside it; merging it gives the same.
    model = MiniGPT4ForConditionalGeneration.from_pretrained(tmp_path / "adapter")
    assert torch.equal(model.language_model.layers[0].self_attn.q_proj.weight,
                       base["model.language_model.layers.0.self_attn.q_proj.weight"])
    merged_again = PeftModel.from_pretrained(model, tmp_path / "adapter" / "lora_adapter").merge_and_unload()
    for key, value in merged_again.state_dict().items():
        torch.testing.assert_close(value, merged[key], rtol=0, atol=1e-6)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two_processes(argv: list[str]) -> None:
    """`torchrun --nproc_per_node 2 scripts/train.py ARGV` on CPU."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), str(REPO_ROOT / "scripts" / "train.py"), *argv,
               "--ddp_backend", "gloo"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    completed = subprocess.run(command, check=False, capture_output=True, text=True, timeout=240, env=environment)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]


def test_two_process_run_matches_one_process_run(model_dir, cc_sbu_dir, tmp_path):
    """torchrun with 2 CPU processes (gloo), 2 samples each, against 1 process with 4 samples per step."""
    flags = {"max_steps": 4}
    run_two_processes(common_flags(tmp_path / "two", model_dir, [cc_sbu_dir], **flags, per_device_train_batch_size=2))
    train.main(common_flags(tmp_path / "one", model_dir, [cc_sbu_dir], **flags, per_device_train_batch_size=4))
    one, two = load_projection(tmp_path / "one"), load_projection(tmp_path / "two")
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-6)


def test_two_process_streaming_run_with_uneven_shards_completes(model_dir, shards_dir, cc_sbu_dir, tmp_path):
    """Each process streams its own shards (one shard holds a corrupt sample); none runs dry before the others."""
    run_two_processes(common_flags(tmp_path, model_dir, [shards_dir, cc_sbu_dir], stage=1, max_steps=8,
                                   data_ratios=[3, 1], gradient_accumulation_steps=2))
    with safetensors.safe_open(str(tmp_path / "language_projection.safetensors"), "pt") as projection_file:
        assert projection_file.metadata()["global_step"] == "8"
