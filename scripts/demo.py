#!/usr/bin/env python
"""Launcher of `minigpt4-demo` (minigpt4_hf/cli/demo.py); run it with `--help`."""

from minigpt4_hf.cli.demo import cli


if __name__ == "__main__":
    cli()
