#!/usr/bin/env python
"""Launcher of `minigpt4-evaluate` (minigpt4_hf/cli/evaluate.py); run it with `--help`."""

from minigpt4_hf.cli.evaluate import cli


if __name__ == "__main__":
    cli()
