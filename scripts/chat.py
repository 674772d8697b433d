#!/usr/bin/env python
"""Launcher of `minigpt4-chat` (minigpt4_hf/cli/chat.py); run it with `--help`."""

from minigpt4_hf.cli.chat import cli


if __name__ == "__main__":
    cli()
