"""
MiniGPT-4 / MiniGPT-v2 training with the stock transformers `Trainer`.

    minigpt4-train [--variant {vicuna0,llama2,v2}] --stage N --model FOLDER_OR_HUB_ID --data-path PATH [PATH ...] \\
        [--data-ratios R ...] --output-dir DIR [any TrainingArguments flag] [--init-projection FILE] [--lora-r 64 ...]

`--variant` (default: the model's own, from its config) and `--stage` fill in the original recipe of that variant
(the "(default: ...)" values below): stages 1 and 2 of MiniGPT-4 with Vicuna v0 or Llama-2, stage 3 (the released
fine-tuning) of MiniGPT-v2. Any flag given on the command line wins over the preset. Every other transformers `TrainingArguments` flag works too
(`--bf16`, `--gradient-accumulation-steps`, `--save-strategy`, `--report-to`, `--deepspeed`, ...; `--help-trainer`
lists them). The same command runs under `torchrun`, `accelerate launch` and DeepSpeed
(`--deepspeed minigpt4_hf/ds_zero2.json`).

The final model goes to --output-dir; checkpoints go to its checkpoint-N folders and hold the trained weights only
(see docs/command-line.md, "Trainer checkpoints", for turning one into a full model).
"""

import argparse
import json
import logging
import sys
from pathlib import Path

from minigpt4_hf.cli.options import (
    CommandLineParser,
    UserError,
    check_extra_installed,
    console_entry_point,
    dashes_for_underscores,
    positive_int,
)
from minigpt4_hf.inputs import (
    DTYPE_CHOICES,
    check_data_path,
    check_file,
    check_folder,
    check_model_path,
    previous_run_entries,
)
from minigpt4_hf.recipe import IMAGE_INSTRUCTION_FORMAT, IMAGE_TRANSFORMS, TRAINING_PRESETS


PROG = "minigpt4-train"
logger = logging.getLogger("train")

# What the TrainingArguments flags that the stage presets set mean here. The tool parses these flags itself only to
# show the preset in --help, and hands them on to TrainingArguments.
TRAINER_FLAG_HELP = {
    "learning_rate": "Peak learning rate (the original's init_lr).",
    "warmup_steps": "Steps of the linear warmup from --warmup-lr.",
    "weight_decay": "AdamW weight decay of matrices (biases and norms get none).",
    "max_steps": "Optimizer steps of the run.",
    "per_device_train_batch_size": "Samples per step and process.",
    "max_grad_norm": "Gradient clipping; 0 = none, as the original.",
    "seed": "Seed of the data order, crops, prompts and LoRA initialisation.",
    "save_steps": "Steps between checkpoints.",
    "logging_steps": "Steps between loss logs.",
}


