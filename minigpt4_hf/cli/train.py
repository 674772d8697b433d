"""
MiniGPT-4 / MiniGPT-v2 training with the stock transformers `Trainer`.

    python scripts/train.py [--variant {vicuna0,llama2,v2}] --stage N --model_name_or_path DIR_OR_ID \\
        --data_path PATH [PATH ...] [--data_ratios R ...] --output_dir DIR \\
        [any TrainingArguments flag] [--init_projection FILE] [--lora_r 64 ...] [--unfreeze_qformer]

`--variant` (default: the model's own, from its config) and `--stage` fill in the original recipe of that variant
(see `training.TRAINING_PRESETS`): stages 1 and 2 of MiniGPT-4 with Vicuna v0 or Llama-2, stage 3 (the released
fine-tuning) of MiniGPT-v2. Any flag given on the command line wins over the preset. The same command runs under
`torchrun`, `accelerate launch` and DeepSpeed (`--deepspeed scripts/ds_zero2.json`).
"""

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
import transformers
from transformers import HfArgumentParser, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from minigpt4_hf.random_models import load_model_and_processor
from minigpt4_hf.training import (
    ALIGNMENT_PROMPTS,
    IMAGE_INSTRUCTION_FORMAT,
    IMAGE_TRANSFORMS,
    PROJECTION_FILE_NAME,
    TRAINING_PRESETS,
    MiniGPT4Trainer,
    SampleFormatter,
    SetEpochCallback,
    TrainingCollator,
    TrainingImageTransform,
    build_training_dataset,
    expand_prompts,
    prepare_model_for_training,
    read_prompts_file,
    save_trained_model,
    trainable_parameter_summary,
)

logger = logging.getLogger("train")

MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "A MiniGPT-4 folder or Hub id (model + processor)."})
    model_dtype: str = field(
        default="float32",
        metadata={"help": "dtype of the frozen weights (trainable ones stay float32).", "choices": list(MODEL_DTYPES)},
    )
    init_projection: str | None = field(
        default=None,
        metadata={"help": "Warm-start the projection: a language_projection.safetensors from a stage-1 run, or the "
                          "original's .pth ({'model': {'llama_proj.weight', 'llama_proj.bias'}})."},
    )
    unfreeze_qformer: bool = field(default=False, metadata={"help": "Also train the Q-Former and its query tokens."})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank on the language model; 0 = no LoRA."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "v_proj"],
        metadata={"help": "Language-model Linear layer names that get LoRA ('all-linear' for all but the head)."},
    )
    merge_lora: bool = field(default=False, metadata={"help": "Merge LoRA into the saved weights."})
    save_frozen_weights: bool = field(
        default=False, metadata={"help": "Write whole models into checkpoints (default: trainable weights only)."}
    )


@dataclass
class DataArguments:
    stage: int = field(metadata={"help": "Recipe preset of the variant: 1 (image-caption pretraining) or 2 "
                                         "(alignment) for vicuna0 and llama2, 3 (fine-tuning) for v2.",
                                 "choices": sorted({stage for stages in TRAINING_PRESETS.values() for stage in stages})})
    data_path: list[str] = field(
        metadata={"help": "cc_sbu_align folder, webdataset shards (folder, glob, {000..999}), saved HF dataset, data "
                          "file or Hub dataset id; several are mixed by --data_ratios."},
    )
    variant: str | None = field(
        default=None,
        metadata={"help": "Which released model's recipe (default: the model's config.variant, else vicuna0).",
                  "choices": list(TRAINING_PRESETS)},
    )
    data_ratios: list[float] = field(default_factory=list, metadata={"help": "Sampling weight per --data_path."})
    image_column: str | None = field(default=None, metadata={"help": "Image column (default: guessed)."})
    text_column: str | None = field(default=None, metadata={"help": "Caption / answer column (default: guessed)."})
    instruction_column: str | None = field(
        default=None, metadata={"help": "Task instruction column, e.g. '[refer] where is the cat?' (default: "
                                        "'instruction', 'instruction_input' or 'question' if present)."},
    )
    conversation_column: str | None = field(
        default=None, metadata={"help": "Multi-turn conversation column, LLaVA turns or chat messages (default: "
                                        "'conversations', 'conversation' or 'messages' if present)."},
    )
    max_txt_len: int = field(default=160, metadata={"help": "Target tokens kept per sample (end symbol included)."})
    end_symbol: str = field(default="###", metadata={"help": "Appended to each caption (escapes like \\n work)."})
    prompt_template: str = field(
        default="", metadata={"help": "Template around each prompt, e.g. '###Human: {} ###Assistant: '; empty = no "
                                      "prompt (the text is <ImageHere> alone)."},
    )
    instruction_format: str = field(
        default=IMAGE_INSTRUCTION_FORMAT,
        metadata={"help": "How a row's instruction (and a conversation's first question) goes with its image, "
                          "before --prompt_template wraps it."},
    )
    followup_format: str = field(
        default="{}", metadata={"help": "How a conversation's later questions are written before the template."},
    )
    prompts_file: str | None = field(
        default=None, metadata={"help": "Instructions, one per line with <ImageHere> (default: the original "
                                        "alignment.txt prompts)."},
    )
    clean_captions: bool = field(default=False, metadata={"help": "Clean captions as the original blip_caption."})
    max_caption_words: int = field(default=50, metadata={"help": "Word limit of caption cleaning."})
    image_transform: str = field(
        default="random_resized_crop",
        metadata={"help": "random_resized_crop (the released weights' recipe) or resize (plain squash).",
                  "choices": list(IMAGE_TRANSFORMS)},
    )
    crop_scale_min: float = field(default=0.5, metadata={"help": "RandomResizedCrop smallest area fraction."})
    crop_scale_max: float = field(default=1.0, metadata={"help": "RandomResizedCrop largest area fraction."})
    shuffle_buffer: int = field(default=1000, metadata={"help": "Shuffle buffer of streamed (webdataset) data."})
    min_lr: float = field(default=0.0, metadata={"help": "Final learning rate of the cosine."})
    warmup_lr: float = field(default=0.0, metadata={"help": "Learning rate at the first warmup step."})
    lr_schedule: str | None = field(
        default=None,
        metadata={"help": "linear_warmup_cosine (the original's; default) or trainer (--lr_scheduler_type; chosen "
                          "automatically when --lr_scheduler_type is given)."},
    )


