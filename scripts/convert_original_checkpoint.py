#!/usr/bin/env python
"""Launcher of `minigpt4-convert` (minigpt4_hf/cli/convert.py); run it with `--help`."""

from minigpt4_hf.cli.convert import cli


if __name__ == "__main__":
    cli()
