#!/usr/bin/env python
"""
Peak memory of `minigpt4-convert` on full-size inputs, against its bound 2 x --max-shard-size + 2 GB.

    minigpt4-benchmark-conversion --inputs-dir /data/minigpt4-7b-random            # makes ~16 GB once
    minigpt4-benchmark-conversion --inputs-dir /data/minigpt4-7b-random --max-shard-size 5GB
    minigpt4-benchmark-conversion --inputs-dir /tmp/tiny-set --size tiny           # a quick check

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

from minigpt4_hf.benchmark_conversion import SIZES, run
from minigpt4_hf.cli.options import EXIT_FAILED, CommandLineParser, UserError, console_entry_point
from minigpt4_hf.files import write_text_atomically


PROG = "minigpt4-benchmark-conversion"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = CommandLineParser(PROG, description=__doc__)
    parser.add_argument("--inputs-dir", type=Path, required=True,
                        help="Where the random inputs are made (once) and reused; about 16 GB for --size 7b.")
    parser.add_argument("--size", choices=sorted(SIZES), default="7b", help="Input shapes (default: %(default)s).")
    parser.add_argument("--max-shard-size", default="1GB",
                        help="The converter's --max-shard-size (default: %(default)s, so the bound is 4 GB).")
    parser.add_argument("--keep-output", action="store_true",
                        help="Keep the converted folder (default: off: deleted after measuring).")
    parser.add_argument("--delete-inputs", action="store_true",
                        help="Delete --inputs-dir after measuring (default: off).")
    parser.add_argument("--json", type=Path, help="Also write the numbers here, as JSON (default: none).")
    args = parser.parse_args(argv)
    from huggingface_hub.serialization._base import parse_size_to_int  # imports no torch

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
    except FileExistsError as error:
        raise UserError(str(error)) from None
    except RuntimeError as error:  # the conversion itself failed: not the input
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    print(measurement.table())
    if args.json:
        write_text_atomically(args.json, json.dumps({**asdict(measurement), "ratio": measurement.ratio}, indent=2))
    return 0


cli = console_entry_point(main, PROG)


if __name__ == "__main__":
    cli()