def _flag_names(argv: list[str]) -> set[str]:
    """The option names written in `argv` (`--name value` and `--name=value`)."""
    return {arg[2:].split("=", 1)[0] for arg in argv if arg.startswith("--")}


def model_variant(model_path: str | None) -> str | None:
    """The `variant` in the config.json of a local model folder (None: no such folder or field)."""
    config = Path(model_path) / "config.json" if model_path else None
    if config is None or not config.is_file():
        return None
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("variant", "vicuna0")
    except (OSError, ValueError):
        return None


def preset_argv(preset: dict) -> list[str]:
    """A preset as command-line flags (list values as several arguments)."""
    argv = []
    for name, value in preset.items():
        argv += [f"--{name}", *([str(item) for item in value] if isinstance(value, list) else [str(value)])]
    return argv


def parse_arguments(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """
    Parses the command line over the variant's stage preset: the preset's values are put in front of `argv`, so that
    any flag the user gives (parsed later) overrides them. The variant is `--variant`, else the model folder's
    `config.variant`, else `vicuna0`; a `--variant` that contradicts the model's config is an error. Also forces
    what the data pipeline needs (`remove_unused_columns=False`).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    stage_parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    stage_parser.add_argument("--stage", type=int)
    stage_parser.add_argument("--variant", choices=list(TRAINING_PRESETS))
    stage_parser.add_argument("--model_name_or_path", "--model-name-or-path")
    known = stage_parser.parse_known_args(argv)[0]
    given = _flag_names(argv)
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments), allow_abbrev=False)

    from_model = model_variant(known.model_name_or_path)
    if known.variant and from_model and known.variant != from_model:
        parser.error(f"--variant {known.variant}: the model {known.model_name_or_path} is a {from_model} model "
                     f"(its config.json says variant {from_model!r}); pass --variant {from_model} or another model.")
    variant = known.variant or from_model or "vicuna0"
    stages = TRAINING_PRESETS[variant]
    if known.stage is not None and known.stage not in stages:
        parser.error(f"--stage {known.stage}: the {variant} variant has the presets "
                     f"{', '.join(f'--stage {stage}' for stage in stages)}.")
    preset = stages.get(known.stage, {})
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(
        args=preset_argv(preset) + argv + ([] if known.variant else ["--variant", variant])
    )

    if "output_dir" not in given:
        parser.error("the following arguments are required: --output_dir")
    for name in ("end_symbol", "instruction_format", "followup_format"):
        value = getattr(data_args, name)
        if "\\" in value:
            setattr(data_args, name, value.encode("utf-8").decode("unicode_escape"))
    if data_args.lr_schedule is None:
        data_args.lr_schedule = "trainer" if "lr_scheduler_type" in given else "linear_warmup_cosine"
    if "ddp_find_unused_parameters" not in given:
        # Every trainable parameter takes part in every forward pass (projection, LoRA, Q-Former).
        training_args.ddp_find_unused_parameters = False
    if training_args.remove_unused_columns:
        if "remove_unused_columns" in given:
            logger.warning("remove_unused_columns=True would drop the raw image/text fields; using False.")
        training_args.remove_unused_columns = False
    return model_args, data_args, training_args


def setup_logging(training_args: TrainingArguments) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)])
    level = training_args.get_process_log_level()
    for name in ("train", "training_data"):
        logging.getLogger(name).setLevel(min(level, logging.INFO) if training_args.should_log else level)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)


def resolve_checkpoint(value: str | None, output_dir: str) -> str | None:
    """`--resume_from_checkpoint` as a folder; `last`/`true` = the newest checkpoint in `--output_dir`."""
    if value is None or value.lower() in ("", "false", "none"):
        return None
    if value.lower() in ("last", "latest", "true"):
        last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if last is None:
            raise ValueError(f"--resume_from_checkpoint {value}: no checkpoint-* folder in {output_dir}.")
        return last
    if not os.path.isdir(value):
        raise ValueError(f"--resume_from_checkpoint {value}: no such checkpoint folder.")
    return value


def main(argv: list[str] | None = None, extra_callbacks: list | None = None) -> dict:
    """
    Runs one training and writes the final model into `--output_dir`.

    Returns:
        `{"output_dir", "global_step", "log_history", "skipped_images" (id -> reason), "train_loss"}`.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    model_args, data_args, training_args = parse_arguments(argv)
    setup_logging(training_args)
    preset = TRAINING_PRESETS[data_args.variant][data_args.stage]
    overridden = sorted(name for name in preset if name in _flag_names(argv))
    logger.info("%s stage %s preset: %s; overridden on the command line: %s", data_args.variant, data_args.stage,
                preset, ", ".join(overridden) or "nothing")
    checkpoint = resolve_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    # Seeded before the model is prepared: LoRA's initialisation draws from the global generator.
    transformers.set_seed(training_args.seed)

    model, processor = load_model_and_processor(
        model_args.model_name_or_path, dtype=MODEL_DTYPES[model_args.model_dtype]
    )
    model_family = getattr(model.config, "variant", "vicuna0")
    if model_family != data_args.variant:
        raise ValueError(f"--variant {data_args.variant}: {model_args.model_name_or_path} is a {model_family} model; "
                         f"pass --variant {model_family}.")
    image_size = model.config.vision_config.image_size
    if getattr(processor.image_processor.size, "height", None) != image_size:
        logger.warning("The processor resizes to %s but the model takes %s px images; using %s.",
                       processor.image_processor.size, image_size, image_size)
        processor.image_processor.size = {"height": image_size, "width": image_size}

    model = prepare_model_for_training(
        model,
        unfreeze_qformer=model_args.unfreeze_qformer,
        projection_file=model_args.init_projection,
        lora_r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        lora_target_modules=model_args.lora_target_modules,
    )
    logger.info("Training %s", trainable_parameter_summary(model))

    prompts = []
    if data_args.prompt_template:
        instructions = read_prompts_file(data_args.prompts_file) if data_args.prompts_file else ALIGNMENT_PROMPTS
        prompts = expand_prompts(data_args.prompt_template, instructions)
    formatter = SampleFormatter(
        image_transform=TrainingImageTransform(
            size=image_size, mode=data_args.image_transform,
            scale=(data_args.crop_scale_min, data_args.crop_scale_max),
        ),
        prompts=prompts,
        end_symbol=data_args.end_symbol,
        clean_captions=data_args.clean_captions,
        max_caption_words=data_args.max_caption_words,
        prompt_template=data_args.prompt_template,
        instruction_format=data_args.instruction_format,
        followup_format=data_args.followup_format,
    )
    train_data = build_training_dataset(
        data_args.data_path, formatter, ratios=data_args.data_ratios, image_column=data_args.image_column,
        text_column=data_args.text_column, seed=training_args.seed, shuffle_buffer=data_args.shuffle_buffer,
        instruction_column=data_args.instruction_column, conversation_column=data_args.conversation_column,
    )
    if train_data.is_streaming:
        if training_args.max_steps <= 0:
            raise ValueError("Streamed data (webdataset shards or mixed sources) has no length: give --max_steps.")
        # Each process reads its own part of the stream (batches of different lengths cannot be dispatched).
        training_args.accelerator_config.dispatch_batches = False

    trainer = MiniGPT4Trainer(
        model=model,
        args=training_args,
        train_dataset=train_data.dataset,
        data_collator=TrainingCollator(processor, max_txt_len=data_args.max_txt_len),
        processing_class=processor,
        callbacks=[SetEpochCallback(train_data), *(extra_callbacks or [])],
        min_lr=data_args.min_lr,
        warmup_lr=data_args.warmup_lr,
        lr_schedule=data_args.lr_schedule,
        save_frozen_weights=model_args.save_frozen_weights,
    )
    result = trainer.train(resume_from_checkpoint=checkpoint)
    logger.info(train_data.skipped.summary())

    if trainer.args.should_save:
        save_trained_model(
            trainer.model, processor, training_args.output_dir, merge_lora=model_args.merge_lora,
            metadata={"variant": data_args.variant, "stage": str(data_args.stage),
                      "global_step": str(trainer.state.global_step)},
        )
        logger.info("Saved the trained model to %s and the projection alone to %s", training_args.output_dir,
                    Path(training_args.output_dir) / PROJECTION_FILE_NAME)
    trainer.accelerator.wait_for_everyone()
    return {
        "output_dir": training_args.output_dir,
        "global_step": trainer.state.global_step,
        "log_history": trainer.state.log_history,
        "skipped_images": dict(train_data.skipped.reasons),
        "train_loss": result.training_loss,
    }



def cli() -> None:
    """Console entry point `minigpt4-train`."""
    main()


if __name__ == "__main__":
    cli()
