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
import sys
from dataclasses import asdict
from pathlib import Path

from huggingface_hub.serialization._base import parse_size_to_int

from minigpt4_hf.benchmark_conversion import SIZES, run
from minigpt4_hf.files import write_text_atomically

PROG = "minigpt4-benchmark-conversion"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs-dir", "--inputs_dir", type=Path, required=True,
                        help="where the random inputs are made (once) and reused; about 16 GB for --size 7b")
    parser.add_argument("--size", choices=sorted(SIZES), default="7b", help="input shapes (default: 7b)")
    parser.add_argument("--max-shard-size", "--max_shard_size", default="1GB",
                        help="the converter's --max-shard-size (default: 1GB, so the bound is 4 GB)")
    parser.add_argument("--keep-output", "--keep_output", action="store_true",
                        help="keep the converted folder (default: deleted after measuring)")
    parser.add_argument("--delete-inputs", "--delete_inputs", action="store_true",
                        help="delete --inputs-dir after measuring")
    parser.add_argument("--json", type=Path, help="also write the numbers here (JSON)")
    args = parser.parse_args(argv)
    try:
        parse_size_to_int(args.max_shard_size)
    except ValueError as error:
        parser.error(f"--max-shard-size {args.max_shard_size!r}: {error}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        measurement = run(args.inputs_dir.absolute(), args.size, args.max_shard_size,
                          keep_output=args.keep_output, delete_inputs=args.delete_inputs)
    except (FileExistsError, RuntimeError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    print(measurement.table())
    if args.json:
        write_text_atomically(args.json, json.dumps({**asdict(measurement), "ratio": measurement.ratio}, indent=2))
    return 0


def cli() -> None:
    """Console entry point `minigpt4-benchmark-conversion`."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
