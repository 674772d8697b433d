#!/usr/bin/env python
"""Launcher of `minigpt4-benchmark-conversion` (minigpt4_hf/cli/benchmark_conversion.py); run it with `--help`."""

from minigpt4_hf.cli.benchmark_conversion import cli


if __name__ == "__main__":
    cli()
