#!/usr/bin/env python
"""
Peak memory of `minigpt4-convert` on full-size inputs, against its bound 2 x --max-shard-size + 2 GB.

    python scripts/benchmark_conversion.py --inputs-dir /data/minigpt4-7b-random            # makes ~16 GB once
    python scripts/benchmark_conversion.py --inputs-dir /data/minigpt4-7b-random --max-shard-size 5GB
    python scripts/benchmark_conversion.py --inputs-dir /tmp/tiny-set --size tiny            # a quick check

The first run writes random files with the shapes of the released 7B set (eva_vit_g.pth, the BLIP-2 Q-Former file, a
Vicuna-7B v0 folder in safetensors shards, the projection) into --inputs-dir; later runs reuse them. The conversion
runs in a child process; its peak resident set size (VmHWM) is printed against the bound as a Markdown table, and the
converted folder is deleted afterwards (--keep-output keeps it). --delete-inputs removes the inputs at the end.
"""

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from minigpt4_hf.cli.options import CommandLineParser, UserError, console_entry_point


PROG = "minigpt4-benchmark-conversion"
# The input sets of `minigpt4_hf.benchmark_conversion.SIZES` (the released 7B set, and a tiny one for a quick check).
SIZE_CHOICES = ("7b", "tiny")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = CommandLineParser(PROG, description=__doc__)
    parser.add_argument("--inputs-dir", type=Path, required=True,
                        help="where the random inputs are made (once) and reused; about 16 GB for --size 7b")
    parser.add_argument("--size", choices=SIZE_CHOICES, default="7b", help="input shapes (default: %(default)s)")
    parser.add_argument("--max-shard-size", default="1GB",
                        help="the converter's --max-shard-size; the bound is 2 x it + 2 GB (default: %(default)s)")
    parser.add_argument("--keep-output", action="store_true",
                        help="keep the converted folder (default: off: deleted after measuring)")
    parser.add_argument("--delete-inputs", action="store_true",
                        help="delete --inputs-dir after measuring (default: off)")
    parser.add_argument("--json", type=Path, help="also write the numbers here as JSON (default: none)")
    args = parser.parse_args(argv)
    from huggingface_hub import split_torch_state_dict_into_shards  # parses sizes; imports no torch

    try:
        split_torch_state_dict_into_shards({}, max_shard_size=args.max_shard_size)
    except ValueError as error:
        parser.error(f"--max-shard-size {args.max_shard_size!r}: {error}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from minigpt4_hf.benchmark_conversion import run
    from minigpt4_hf.files import write_text_atomically

    try:
        measurement = run(args.inputs_dir.absolute(), args.size, args.max_shard_size,
                          keep_output=args.keep_output, delete_inputs=args.delete_inputs)
    except (FileExistsError, RuntimeError) as error:
        raise UserError(str(error)) from None
    print(measurement.table())
    if args.json:
        write_text_atomically(args.json, json.dumps({**asdict(measurement), "ratio": measurement.ratio}, indent=2))
    return 0


cli = console_entry_point(main, PROG)


if __name__ == "__main__":
    cli()