def boolean(text: str) -> bool:
    """`true`/`false` (also 1/0, yes/no), as TrainingArguments' boolean flags take them."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "y"):
        return True
    if value in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


# Every preset of every variant, as (variant, stage, values).
PRESETS = [(variant, stage, preset) for variant, stages in TRAINING_PRESETS.items() for stage, preset in stages.items()]
STAGES = sorted({stage for _, stage, _ in PRESETS})


def preset_default(name: str, fallback=None) -> str:
    """'vicuna0 stage 1: X; ...' for a flag that presets set (and `fallback`, its value where no preset sets it)."""
    parts = [f"{variant} stage {stage}: {preset[name]!r}" for variant, stage, preset in PRESETS if name in preset]
    return "; ".join(([f"{fallback!r}"] if fallback is not None else []) + parts)


def model_variant(model_path: str | None) -> str | None:
    """The `variant` in the config.json of a local model folder (None: no such folder or field)."""
    config = Path(model_path) / "config.json" if model_path else None
    if config is None or not config.is_file():
        return None
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("variant", "vicuna0")
    except (OSError, ValueError):
        return None


def build_parser() -> CommandLineParser:
    """
    The tool's flags. `parser.trainer_preset_flags` names the TrainingArguments flags the presets set (everything in
    a preset that is not one of the tool's own flags).
    """
    parser = CommandLineParser(PROG, description=__doc__)
    own = set()
    # What a flag that some presets set takes where the chosen preset does not set it.
    parser.preset_fallbacks = {}

    def add_flag(container, *names: str, help: str, **kwargs):
        """A flag; a preset one gets None as its default (filled from the stage) and the presets in its help."""
        dest = names[0][2:].replace("-", "_")
        own.add(dest)
        if any(dest in preset for _, _, preset in PRESETS):
            fallback = kwargs.pop("default", None)
            if kwargs.get("action") == "store_true":
                del kwargs["action"]
                kwargs.update(type=boolean, nargs="?", const=True, metavar="true|false")
                fallback = False
            parser.preset_fallbacks[dest] = fallback
            kwargs["default"] = None
            help = f"{help} (default: {preset_default(dest, fallback)})"
        elif kwargs.get("action") == "store_true":
            # On/off flags also take a value (`--merge-lora false`), as TrainingArguments' booleans do.
            del kwargs["action"]
            kwargs.update(type=boolean, nargs="?", const=True, default=False, metavar="true|false")
            help = f"{help} (default: off)"
        elif "default" in kwargs and "(default" not in help:
            help = f"{help} (default: %(default)s)"
        container.add_argument(*names, help=help, **kwargs)

    parser.add_argument("--help-trainer", action="store_true",
                        help="List every transformers TrainingArguments flag and exit (this imports torch).")
    run = parser.add_argument_group("run")
    add_flag(run, "--stage", type=int, choices=STAGES, required=True,
             help="Recipe preset of the variant: 1 (image-caption pretraining) or 2 (alignment) for vicuna0 and "
             "llama2, 3 (fine-tuning) for v2.")
    add_flag(run, "--variant", choices=list(TRAINING_PRESETS),
             help="Which released model's recipe (default: the model's config.variant, else vicuna0).")
    add_flag(run, "--model", "--model-name-or-path", required=True, metavar="FOLDER_OR_HUB_ID",
             help="The MiniGPT-4 to start from: a saved folder (model + processor) or a Hub id.")
    add_flag(run, "--dtype", choices=DTYPE_CHOICES, default="float32",
             help="dtype of the frozen weights; trainable ones stay float32. auto = float32 (the model is loaded on "
             "the CPU; the Trainer moves it)")
    add_flag(run, "--data-path", nargs="+", required=True, metavar="PATH",
             help="cc_sbu_align folder (the one holding filter_cap.json), webdataset shards (folder, glob, "
             "{000..999}), saved HF dataset, data file or Hub dataset id; several are mixed by --data-ratios.")
    add_flag(run, "--data-ratios", help="Sampling weight per --data-path (default: equal).", type=float, nargs="+")
    add_flag(run, "--output-dir", required=True, metavar="DIR",
             help="Where checkpoints and the final model go; a folder of an earlier run is refused unless --resume or "
             "--overwrite-output-dir.")
    add_flag(run, "--overwrite-output-dir", action="store_true",
             help="Train into --output-dir even though an earlier run wrote there (its checkpoint-N folders stay; the "
             "final model is replaced)")
    add_flag(run, "--resume", "--resume-from-checkpoint", nargs="?", const="last", metavar="CHECKPOINT",
             help="Continue from a checkpoint-N folder, or from the newest one in --output-dir ('last', or no value) "
             "(default: start afresh).")

    model = parser.add_argument_group("model")
    add_flag(model, "--init-projection",
             help="Warm-start the projection: a language_projection.safetensors from a stage-1 run, or the original's "
             ".pth ({'model': {'llama_proj.weight', 'llama_proj.bias'}}) (default: none).")
    add_flag(model, "--unfreeze-qformer", help="Also train the Q-Former and its query tokens", action="store_true")
    add_flag(model, "--lora-r", help="LoRA rank on the language model; 0 = no LoRA", type=int, default=0)
    add_flag(model, "--lora-alpha", help="LoRA alpha", type=int, default=16)
    add_flag(model, "--lora-dropout", help="LoRA dropout", type=float, default=0.05)
    add_flag(model, "--lora-target-modules", nargs="+", default=["q_proj", "v_proj"],
             help="Language-model Linear layer names that get LoRA ('all-linear' for all but the head)")
    add_flag(model, "--merge-lora", help="Merge LoRA into the saved weights", action="store_true")
    add_flag(model, "--save-frozen-weights", action="store_true",
             help="Write whole models into checkpoints (otherwise: trained weights only)")

    data = parser.add_argument_group("data")
    add_flag(data, "--image-column", help="Image column (default: guessed).")
    add_flag(data, "--text-column", help="Caption / answer column (default: guessed).")
    add_flag(data, "--instruction-column",
             help="Task instruction column, e.g. '[refer] where is the cat?' (default: 'instruction', "
             "'instruction_input' or 'question' if present).")
    add_flag(data, "--conversation-column",
             help="Multi-turn conversation column, LLaVA turns or chat messages (default: 'conversations', "
             "'conversation' or 'messages' if present).")
    add_flag(data, "--max-txt-len", help="Target tokens kept per sample, end symbol included.", type=positive_int)
    add_flag(data, "--end-symbol", help="Appended to each caption; escapes like \\n work.")
    add_flag(data, "--prompt-template",
             help="Template around each prompt, e.g. '###Human: {} ###Assistant: '; empty = no prompt (the text is "
             "<ImageHere> alone).")
    add_flag(data, "--instruction-format", default=IMAGE_INSTRUCTION_FORMAT,
             help="How a row's instruction (and a conversation's first question) goes with its image, before "
             "--prompt-template wraps it")
    add_flag(data, "--followup-format", default="{}",
             help="How a conversation's later questions are written before the template")
    add_flag(data, "--prompts-file",
             help="Instructions, one per line with <ImageHere> (default: the original alignment.txt prompts).")
    add_flag(data, "--clean-captions", help="Clean captions as the original blip_caption (true/false).", type=boolean,
             nargs="?", const=True)
    add_flag(data, "--max-caption-words", help="Word limit of caption cleaning", type=positive_int, default=50)
    add_flag(data, "--image-transform", choices=IMAGE_TRANSFORMS, default="random_resized_crop",
             help="random_resized_crop (the released weights' recipe) or resize (a plain squash)")
    add_flag(data, "--crop-scale-min", help="RandomResizedCrop smallest area fraction", type=float, default=0.5)
    add_flag(data, "--crop-scale-max", help="RandomResizedCrop largest area fraction", type=float, default=1.0)
    add_flag(data, "--shuffle-buffer", type=positive_int, default=1000,
             help="Shuffle buffer of streamed (webdataset) data")

    schedule = parser.add_argument_group("learning rate")
    add_flag(schedule, "--min-lr", help="Final learning rate of the cosine.", type=float)
    add_flag(schedule, "--warmup-lr", help="Learning rate at the first warmup step.", type=float)
    add_flag(schedule, "--lr-schedule", choices=["linear_warmup_cosine", "trainer"],
             help="linear_warmup_cosine (the original's) or trainer (--lr-scheduler-type) (default: trainer when "
             "--lr-scheduler-type is given, else linear_warmup_cosine).")

    trainer = parser.add_argument_group(
        "TrainingArguments flags the stage presets set (every other TrainingArguments flag is accepted too)"
    )
    parser.trainer_preset_flags = [name for name in dict.fromkeys(key for _, _, preset in PRESETS
                                                                   for key in preset) if name not in own]
    for name in parser.trainer_preset_flags:
        add_flag(trainer, "--" + name.replace("_", "-"), metavar="VALUE",
             help=TRAINER_FLAG_HELP.get(name, f"TrainingArguments.{name}."))
    return parser


def _flag_names(argv: list[str]) -> set[str]:
    """The option names written in `argv` (`--name value` and `--name=value`), with underscores."""
    return {arg[2:].split("=", 1)[0].replace("-", "_") for arg in dashes_for_underscores(argv) if arg.startswith("--")}


def parse_command_line(argv: list[str] | None = None) -> argparse.Namespace:
    """
    The tool's own flags, with the variant's stage preset filled in where the command line gave nothing, and in
    `trainer_argv` what goes to `TrainingArguments`: the preset's Trainer flags, then the command line's. The variant
    is `--variant`, else the model folder's `config.variant`, else `vicuna0`; a `--variant` that contradicts the
    model's config is an error. Parses without importing torch.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if "--help-trainer" in dashes_for_underscores(argv):
        from transformers import HfArgumentParser, TrainingArguments

        HfArgumentParser(TrainingArguments, prog=PROG).print_help()
        parser.exit(0)
    args, unknown = parser.parse_known_args(argv)
    given = _flag_names(argv)
    from_model = model_variant(args.model)
    if args.variant and from_model and args.variant != from_model:
        parser.error(f"--variant {args.variant}: the model {args.model} is a {from_model} model (its config.json says "
                     f"variant {from_model!r}); pass --variant {from_model} or another model.")
    args.variant = args.variant or from_model or "vicuna0"
    stages = TRAINING_PRESETS[args.variant]
    if args.stage not in stages:
        parser.error(f"--stage {args.stage}: the {args.variant} variant has the presets "
                     f"{', '.join(f'--stage {stage}' for stage in stages)}.")
    preset = stages[args.stage]

    trainer_argv = ["--output_dir", args.output_dir]
    for name, value in preset.items():
        if getattr(args, name) is not None:
            continue
        if name in parser.trainer_preset_flags:
            trainer_argv += [f"--{name}", str(value)]
        else:
            setattr(args, name, value)
    for name in parser.trainer_preset_flags:
        if getattr(args, name) is not None and name in given:
            trainer_argv += [f"--{name}", getattr(args, name)]
    for name, fallback in parser.preset_fallbacks.items():
        if getattr(args, name) is None and fallback is not None:
            setattr(args, name, fallback)
    args.trainer_argv = trainer_argv + unknown
    args.given = given

    if args.data_ratios is None:
        args.data_ratios = []
    for name in ("end_symbol", "instruction_format", "followup_format"):
        value = getattr(args, name)
        if value is not None and "\\" in value and name in given:
            setattr(args, name, value.encode("utf-8").decode("unicode_escape"))
    if args.lr_schedule is None:
        args.lr_schedule = "trainer" if "lr_scheduler_type" in given else "linear_warmup_cosine"
    return args


