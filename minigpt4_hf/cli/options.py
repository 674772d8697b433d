"""
The command-line convention every `minigpt4-*` tool follows (written down in docs/command-line.md):

- flags are spelled with dashes; every `--flag-name` is also accepted as `--flag_name`;
- the same name for the same thing in every tool (`--model`, `--dtype`, `--device`, `--image` / `--images`,
  `--output-dir`, `--max-new-tokens`, `--sample` / `--no-sample`, ...), with the same choices and help;
- bad input ends the tool with one line `PROG: error: WHAT AND WHAT TO DO` on stderr and exit status 2, before any
  model is loaded and before anything is written;
- exit status 0 = done, 1 = failed for a reason that is not the input (a network upload, ...), 2 = bad input,
  130 = interrupted (Ctrl-C).

Standard library only (plus the light `minigpt4_hf.generation` and `minigpt4_hf.inputs`): `--help` and the input
checks answer before torch or transformers are imported.
"""

import argparse
import importlib.util
import sys
from collections.abc import Callable, Sequence

from minigpt4_hf.generation import CHAT_GENERATION_DEFAULTS, generation_kwargs
from minigpt4_hf.inputs import DTYPE_CHOICES, InputError


EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
DOCS_PAGE = "docs/command-line.md"
EPILOG = (
    "Every --flag-name is also accepted as --flag_name. Exit status: 0 done, 1 failed, 2 bad input, 130 interrupted. "
    f"The conventions: {DOCS_PAGE}."
)


# A problem with the user's input or machine: the tool prints `PROG: error: MESSAGE` (no traceback) and exits 2. The
# library raises it as `InputError` (a ValueError); the tools raise it under this name.
UserError = InputError


def run_main(main: Callable[[], object], prog: str) -> None:
    """
    Runs a tool's `main` and exits with its status (an int; anything else, e.g. a result dict, counts as done),
    turning `UserError` into `prog: error: MESSAGE` on stderr and exit status 2.
    """
    try:
        status = main()
    except UserError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(status if isinstance(status, int) else EXIT_OK)


def console_entry_point(main: Callable[[], object], prog: str) -> Callable[[], None]:
    """The `cli()` of a tool: `run_main(main, prog)` (what the console entry point and scripts/*.py call)."""

    def cli() -> None:
        run_main(main, prog)

    cli.__doc__ = f"Console entry point `{prog}`."
    return cli


def dashes_for_underscores(argv: Sequence[str]) -> list[str]:
    """`--flag_name` -> `--flag-name` (and `--flag_name=value`) up to a bare `--`; values are left as they are."""
    converted = []
    for position, token in enumerate(argv):
        if token == "--":
            return converted + list(argv[position:])
        if token.startswith("--"):
            name, equals, value = token.partition("=")
            token = name.replace("_", "-") + equals + value
        converted.append(token)
    return converted


