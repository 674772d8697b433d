#!/usr/bin/env python
"""
Caption (or ask one question about) many images with MiniGPT-4, in left-padded batches.

    minigpt4-caption --model PATH_OR_ID --images photos/ --output captions.jsonl
    minigpt4-caption --model PATH_OR_ID --images 'photos/**/*.jpg' --output captions.jsonl \\
        --prompt "What is unusual about this image?" --batch-size 16
    minigpt4-caption --model PATH_OR_ID --images photos/ --output answers.jsonl --prompt-file question.txt
    minigpt4-caption --model MINIGPT_V2 --images photos/ --output boxes.jsonl --task grounding \\
        --prompt "describe this image in detail"

Writes one JSON line per image: {"image", "prompt", "answer", "generation"}, or "error" instead of "answer" when the
image cannot be read. With `--task` the line also holds "task"; a MiniGPT-v2 model's lines hold "boxes", the phrases
and pixel boxes of the answer (`[{"phrase": str or null, "box": [x1, y1, x2, y2]}]`), and "box_problems" when some box
text cannot be read. A prompt that cannot fit the model's context with one image and --max-new-tokens is refused
before any image. The output is a journal: each batch is appended whole and synced to disk, so Ctrl-C (or a
crash) loses nothing already written, and running the same command again skips the images that the output already
has (a last line cut short by a kill is removed first).

Generation is greedy by default (reproducible, independent of the batch size and order); --sample samples with the
original chat's settings (top-p 0.9, temperature 1.0).
"""

import argparse
import glob
import os
import sys

from minigpt4_hf.cli.options import CommandLineParser, UserError, add_inference_arguments, load_model_from_args
from minigpt4_hf.cli.options import add_task_argument, check_task_fits_model, console_entry_point, positive_int
from minigpt4_hf.inputs import check_model_path
from minigpt4_hf.journal import Journal


PROG = "minigpt4-caption"
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# The first of the original stage-2 instructions.
DEFAULT_PROMPT = "Describe this image in detail."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = CommandLineParser(PROG, description=__doc__)
    add_inference_arguments(parser, sample=False)
    parser.add_argument(
        "--images", required=True, help="A folder (its image files), one image file, or a quoted glob ('a/**/*.png')."
    )
    parser.add_argument("--output", required=True, help="The JSON Lines file to append to (created if missing).")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default=DEFAULT_PROMPT, help="The question for every image (default: %(default)r).")
    prompt.add_argument("--prompt-file",
                        help="Read the question for every image from this UTF-8 file, for long or multi-line prompts "
                        "(default: none).")
    add_task_argument(parser)
    parser.add_argument("--batch-size", type=positive_int, default=8,
                        help="Images per generate() call (default: %(default)s).")
    parser.add_argument(
        "--retry-errors", action="store_true",
        help="Try again the images whose last line in --output is an error (default: off).",
    )
    args = parser.parse_args(argv)
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


def image_key(record: dict) -> str:
    """What identifies a line's image across runs (the same file however the path was written)."""
    return os.path.realpath(record["image"])


def open_output(path: str) -> Journal:
    """The output as a journal of caption lines (a torn last line is removed; any other broken line is refused)."""
    try:
        return Journal(path, key=image_key, what="caption line")
    except ValueError as error:
        raise UserError(f"--output {error}") from None


def finished_images(journal: Journal, retry_errors: bool = False) -> set[str]:
    """The images the output has a line for; with `retry_errors`, those whose last line is an error are left out."""
    return {key for key, record in journal.records.items() if not (retry_errors and "answer" not in record)}


def caption_batch(model, processor, paths: list[str], prompt: str, generate_kwargs: dict, generation: dict,
                  task: str | None = None):
    """
    One record per path, in order: the answer (and, from MiniGPT-v2, its boxes in pixels), or the reason the image
    could not be read.
    """
    from minigpt4_hf.inference import answer_batch, answers_have_boxes, grounded_boxes
    from processing_minigpt4 import load_rgb_image

    records, images, readable = [], [], []
    for path in paths:
        record = {"image": path, "prompt": prompt, **({"task": task} if task else {})}
        try:
            images.append(load_rgb_image(path))
            readable.append(record)
        except ValueError as error:
            record["error"] = str(error)
        records.append(record)
    if images:
        answers = answer_batch(model, processor, images, prompt, generate_kwargs, task=task)
        for record, image, answer in zip(readable, images, answers):
            record["answer"] = answer
            if answers_have_boxes(model):
                record["boxes"], problems = grounded_boxes(processor, answer, image.size)
                if problems:
                    record["box_problems"] = problems
    for record in records:
        record["generation"] = generation
    return records


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_model_path(args.model)
    check_task_fits_model(args)
    paths = list_images(args.images)
    journal = open_output(args.output)
    finished = finished_images(journal, retry_errors=args.retry_errors)
    pending = [path for path in paths if image_key({"image": path}) not in finished]
    print(
        f"{len(paths)} image(s); {len(paths) - len(pending)} already in {args.output}; {len(pending)} to do.",
        file=sys.stderr,
    )
    if not pending:
        return 0

    import torch
    from tqdm.auto import tqdm

    model, processor, generate_kwargs = load_model_from_args(args)
    from minigpt4_hf.inference import check_question_fits

    try:
        check_question_fits(model, processor, args.prompt, args.max_new_tokens, task=args.task)
    except ValueError as error:
        raise UserError(f"{'--prompt-file ' + args.prompt_file if args.prompt_file else '--prompt'}: {error}") from None
    generation = {**generate_kwargs, "seed": args.seed}

    written = unreadable = 0
    try:
        with journal, tqdm(
            total=len(paths), initial=len(paths) - len(pending), unit="image", desc="captioning"
        ) as progress:
            for start in range(0, len(pending), args.batch_size):
                batch = pending[start : start + args.batch_size]
                try:
                    records = caption_batch(model, processor, batch, args.prompt, generate_kwargs, generation,
                                            task=args.task)
                except torch.OutOfMemoryError:
                    raise UserError(
                        f"Out of GPU memory with --batch-size {args.batch_size}: lower it and run the same command "
                        f"again ({written} finished image(s) are kept in {args.output})."
                    ) from None
                journal.extend(records)
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


cli = console_entry_point(main, PROG)


if __name__ == "__main__":
    cli()
