"""argparse types the benchmarks share: a bad value is a usage error (exit 2) before anything runs, not a traceback
after minutes of servicings (`--repeat 0` had no median; an `--out` nobody can write was found only at the end)."""
from __future__ import annotations

import argparse
import os

import click

from vfkeep.cli import output_dir


def at_least(minimum: float, kind=float):
    """argparse type: a number >= `minimum`."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"a number expected, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum:g}, got {text}")
        return value
    return parse


def report_path(text: str) -> str:
    """argparse type: a JSON report's path, written at the end (its missing directories created): not a directory,
    and its directory (or the nearest existing one above it) takes new entries (`vfkeep.cli.output_dir`)."""
    try:
        if os.path.isdir(text):
            raise click.BadParameter(f"{text} is a directory")
        output_dir(None, None, os.path.dirname(os.path.abspath(text)))
    except click.BadParameter as e:
        raise argparse.ArgumentTypeError(e.message) from None
    return text
