#!/usr/bin/env python
"""Launcher of `minigpt4-caption` (minigpt4_hf/cli/caption.py); run it with `--help`."""

from minigpt4_hf.cli.caption import cli


if __name__ == "__main__":
    cli()