def check_training_inputs(args: argparse.Namespace) -> None:
    """Every path the run needs, before anything is imported or loaded."""
    check_model_path(args.model)
    for path in args.data_path:
        check_data_path(path)
    if args.data_ratios and len(args.data_ratios) != len(args.data_path):
        raise UserError(f"Got {len(args.data_path)} --data-path value(s) but {len(args.data_ratios)} --data-ratios; "
                        "give one each.")
    for flag, path in (("--init-projection", args.init_projection), ("--prompts-file", args.prompts_file)):
        if path is not None:
            check_file(path, flag)
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"--output-dir {output_dir} is a file, not a folder.")
    if args.resume is not None and args.resume.lower() not in ("last", "latest", "true"):
        check_folder(args.resume, "--resume")
    elif args.resume is not None and not any(output_dir.glob("checkpoint-*")):
        raise UserError(f"--resume {args.resume}: no checkpoint-N folder in --output-dir {output_dir}.")
    earlier = previous_run_entries(output_dir)
    if earlier and args.resume is None and not args.overwrite_output_dir:
        listed = ", ".join(earlier[:4]) + (", ..." if len(earlier) > 4 else "")
        raise UserError(
            f"--output-dir {output_dir} holds an earlier run ({listed}): pass --resume to continue it, "
            "--overwrite-output-dir to train into it anyway, or choose another --output-dir."
        )


