#!/usr/bin/env python
"""
Speed and memory of MiniGPT-4 on random weights of a named size, against the plain way of running it, with pass/fail
for the targets of issue 7 (see the README's "Performance" section and scripts/benchmarking.py for what each case measures).

    python scripts/benchmark.py --size small --json benchmark-small.json          # + benchmark-small.png
    python scripts/benchmark.py --size tiny --repeats 1 --json /tmp/tiny.json     # a quick check
    python scripts/benchmark.py --size vision-full --repeats 3 --json full.json    # real ViT-g + Q-Former shapes

Prints a Markdown table (median [25th-75th percentile] over interleaved repeats, peak memory, ratios) and the targets;
`--json` writes every number plus `"targets": {name: {"value", "goal", "pass"}}`, and a PNG of tokens/s against batch
size next to it (or at `--plot`). The exit status is 0 even when a target fails: read the table or the JSON.
"""

import argparse
import sys
from pathlib import Path

from minigpt4_hf.benchmark import BenchmarkSettings, plot_batch_scaling, results_table, run_benchmark, write_json
from minigpt4_hf.random_models import MODEL_SIZES


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="benchmark.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=sorted(MODEL_SIZES), default="small", help="random model size")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed repeats per variant (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per variant first (default 1)")
    parser.add_argument("--new-tokens", type=positive_int, default=64, help="tokens generated per call (default 64)")
    parser.add_argument(
        "--batch-sizes", type=positive_int, nargs="+", default=[1, 2, 4, 8], help="batched generation (default 1 2 4 8)"
    )
    parser.add_argument("--image-batch", type=positive_int, default=1, help="images per encoding call (default 1)")
    parser.add_argument("--train-batch", type=positive_int, default=2, help="samples per training step (default 2)")
    parser.add_argument(
        "--no-compile", dest="compile", action="store_false", help="skip the torch.compile variant of image encoding"
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="write all results here (JSON)")
    parser.add_argument("--plot", type=Path, help="PNG of tokens/s against batch size (default: next to --json)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA GPU is visible to torch; run on the CPU with --device cpu.")
    if args.warmup < 0:
        parser.error("--warmup must be 0 or more.")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = BenchmarkSettings(
        size=args.size,
        repeats=args.repeats,
        warmup=args.warmup,
        new_tokens=args.new_tokens,
        batch_sizes=tuple(sorted(set(args.batch_sizes))),
        image_batch=args.image_batch,
        train_batch=args.train_batch,
        compile=args.compile,
        device=args.device,
        threads=args.threads,
    )
    results = run_benchmark(settings)
    print(results_table(results))
    plot = args.plot or (args.json.with_suffix(".png") if args.json else None)
    if args.json:
        write_json(results, args.json)
        print(f"\nWrote {args.json}", file=sys.stderr)
    if plot:
        plot_batch_scaling(results, plot)
        print(f"Wrote {plot}", file=sys.stderr)
    return 0



def cli() -> None:
    """Console entry point `minigpt4-benchmark`."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
