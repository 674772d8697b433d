#!/usr/bin/env python
"""Launcher of `minigpt4-check-transformers` (minigpt4_hf/cli/check_transformers_versions.py); run it with `--help`."""

from minigpt4_hf.cli.check_transformers_versions import cli


if __name__ == "__main__":
    cli()
