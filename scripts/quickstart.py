#!/usr/bin/env python
"""Launcher of `minigpt4-quickstart` (minigpt4_hf/cli/quickstart.py); run it with `--help`."""

from minigpt4_hf.cli.quickstart import cli


if __name__ == "__main__":
    cli()
