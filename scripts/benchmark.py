#!/usr/bin/env python
"""Launcher of `minigpt4-benchmark` (minigpt4_hf/cli/benchmark.py); run it with `--help`."""

from minigpt4_hf.cli.benchmark import cli


if __name__ == "__main__":
    cli()
