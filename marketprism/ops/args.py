"""Argument types shared by the sub-commands: a bad value is a one-line usage error."""

from __future__ import annotations

import argparse


def _positive(text: str, kind):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def positive_int(text: str) -> int:
    return _positive(text, int)


def positive_float(text: str) -> float:
    return _positive(text, float)
