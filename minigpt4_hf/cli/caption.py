#!/usr/bin/env python
"""
Caption (or ask one question about) many images with MiniGPT-4, in left-padded batches.

    python scripts/caption.py --model PATH_OR_ID --images photos/ --output captions.jsonl
    python scripts/caption.py --model PATH_OR_ID --images 'photos/**/*.jpg' --output captions.jsonl \
        --prompt "What is unusual about this image?" --batch-size 16
    python scripts/caption.py --model PATH_OR_ID --images photos/ --output answers.jsonl --prompt-file question.txt

Writes one JSON line per image: {"image", "prompt", "answer", "generation"}, or "error" instead of "answer" when the
image cannot be read. Each batch is appended whole and synced to disk, so Ctrl-C (or a crash) loses nothing already
written, and running the same command again skips the images that the output already has.

A prompt that cannot fit the model's context with one image and --max-new-tokens is refused before any image.
Generation is greedy by default (reproducible, independent of the batch size and order); --sample samples with the
original chat's settings (top-p 0.9, temperature 1.0).
"""

import argparse
import contextlib
import glob
import json
import os
import signal
import sys

import torch
from tqdm.auto import tqdm

from minigpt4_hf.inference import (
    UserError,
    add_generation_arguments,
    add_model_arguments,
    answer_batch,
    check_question_fits,
    generation_kwargs_from_args,
    load_model_and_processor,
    run_main,
    seed_if_asked,
)
from processing_minigpt4 import load_rgb_image


IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# The first of the original stage-2 instructions.
DEFAULT_PROMPT = "Describe this image in detail."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="caption.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--images", required=True, help="A folder (its image files), one image file, or a quoted glob ('a/**/*.png')."
    )
    parser.add_argument("--output", required=True, help="The JSON Lines file to append to (created if missing).")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"The question for every image ({DEFAULT_PROMPT!r}).")
    prompt.add_argument(
        "--prompt-file", help="Read the question for every image from this UTF-8 file (long or multi-line prompts)."
    )
    parser.add_argument("--batch-size", type=int, default=8, help="Images per generate() call (default 8).")
    parser.add_argument(
        "--retry-errors", action="store_true", help="Try again the images whose only line in --output is an error."
    )
    add_generation_arguments(parser, sample_by_default=False)
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding="utf-8") as file:
                args.prompt = file.read().strip()
        except (OSError, UnicodeDecodeError) as error:
            parser.error(f"--prompt-file {args.prompt_file}: cannot read it ({error})")
        if not args.prompt:
            parser.error(f"--prompt-file {args.prompt_file} is empty")
    if not args.prompt.strip():
        parser.error("--prompt is empty")
    return args


def list_images(spec: str) -> list[str]:
    """The images that `spec` names: a folder's image files (sorted), a glob's matches (sorted), or one file."""
    if os.path.isdir(spec):
        names = sorted(os.listdir(spec))
        paths = [os.path.join(spec, name) for name in names if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS]
        paths = [path for path in paths if os.path.isfile(path)]
        where = f"folder {spec} (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})"
    elif glob.has_magic(spec):
        paths = sorted(path for path in glob.glob(spec, recursive=True) if os.path.isfile(path))
        where = f"glob {spec!r}"
    elif os.path.isfile(spec):
        return [spec]
    else:
        raise UserError(f"--images {spec}: no such folder or file. Pass a folder, a file or a quoted glob.")
    if not paths:
        raise UserError(f"No image files in the {where}.")
    return paths


def image_key(path: str) -> str:
    """What identifies an image across runs (the same file however the path was written)."""
    return os.path.realpath(path)


