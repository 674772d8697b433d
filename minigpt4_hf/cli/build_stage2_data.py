#!/usr/bin/env python
"""
Builds MiniGPT-4 stage-2 data (the `cc_sbu_align` layout) from a folder of images and a stage-1 model, as the paper
did: detailed descriptions, refinement by a chat LLM, rule-based filtering, an optional manual review, export.

    minigpt4-build-stage2-data --images DIR --model STAGE1_DIR \\
        --refiner-url https://api.openai.com/v1 --refiner-model gpt-3.5-turbo \\
        --work-dir work/ --output-dir out/

Every step keeps a JSON-lines journal in --work-dir; running the same command again continues where it stopped.
The step logic lives in minigpt4_hf/stage2_data.py.
"""

import argparse
import logging
import sys

from minigpt4_hf.cli.options import (
    CommandLineParser,
    UserError,
    add_generation_arguments,
    add_model_arguments,
    check_extra_installed,
    console_entry_point,
    positive_int,
)
from minigpt4_hf.stage2_data import (
    DEFAULT_STEPS,
    STEPS,
    BuildConfig,
    DescribeSettings,
    RefinerSetupError,
    parse_steps,
    run,
)


PROG = "minigpt4-build-stage2-data"


def steps_flag(text: str) -> tuple[str, ...]:
    try:
        return parse_steps(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(PROG, description=__doc__)
    parser.add_argument("--work-dir", required=True,
                        help="Folder for the journals (describe/refine/filter.jsonl) and review.tsv.")
    parser.add_argument("--steps", type=steps_flag, default=DEFAULT_STEPS,
                        help=f"Comma-separated subset of {','.join(STEPS)}, run in that order (default: all but "
                        "review).")
    parser.add_argument("--images", help="Folder of source images; the id of each is its file name without extension "
                        "(default: none).")
    parser.add_argument("--max-images", type=positive_int,
                        help="Use only the first N images, sorted by name (default: all).")
    parser.add_argument("--output-dir", help="Where export writes cc_sbu_align/, hf_dataset/ and summary.json "
                        "(default: none).")

    describe = parser.add_argument_group("describe (the stage-1 model)")
    defaults = DescribeSettings()
    add_model_arguments(
        describe, required=False,
        dtype_help="Weights' dtype, of the stage-1 model and a --refiner-local model. auto: the checkpoint's own dtype "
        "on a GPU, float32 on the CPU, float16 with --load-in-8bit / --load-in-4bit (default: %(default)s).",
    )
    describe.add_argument("--batch-size", type=positive_int, default=defaults.batch_size,
                          help="Images per generate call (default: %(default)s).")
    describe.add_argument("--min-answer-tokens", type=int, default=defaults.min_answer_tokens,
                          help="Answers shorter than this get the 'Continue' turn, as the paper did (default: "
                          "%(default)s).")
    add_generation_arguments(describe, sample=defaults.do_sample, max_new_tokens=defaults.max_new_tokens,
                             seed=defaults.seed)

    refine = parser.add_argument_group("refine (a chat LLM with the paper's fix prompt)")
    refine.add_argument("--refiner-url", help="OpenAI-compatible endpoint: a base URL (https://api.openai.com/v1) or "
                        "the full /chat/completions URL (default: none).")
    refine.add_argument("--refiner-model", help="Model name sent to the endpoint; the paper used gpt-3.5-turbo "
                        "(default: none).")
    refine.add_argument("--refiner-local", help="A local transformers causal LM folder or Hub id, instead of a URL "
                        "(default: none).")
    refine.add_argument("--api-key-env", default="OPENAI_API_KEY",
                        help="Environment variable holding the API key, sent as a bearer token and never written "
                        "anywhere (default: %(default)s).")
    refine.add_argument("--refiner-temperature", type=float, default=0.7,
                        help="0 = greedy, with a local refiner (default: %(default)s).")
    refine.add_argument("--refiner-max-tokens", type=positive_int, default=1024,
                        help="Longest reply, in tokens (default: %(default)s).")
    refine.add_argument("--timeout", type=float, default=120.0, help="Seconds per HTTP request (default: %(default)s).")
    refine.add_argument("--max-retries", type=int, default=5,
                        help="Retries per item on 429, 5xx, connection errors and timeouts (default: %(default)s).")
    refine.add_argument("--retry-backoff", type=float, default=1.0,
                        help="First retry delay in seconds; doubles on each retry (default: %(default)s).")
    refine.add_argument("--max-backoff", type=float, default=60.0,
                        help="Longest retry delay in seconds (default: %(default)s).")
    refine.add_argument("--concurrency", type=positive_int, default=4,
                        help="HTTP requests in flight at once (default: %(default)s).")
    refine.add_argument("--refiner-batch-size", type=positive_int, default=4,
                        help="Paragraphs per local generate call (default: %(default)s).")

    rest = parser.add_argument_group("filter, review, export")
    rest.add_argument("--min-characters", type=int, default=50,
                      help="Shorter texts are dropped, as the paper did (default: %(default)s).")
    rest.add_argument("--review-file", help="Where --steps review writes; .csv works too (default: "
                      "WORK_DIR/review.tsv).")
    rest.add_argument("--review-decisions", help="An edited review file to apply at export (default: none).")
    rest.add_argument("--push-to-hub", metavar="REPO", help="Also push the dataset to this Hub dataset repo "
                      "(default: none).")
    rest.add_argument("--private", action="store_true", help="Create the Hub repo as private (default: off).")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    describe = DescribeSettings(
        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, min_answer_tokens=args.min_answer_tokens,
        do_sample=args.sample, temperature=args.temperature, top_p=args.top_p, num_beams=args.num_beams,
        repetition_penalty=args.repetition_penalty, seed=args.seed,
    )
    config = BuildConfig(
        work_dir=args.work_dir, steps=args.steps, images=args.images, max_images=args.max_images,
        output_dir=args.output_dir, model=args.model, device=args.device, dtype=args.dtype,
        device_map=args.device_map, load_in_8bit=args.load_in_8bit, load_in_4bit=args.load_in_4bit,
        describe=describe, refiner_url=args.refiner_url, refiner_model=args.refiner_model,
        refiner_local=args.refiner_local, api_key_env=args.api_key_env, refiner_temperature=args.refiner_temperature,
        refiner_max_tokens=args.refiner_max_tokens, timeout=args.timeout, max_retries=args.max_retries,
        retry_backoff=args.retry_backoff, max_backoff=args.max_backoff, concurrency=args.concurrency,
        refiner_batch_size=args.refiner_batch_size, min_characters=args.min_characters,
        review_file=args.review_file, review_decisions=args.review_decisions, push_to_hub=args.push_to_hub,
        private=args.private,
    )
    if "export" in config.steps:
        check_extra_installed("data", "datasets")
    try:
        run(config)
    except (ValueError, RefinerSetupError) as error:
        raise UserError(str(error)) from None
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted. Finished items are saved in the work folder; run the same command to continue.",
              file=sys.stderr)
        return 130
    return 0


cli = console_entry_point(main, PROG)


if __name__ == "__main__":
    cli()
