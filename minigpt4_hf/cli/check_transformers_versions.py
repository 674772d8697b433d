#!/usr/bin/env python
"""
Checks a converted MiniGPT-4 folder as Hub remote code on several transformers releases, each in its own virtual
environment (torch + that transformers only; built once under --venv-dir, then reused), loaded from an empty directory
so that only the code in the folder runs. Greedy ids (single, batched left-padded, streamed, without cache, per-row
stop) must equal the reference release's and the training loss must be within 1e-6 of it; a release below the
supported floor must be refused with the one-line error.

    python scripts/check_transformers_versions.py                        # the default set (what CI runs)
    python scripts/check_transformers_versions.py --versions 5.0.0 5.24.0 --model converted/minigpt4-7b
    python scripts/check_transformers_versions.py --versions all         # every supported minor release

Prints a table (release | load | generate | ids equal | loss diff | status | seconds) and writes it, with every
release's report and log, under --output-dir. Exits 1 when a release fails, 2 on bad arguments.
"""

import argparse
import os
import sys
from pathlib import Path

from minigpt4_hf.random_models import EXAMPLE_IMAGE
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


def default_venv_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "minigpt4-hf" / "transformers-venvs"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="check_transformers_versions.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    def flag(name: str, **kwargs):
        """Each flag also answers to its underscore spelling (`--venv_dir`)."""
        names = [name] + (["--" + name[2:].replace("-", "_")] if "-" in name[2:] else [])
        return parser.add_argument(*names, **kwargs)

    flag("--versions", nargs="+", default=list(DEFAULT_VERSIONS), metavar="VERSION",
         help=f"transformers releases to check, or `all` (the floor and every supported minor: {SUPPORTED_RELEASES[0]} ... "
              f"{NEWEST_RELEASE}) (default: {' '.join(DEFAULT_VERSIONS)})")
    flag("--reference", default=NEWEST_RELEASE,
         help=f"release whose ids and loss the others must match; always checked (default: {NEWEST_RELEASE})")
    flag("--model", type=Path,
         help="converted MiniGPT-4 folder to check (default: the tiny random model, saved to OUTPUT_DIR/tiny-minigpt4)")
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
    versions = list(SUPPORTED_RELEASES) if args.versions == ["all"] else args.versions
    for release in versions + [args.reference]:
        if not is_release(release):
            parser.error(f"{release!r} is not a transformers release: give versions such as 5.10.4 (or `all`).")
    if below_floor(args.reference):
        parser.error(f"--reference {args.reference} is below the supported floor: give a supported release.")
    args.versions = list(dict.fromkeys(versions))
    if args.model is not None and not (args.model / "config.json").is_file():
        parser.error(f"--model {args.model}: no config.json there; give a folder written by the converter or "
                     "save_pretrained.")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    output_dir = args.output_dir.resolve()
    model_dir = args.model.resolve() if args.model is not None else None
    if model_dir is None:
        model_dir = build_tiny_model_folder(output_dir / "tiny-minigpt4")
        print(f"Saved the tiny random model to {model_dir}", file=sys.stderr)
    rows = check_releases(args.versions, args.reference, args.venv_dir.resolve(), output_dir, model_dir,
                          EXAMPLE_IMAGE, args.torch_requirement)
    print(write_results(rows, args.reference, output_dir))
    print(f"\nWrote {output_dir / 'results.md'} and {output_dir / 'results.json'}", file=sys.stderr)
    return 0 if all(row.passed for row in rows) else 1


def cli() -> None:
    """Console entry point `minigpt4-check-transformers`."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