def read_finished(output: str, retry_errors: bool = False) -> set[str]:
    """
    The images that `output` already has a line for (keys from `image_key`); with `retry_errors`, error-only images
    are left out. An incomplete last line (a run killed while writing) is cut off; any other broken line is an error.
    """
    if not os.path.exists(output):
        return set()
    with open(output, "rb") as file:
        data = file.read()
    complete_end = data.rfind(b"\n") + 1
    if complete_end < len(data):
        with open(output, "r+b") as file:
            file.truncate(complete_end)
            file.flush()
            os.fsync(file.fileno())
        print(f"Removed an incomplete last line from {output} (left by an interrupted run).", file=sys.stderr)
    answered, errored = set(), set()
    for number, line in enumerate(data[:complete_end].decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            key = image_key(record["image"])
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise UserError(
                f"{output} line {number} is not a caption line ({type(error).__name__}: {error}). Use another "
                "--output, or fix or delete that line."
            ) from None
        (errored if "error" in record and "answer" not in record else answered).add(key)
    return answered if retry_errors else answered | errored


@contextlib.contextmanager
def sigint_deferred():
    """Holds Ctrl-C back until the block is done (so that a batch's lines are written whole), then raises it."""
    received = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    except ValueError:  # not the main thread: signals cannot be caught here anyway
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            raise KeyboardInterrupt


def append_records(file, records: list[dict]) -> None:
    """Appends one JSON line per record in a single write, then flushes and syncs it to disk."""
    data = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    with sigint_deferred():
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def caption_batch(model, processor, paths: list[str], prompt: str, generation_kwargs: dict, generation: dict):
    """One record per path, in order: the answer, or the reason the image could not be read."""
    records, images, readable = [], [], []
    for path in paths:
        record = {"image": path, "prompt": prompt}
        try:
            images.append(load_rgb_image(path))
            readable.append(record)
        except ValueError as error:
            record["error"] = str(error)
        records.append(record)
    if images:
        for record, answer in zip(readable, answer_batch(model, processor, images, prompt, generation_kwargs)):
            record["answer"] = answer
    for record in records:
        record["generation"] = generation
    return records


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    paths = list_images(args.images)
    finished = read_finished(args.output, retry_errors=args.retry_errors)
    pending = [path for path in paths if image_key(path) not in finished]
    print(
        f"{len(paths)} image(s); {len(paths) - len(pending)} already in {args.output}; {len(pending)} to do.",
        file=sys.stderr,
    )
    if not pending:
        return 0

    model, processor = load_model_and_processor(args)
    try:
        check_question_fits(model, processor, args.prompt, args.max_new_tokens)
    except ValueError as error:
        raise UserError(f"{'--prompt-file ' + args.prompt_file if args.prompt_file else '--prompt'}: {error}") from None
    seed_if_asked(args)
    generation_kwargs = generation_kwargs_from_args(args)
    generation = {**generation_kwargs, "seed": args.seed}
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)

    written = unreadable = 0
    try:
        with open(args.output, "a", encoding="utf-8") as file, tqdm(
            total=len(paths), initial=len(paths) - len(pending), unit="image", desc="captioning"
        ) as progress:
            for start in range(0, len(pending), args.batch_size):
                batch = pending[start : start + args.batch_size]
                try:
                    records = caption_batch(model, processor, batch, args.prompt, generation_kwargs, generation)
                except torch.OutOfMemoryError:
                    raise UserError(
                        f"Out of GPU memory with --batch-size {args.batch_size}: lower it and run the same command "
                        f"again ({written} finished image(s) are kept in {args.output})."
                    ) from None
                append_records(file, records)
                written += len(records)
                unreadable += sum("error" in record for record in records)
                progress.update(len(records))
    except KeyboardInterrupt:
        print(
            f"\nInterrupted: {written} new line(s) are safe in {args.output}; run the same command to go on.",
            file=sys.stderr,
        )
        return 130
    note = f" ({unreadable} unreadable image(s): see their 'error')" if unreadable else ""
    print(f"Wrote {written} line(s) to {args.output}{note}.", file=sys.stderr)
    return 0



def cli() -> None:
    """Console entry point `minigpt4-caption`."""
    run_main(main, "caption.py")


if __name__ == "__main__":
    cli()
