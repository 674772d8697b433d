#!/usr/bin/env python
"""Launcher of `minigpt4-build-stage2-data` (minigpt4_hf/cli/build_stage2_data.py); run it with `--help`."""

from minigpt4_hf.cli.build_stage2_data import cli


if __name__ == "__main__":
    cli()