def training_arguments(args: argparse.Namespace):
    """`TrainingArguments` from `args.trainer_argv`, with what the data pipeline needs forced."""
    from transformers import HfArgumentParser, TrainingArguments

    class TrainerArgumentParser(HfArgumentParser):
        def error(self, message: str):
            self.exit(2, f"{PROG}: error: {message} (see {PROG} --help)\n")

    parser = TrainerArgumentParser(TrainingArguments, prog=PROG, allow_abbrev=False)
    training_args, remaining = parser.parse_args_into_dataclasses(args=args.trainer_argv,
                                                                  return_remaining_strings=True)
    if remaining:
        parser.error(f"unrecognized arguments: {' '.join(remaining)}")
    if "ddp_find_unused_parameters" not in args.given:
        # Every trainable parameter takes part in every forward pass (projection, LoRA, Q-Former).
        training_args.ddp_find_unused_parameters = False
    if training_args.remove_unused_columns:
        if "remove_unused_columns" in args.given:
            logger.warning("remove_unused_columns=True would drop the raw image/text fields; using False.")
        training_args.remove_unused_columns = False
    return training_args


def parse_arguments(argv: list[str] | None = None):
    """`(args, training_args)`: the tool's own flags (stage preset applied) and the `TrainingArguments`."""
    args = parse_command_line(argv)
    return args, training_arguments(args)


def setup_logging(training_args) -> None:
    import datasets
    import transformers

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)])
    level = training_args.get_process_log_level()
    for name in ("train", "training_data"):
        logging.getLogger(name).setLevel(min(level, logging.INFO) if training_args.should_log else level)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)


def resolve_checkpoint(value: str | None, output_dir: str) -> str | None:
    """`--resume` as a folder; `last` = the newest checkpoint in `--output-dir`."""
    from transformers.trainer_utils import get_last_checkpoint

    if value is None:
        return None
    if value.lower() in ("last", "latest", "true"):
        last = get_last_checkpoint(output_dir)
        if last is None:
            raise UserError(f"--resume {value}: no checkpoint-N folder in --output-dir {output_dir}.")
        return last
    return value


