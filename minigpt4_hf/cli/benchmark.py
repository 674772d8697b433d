#!/usr/bin/env python
"""
Speed and memory of MiniGPT-4 on random weights of a named size, against the plain way of running it, with pass/fail
for the performance targets (docs/performance.md; minigpt4_hf/benchmark.py says what each case measures).

    minigpt4-benchmark --size small --json benchmark-small.json          # + benchmark-small.png
    minigpt4-benchmark --size tiny --repeats 1 --json /tmp/tiny.json     # a quick check
    minigpt4-benchmark --size vision-full --repeats 3 --json full.json   # real ViT-g + Q-Former shapes

Prints a Markdown table (median [25th-75th percentile] over interleaved repeats, peak memory, ratios) and the targets;
`--json` writes every number plus `"targets": {name: {"value", "goal", "pass"}}`, and a PNG of tokens/s against batch
size next to it (or at `--plot`). The exit status is 0 even when a target fails: read the table or the JSON.
"""

import argparse
import sys
from pathlib import Path

from minigpt4_hf.cli.options import (
    CommandLineParser,
    UserError,
    check_extra_installed,
    console_entry_point,
    non_negative_int,
    positive_int,
)
from minigpt4_hf.random_models import MODEL_SIZES


PROG = "minigpt4-benchmark"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = CommandLineParser(PROG, description=__doc__)
    parser.add_argument("--size", choices=sorted(MODEL_SIZES), default="small", help="Model size (default: small).")
    parser.add_argument("--repeats", type=positive_int, default=5, help="Timed repeats per variant (default: 5).")
    parser.add_argument("--warmup", type=non_negative_int, default=1, help="Untimed runs per variant (default: 1).")
    parser.add_argument("--new-tokens", type=positive_int, default=64,
                        help="Tokens generated per call, exactly: generation never stops early (default: 64).")
    parser.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1, 2, 4, 8],
                        help="Batch sizes of batched generation (default: 1 2 4 8).")
    parser.add_argument("--image-batch", type=positive_int, default=1, help="Images per encoding call (default: 1).")
    parser.add_argument("--train-batch", type=positive_int, default=2, help="Samples per training step (default: 2).")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="Skip the torch.compile variant of image encoding (default: compile it).")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu).")
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice).")
    parser.add_argument("--json", type=Path, help="Write all results here, as JSON (default: none).")
    parser.add_argument("--plot", type=Path, help="PNG of tokens/s against batch size (default: next to --json).")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"--device {args.device}: no CUDA GPU is visible to torch; run on the CPU with --device "
                            "cpu.")
    if args.json or args.plot:
        check_extra_installed("benchmark", "matplotlib")
    from minigpt4_hf.benchmark import BenchmarkSettings, plot_batch_scaling, results_table, run_benchmark, write_json

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


cli = console_entry_point(main, PROG)


if __name__ == "__main__":
    cli()
