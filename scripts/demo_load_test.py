#!/usr/bin/env python
"""Launcher of `minigpt4-demo-load-test` (minigpt4_hf/cli/demo_load_test.py); run it with `--help`."""

from minigpt4_hf.cli.demo_load_test import cli


if __name__ == "__main__":
    cli()