def main(argv: list[str] | None = None, extra_callbacks: list | None = None) -> dict:
    """
    Runs one training and writes the final model into `--output-dir`.

    Returns:
        `{"output_dir", "global_step", "log_history", "skipped_images" (id -> reason), "train_loss"}`.
    """
    args = parse_command_line(argv)
    check_training_inputs(args)
    check_extra_installed("train", "accelerate", "datasets", *(["peft"] if args.lora_r > 0 else []))

    import transformers

    from minigpt4_hf.inference import load_model_and_processor
    from minigpt4_hf.training import (
        ALIGNMENT_PROMPTS,
        PROJECTION_FILE_NAME,
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

    training_args = training_arguments(args)
    setup_logging(training_args)
    preset = TRAINING_PRESETS[args.variant][args.stage]
    overridden = sorted(name for name in preset if name in args.given)
    logger.info("%s stage %s preset: %s; overridden on the command line: %s", args.variant, args.stage, preset,
                ", ".join(overridden) or "nothing")
    checkpoint = resolve_checkpoint(args.resume, training_args.output_dir)
    # Seeded before the model is prepared: LoRA's initialisation draws from the global generator.
    transformers.set_seed(training_args.seed)

    model, processor = load_model_and_processor(args.model, device="cpu", dtype=args.dtype)
    model_family = getattr(model.config, "variant", "vicuna0")
    if model_family != args.variant:
        raise UserError(f"--variant {args.variant}: {args.model} is a {model_family} model; pass --variant "
                        f"{model_family}.")
    image_size = model.config.vision_config.image_size
    if getattr(processor.image_processor.size, "height", None) != image_size:
        logger.warning("The processor resizes to %s but the model takes %s px images; using %s.",
                       processor.image_processor.size, image_size, image_size)
        processor.image_processor.size = {"height": image_size, "width": image_size}

    model = prepare_model_for_training(
        model, unfreeze_qformer=args.unfreeze_qformer, projection_file=args.init_projection, lora_r=args.lora_r,
        lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, lora_target_modules=args.lora_target_modules,
    )
    logger.info("Training %s", trainable_parameter_summary(model))

    prompts = []
    if args.prompt_template:
        instructions = read_prompts_file(args.prompts_file) if args.prompts_file else ALIGNMENT_PROMPTS
        prompts = expand_prompts(args.prompt_template, instructions)
    formatter = SampleFormatter(
        image_transform=TrainingImageTransform(
            size=image_size, mode=args.image_transform, scale=(args.crop_scale_min, args.crop_scale_max),
        ),
        prompts=prompts,
        end_symbol=args.end_symbol,
        clean_captions=args.clean_captions,
        max_caption_words=args.max_caption_words,
        prompt_template=args.prompt_template,
        instruction_format=args.instruction_format,
        followup_format=args.followup_format,
    )
    train_data = build_training_dataset(
        args.data_path, formatter, ratios=args.data_ratios, image_column=args.image_column,
        text_column=args.text_column, seed=training_args.seed, shuffle_buffer=args.shuffle_buffer,
        instruction_column=args.instruction_column, conversation_column=args.conversation_column,
    )
    if train_data.is_streaming:
        if training_args.max_steps <= 0:
            raise UserError("Streamed data (webdataset shards or mixed sources) has no length: give --max-steps.")
        # Each process reads its own part of the stream (batches of different lengths cannot be dispatched).
        training_args.accelerator_config.dispatch_batches = False

    trainer = MiniGPT4Trainer(
        model=model,
        args=training_args,
        train_dataset=train_data.dataset,
        data_collator=TrainingCollator(processor, max_txt_len=args.max_txt_len),
        processing_class=processor,
        callbacks=[SetEpochCallback(train_data), *(extra_callbacks or [])],
        min_lr=args.min_lr,
        warmup_lr=args.warmup_lr,
        lr_schedule=args.lr_schedule,
        save_frozen_weights=args.save_frozen_weights,
    )
    result = trainer.train(resume_from_checkpoint=checkpoint)
    logger.info(train_data.skipped.summary())

    if trainer.args.should_save:
        save_trained_model(
            trainer.model, processor, training_args.output_dir, merge_lora=args.merge_lora,
            metadata={"variant": args.variant, "stage": str(args.stage),
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


cli = console_entry_point(main, PROG)


if __name__ == "__main__":
    cli()