class CommandLineParser(argparse.ArgumentParser):
    """
    `argparse.ArgumentParser` with the project's convention: `prog` is the console entry point's name, underscore
    spellings of the flags are accepted, and a usage error is one line (`PROG: error: ...`) and exit status 2.
    """

    def __init__(self, prog: str, description: str | None = None, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)  # the description holds examples
        kwargs.setdefault("epilog", EPILOG)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(prog=prog, description=description, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(dashes_for_underscores(args), namespace)

    def error(self, message: str):
        """One line on stderr and exit status 2 (argparse would print the whole usage first)."""
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---------------------------------------------------------------------------------------------------------------------
# Value types.


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {value}")
    return value


def probability(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


# ---------------------------------------------------------------------------------------------------------------------
# Flags shared by several tools.


def add_model_arguments(container, required: bool = True, dtype_help: str | None = None) -> None:
    """
    `--model`, `--dtype`, `--device`, `--device-map`, `--load-in-8bit` / `--load-in-4bit`, as the one model loader
    (`minigpt4_hf.inference.load_model_and_processor`) takes them. `container` is a parser or an argument group.
    """
    container.add_argument(
        "--model", required=required, metavar="FOLDER_OR_HUB_ID",
        help="A saved MiniGPT-4: a folder written by save_pretrained (minigpt4-convert, minigpt4-train, "
        "minigpt4-quickstart) or a Hub repo id." + ("" if required else " (default: none)"),
    )
    container.add_argument(
        "--dtype", choices=DTYPE_CHOICES, default="auto",
        help=dtype_help or "Weights' dtype. auto: the checkpoint's own dtype on a GPU, float32 on the CPU, float16 "
        "with --load-in-8bit / --load-in-4bit (default: %(default)s).",
    )
    container.add_argument(
        "--device", default=None,
        help="cpu, cuda, cuda:1, mps ... (default: cuda when there is a GPU, else cpu).",
    )
    container.add_argument(
        "--device-map", default=None,
        help="Spread the model over devices with accelerate, e.g. 'auto' for several GPUs or GPU + CPU (default: "
        "none: the whole model on --device).",
    )
    quantization = container.add_mutually_exclusive_group()
    quantization.add_argument(
        "--load-in-8bit", action="store_true",
        help="LLM.int8 language model (bitsandbytes, CUDA only: the quantization extra) (default: off).",
    )
    quantization.add_argument(
        "--load-in-4bit", action="store_true",
        help="NF4 language model (bitsandbytes, CUDA only) (default: off).",
    )


def add_generation_arguments(
    container, *, sample: bool, max_new_tokens: int = CHAT_GENERATION_DEFAULTS["max_new_tokens"],
    seed: int | None = None,
) -> None:
    """
    The generation flags, with the original chat's defaults. `--sample` / `--no-sample` is the one sampling switch of
    every tool; `sample` is this tool's default (the chat samples as the original did; batch captioning is greedy).
    """
    defaults = CHAT_GENERATION_DEFAULTS
    container.add_argument("--max-new-tokens", type=positive_int, default=max_new_tokens,
                           help="Most tokens generated per answer (default: %(default)s).")
    container.add_argument(
        "--sample", action=argparse.BooleanOptionalAction, default=sample,
        help="Sample with --temperature and --top-p; --no-sample decodes greedily (or with beam search) "
        f"(default: {'--sample' if sample else '--no-sample'}).",
    )
    container.add_argument("--num-beams", type=positive_int, default=defaults["num_beams"],
                           help="Beam search with N beams; 1 = none (default: %(default)s).")
    container.add_argument("--temperature", type=positive_float, default=defaults["temperature"],
                           help="Sampling temperature, with --sample (default: %(default)s).")
    container.add_argument("--top-p", type=probability, default=defaults["top_p"],
                           help="Nucleus sampling mass, with --sample (default: %(default)s).")
    container.add_argument("--repetition-penalty", type=positive_float, default=defaults["repetition_penalty"],
                           help="1.0 = none (default: %(default)s).")
    container.add_argument("--seed", type=int, default=seed,
                           help="Seed of the random generators, for reproducible sampling (default: "
                           f"{'none' if seed is None else seed}).")


def generation_kwargs_from_args(args: argparse.Namespace) -> dict:
    """`generate()` keyword arguments from the generation flags (temperature and top-p only with `--sample`)."""
    return generation_kwargs({
        "max_new_tokens": args.max_new_tokens,
        "num_beams": args.num_beams,
        "do_sample": args.sample,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "repetition_penalty": args.repetition_penalty,
    })


def check_extra_installed(extra: str, *packages: str) -> None:
    """Refuses to go on when a package of an optional extra is missing, saying which extra to install."""
    missing = [package for package in packages if importlib.util.find_spec(package) is None]
    if missing:
        raise UserError(f"this needs {', '.join(missing)}: install the {extra} extra (pip install '.[{extra}]' in the "
                        f"checkout, or pip install {' '.join(missing)}).")


def seed_if_asked(seed: int | None) -> None:
    """Seeds Python, NumPy and torch (transformers' `set_seed`) when `--seed` was given."""
    if seed is not None:
        from transformers import set_seed

        set_seed(seed)


def add_inference_arguments(parser: argparse.ArgumentParser, *, sample: bool) -> None:
    """The model and generation flags of the tools that answer about images (chat, caption, demo)."""
    add_model_arguments(parser)
    add_generation_arguments(parser, sample=sample)


def model_loading_kwargs(args: argparse.Namespace) -> dict:
    """The keyword arguments of `minigpt4_hf.inference.load_model_and_processor` from the model flags."""
    return {"device": args.device, "dtype": args.dtype, "device_map": args.device_map,
            "load_in_8bit": args.load_in_8bit, "load_in_4bit": args.load_in_4bit}


def load_model_from_args(args: argparse.Namespace):
    """
    The model of `--model` loaded with the model flags (through the one loader), the random generators seeded when
    `--seed` is given, and the `generate()` keyword arguments of the generation flags: `(model, processor, kwargs)`.
    """
    from minigpt4_hf.inference import load_model_and_processor

    model, processor = load_model_and_processor(args.model, **model_loading_kwargs(args))
    seed_if_asked(args.seed)
    return model, processor, generation_kwargs_from_args(args)


def add_task_argument(parser: argparse.ArgumentParser) -> None:
    """`--task`: the MiniGPT-v2 task identifier written at the start of every question."""
    parser.add_argument(
        "--task", default=None, metavar="TASK",
        help="MiniGPT-v2 only: start every question with this task identifier (vqa, caption, grounding, refer, "
        "detection, identify), as the original was trained; answers with boxes also get them in pixels (default: "
        "no identifier).",
    )


def check_task_fits_model(args: argparse.Namespace) -> None:
    """
    Refuses an unknown `--task`, or `--task` for a model other than MiniGPT-v2, reading only the model's config
    (before the weights load).
    """
    if args.task is None:
        return
    from processing_minigpt4 import TASK_IDENTIFIERS

    if args.task not in TASK_IDENTIFIERS:
        raise UserError(f"--task {args.task}: not a MiniGPT-v2 task; choose one of {', '.join(TASK_IDENTIFIERS)}.")
    from configuration_minigpt4 import MiniGPT4Config

    try:
        variant = MiniGPT4Config.from_pretrained(args.model).variant
    except (OSError, ValueError):
        return  # the loader reports an unreadable model
    if variant != "v2":
        raise UserError(
            f"--task {args.task}: task identifiers are MiniGPT-v2 prompts, and {args.model} is a {variant} model; "
            "drop --task."
        )
