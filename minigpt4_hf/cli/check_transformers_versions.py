#!/usr/bin/env python
"""
Checks converted MiniGPT-4 folders (by default a tiny random model of each variant) as Hub remote code on several
transformers releases, each in its own virtual environment (torch + that transformers only; built once under
--venv-dir, then reused), loaded from an empty directory so that only the code in the folder runs. Greedy ids (single,
batched left-padded and decoded, streamed, without cache, per-row stop) must equal the reference release's and the
training loss must be within 1e-6 of it; a release below the supported floor must be refused with the one-line error.

    python scripts/check_transformers_versions.py                        # the default set (what CI runs)
    python scripts/check_transformers_versions.py --versions 5.0.0 5.24.0 --model converted/minigpt4-7b
    python scripts/check_transformers_versions.py --versions all         # every supported minor release

Prints a table (release | model | load | generate | ids equal | loss diff | status | seconds) and writes it, with every
report and log, under --output-dir. Exits 1 when a release fails, 2 on bad arguments.
"""

import argparse
import os
import sys
from pathlib import Path

from minigpt4_hf.cli.options import CommandLineParser, console_entry_point
from minigpt4_hf.random_models import EXAMPLE_IMAGE
from minigpt4_hf.recipe import TRAINING_PRESETS
from minigpt4_hf.transformers_versions import (
    DEFAULT_VERSIONS,
    NEWEST_RELEASE,
    SUPPORTED_RELEASES,
    below_floor,
    build_tiny_model_folder,
    check_releases,
    default_torch_requirement,
    is_release,
    write_results,
)


PROG = "minigpt4-check-transformers"
VARIANTS = tuple(TRAINING_PRESETS)  # every released model has a recipe: configuration_minigpt4.VARIANTS


def default_venv_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "minigpt4-hf" / "transformers-venvs"


def build_parser() -> CommandLineParser:
    parser = CommandLineParser(PROG, description=__doc__)
    flag = parser.add_argument
    flag("--versions", nargs="+", default=list(DEFAULT_VERSIONS), metavar="VERSION",
         help=f"transformers releases to check, or `all` (the floor and every supported minor: "
              f"{SUPPORTED_RELEASES[0]} ... {NEWEST_RELEASE}) (default: {' '.join(DEFAULT_VERSIONS)})")
    flag("--reference", default=NEWEST_RELEASE,
         help=f"release whose ids and loss the others must match; always checked (default: {NEWEST_RELEASE})")
    flag("--model", type=Path,
         help="converted MiniGPT-4 folder to check (default: tiny random models of --variants, saved to "
              "OUTPUT_DIR/tiny-VARIANT)")
    flag("--variants", nargs="+", choices=VARIANTS, metavar="VARIANT",
         help=f"variants whose tiny random model is checked, without --model: {', '.join(VARIANTS)} "
              f"(default: {' '.join(VARIANTS)})")
    flag("--output-dir", type=Path, default=Path("outputs/transformers-versions"),
         help="where results.md, results.json, reports/ and logs/ go (default: outputs/transformers-versions)")
    flag("--venv-dir", type=Path, default=default_venv_dir(),
         help=f"where the per-release virtual environments are built and reused (default: {default_venv_dir()})")
    flag("--torch", dest="torch_requirement", default=default_torch_requirement(),
         help=f"torch requirement installed in each environment (default: {default_torch_requirement()}, this "
              "interpreter's torch)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    versions = [release for item in args.versions for release in (SUPPORTED_RELEASES if item == "all" else [item])]
    for release in versions + [args.reference]:
        if not is_release(release):
            parser.error(f"{release!r} is not a transformers release: give versions such as 5.10.4 (or `all`).")
    if below_floor(args.reference):
        parser.error(f"--reference {args.reference} is below the supported floor: give a supported release.")
    args.versions = list(dict.fromkeys(versions))
    if args.model is not None and not (args.model / "config.json").is_file():
        parser.error(f"--model {args.model}: no config.json there; give a folder written by the converter or "
                     "save_pretrained.")
    if args.model is not None and args.variants is not None:
        parser.error("--variants picks tiny random models; with --model the folder itself is checked: give one.")
    args.variants = list(dict.fromkeys(args.variants or VARIANTS))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    output_dir = args.output_dir.resolve()
    if args.model is not None:
        models = {args.model.resolve().name: args.model.resolve()}
    else:
        models = {
            variant: build_tiny_model_folder(output_dir / f"tiny-{variant}", variant) for variant in args.variants
        }
        print(f"Saved the tiny random models to {output_dir}/tiny-{{{','.join(models)}}}", file=sys.stderr)
    rows = check_releases(args.versions, args.reference, args.venv_dir.resolve(), output_dir, models, EXAMPLE_IMAGE,
                          args.torch_requirement)
    print(write_results(rows, args.reference, output_dir))
    print(f"\nWrote {output_dir / 'results.md'} and {output_dir / 'results.json'}", file=sys.stderr)
    return 0 if all(row.passed for row in rows) else 1


cli = console_entry_point(main, PROG)


if __name__ == "__main__":
    cli()
