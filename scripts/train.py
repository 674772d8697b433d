#!/usr/bin/env python
"""Launcher of `minigpt4-train` (minigpt4_hf/cli/train.py); run it with `--help`."""

from minigpt4_hf.cli.train import cli


if __name__ == "__main__":
    cli()
