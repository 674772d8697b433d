#!/usr/bin/env python
"""
Builds MiniGPT-4 stage-2 data (the `cc_sbu_align` layout) from a folder of images and a stage-1 model, as the paper
did: detailed descriptions, refinement by a chat LLM, rule-based filtering, an optional manual review, export.

    python scripts/build_stage2_data.py --images DIR --model STAGE1_DIR \\
        --refiner-url https://api.openai.com/v1 --refiner-model gpt-3.5-turbo \\
        --work-dir work/ --output-dir out/

Every step keeps a JSON-lines journal in --work-dir; running the same command again continues where it stopped.
The step logic lives in scripts/stage2_data.py.
"""

import argparse
import logging
import sys

from minigpt4_hf.stage2_data import DEFAULT_STEPS, STEPS, BuildConfig, DescribeSettings, RefinerSetupError, parse_steps, run


def steps_flag(text: str) -> tuple[str, ...]:
    try:
        return parse_steps(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    def flag(name: str, **kwargs):
        """Each flag also answers to its underscore spelling (`--work_dir`), as scripts/train.py's flags do."""
        names = [name] + (["--" + name[2:].replace("-", "_")] if "-" in name[2:] else [])
        return kwargs.pop("group", parser).add_argument(*names, **kwargs)

    flag("--work-dir", required=True, help="Folder for the journals (describe/refine/filter.jsonl) and review.tsv.")
    flag("--steps", type=steps_flag, default=DEFAULT_STEPS,
         help=f"Comma-separated subset of {','.join(STEPS)}, run in that order (default: all but review).")
    flag("--images", help="Folder of source images (the id of each is its file name without extension).")
    flag("--max-images", type=int, help="Use only the first N images (sorted by name).")
    flag("--output-dir", help="Where export writes cc_sbu_align/, hf_dataset/ and summary.json.")

    describe = parser.add_argument_group("describe (the stage-1 model)")
    defaults = DescribeSettings()
    flag("--model", group=describe, help="Stage-1 MiniGPT-4 folder (save_pretrained / scripts/train.py output).")
    flag("--device", group=describe, help="cuda, cuda:1, cpu, ... (default: cuda when available).")
    flag("--dtype", group=describe, default="auto", choices=["auto", "float32", "float16", "bfloat16"],
         help="Weights' dtype (auto: float16 on GPU for MiniGPT-4, bfloat16 for a local refiner, float32 on CPU).")
    flag("--batch-size", group=describe, type=int, default=defaults.batch_size, help="Images per generate call.")
    flag("--max-new-tokens", group=describe, type=int, default=defaults.max_new_tokens)
    flag("--min-answer-tokens", group=describe, type=int, default=defaults.min_answer_tokens,
         help="Answers shorter than this get the 'Continue' turn (the paper: 80).")
    flag("--greedy", group=describe, action="store_true", help="Greedy decoding instead of sampling.")
    flag("--temperature", group=describe, type=float, default=defaults.temperature)
    flag("--top-p", group=describe, type=float, default=defaults.top_p)
    flag("--num-beams", group=describe, type=int, default=defaults.num_beams)
    flag("--repetition-penalty", group=describe, type=float, default=defaults.repetition_penalty)
    flag("--seed", group=describe, type=int, default=defaults.seed)

    refine = parser.add_argument_group("refine (a chat LLM with the paper's fix prompt)")
    flag("--refiner-url", group=refine,
         help="OpenAI-compatible endpoint: a base URL (https://api.openai.com/v1) or the full /chat/completions URL.")
    flag("--refiner-model", group=refine, help="Model name sent to the endpoint (the paper used gpt-3.5-turbo).")
    flag("--refiner-local", group=refine, help="A local transformers causal LM folder or Hub id, instead of a URL.")
    flag("--api-key-env", group=refine, default="OPENAI_API_KEY",
         help="Environment variable holding the API key (sent as a bearer token, never written anywhere).")
    flag("--refiner-temperature", group=refine, type=float, default=0.7, help="0 = greedy (local refiner).")
    flag("--refiner-max-tokens", group=refine, type=int, default=1024, help="Longest reply, in tokens.")
    flag("--timeout", group=refine, type=float, default=120.0, help="Seconds per HTTP request.")
    flag("--max-retries", group=refine, type=int, default=5,
         help="Retries per item on 429, 5xx, connection errors and timeouts.")
    flag("--retry-backoff", group=refine, type=float, default=1.0,
         help="First retry delay in seconds; doubles on each retry.")
    flag("--max-backoff", group=refine, type=float, default=60.0, help="Longest retry delay in seconds.")
    flag("--concurrency", group=refine, type=int, default=4, help="HTTP requests in flight at once.")
    flag("--refiner-batch-size", group=refine, type=int, default=4, help="Paragraphs per local generate call.")

    rest = parser.add_argument_group("filter, review, export")
    flag("--min-characters", group=rest, type=int, default=50, help="Shorter texts are dropped (the paper: 50).")
    flag("--review-file", group=rest, help="Where --steps review writes (default WORK_DIR/review.tsv; .csv works).")
    flag("--review-decisions", group=rest, help="An edited review file to apply at export.")
    flag("--push-to-hub", group=rest, metavar="REPO", help="Also push the dataset to this Hub dataset repo.")
    flag("--private", group=rest, action="store_true", help="Create the Hub repo as private.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    describe = DescribeSettings(
        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, min_answer_tokens=args.min_answer_tokens,
        do_sample=not args.greedy, temperature=args.temperature, top_p=args.top_p, num_beams=args.num_beams,
        repetition_penalty=args.repetition_penalty, seed=args.seed,
    )
    config = BuildConfig(
        work_dir=args.work_dir, steps=args.steps, images=args.images, max_images=args.max_images,
        output_dir=args.output_dir, model=args.model, device=args.device, dtype=args.dtype, describe=describe,
        refiner_url=args.refiner_url, refiner_model=args.refiner_model, refiner_local=args.refiner_local,
        api_key_env=args.api_key_env, refiner_temperature=args.refiner_temperature,
        refiner_max_tokens=args.refiner_max_tokens, timeout=args.timeout, max_retries=args.max_retries,
        retry_backoff=args.retry_backoff, max_backoff=args.max_backoff, concurrency=args.concurrency,
        refiner_batch_size=args.refiner_batch_size, min_characters=args.min_characters,
        review_file=args.review_file, review_decisions=args.review_decisions, push_to_hub=args.push_to_hub,
        private=args.private,
    )
    try:
        run(config)
    except (ValueError, RefinerSetupError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("Interrupted. Finished items are saved in the work folder; run the same command to continue.",
              file=sys.stderr)
        return 130
    return 0



def cli() -> None:
    """Console entry point `minigpt4-build-stage2-data`."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
