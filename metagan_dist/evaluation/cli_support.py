"""What the adapt and evaluate commands share: opening a pool by name, picking a device, one-line errors."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from metagan_dist.data import Pool, ensure_glyphs_pool

DEVICES = ("auto", "cpu", "cuda")


def open_pool(name: str) -> Pool:
    """'glyphs' (the embedded pool, built on first use) or a pool folder holding index.json."""
    return Pool(ensure_glyphs_pool() if name == "glyphs" else Path(name))


def pick_device(name: str) -> torch.device:
    """auto: CUDA when available, else the CPU; asking for cuda without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is available (use --device cpu or auto)")
    return torch.device(name)


def check_g_average(parser: argparse.ArgumentParser, beta: float | None) -> None:
    """--g-average must be a decay in [0, 1) (as meta.g_average) or absent; a usage error naming the flag if not."""
    if beta is not None and not 0 <= beta < 1:
        parser.error(f"--g-average must be in [0, 1) (0 = the last iterate), got {beta}")


def run_command(body: Callable[[], None]) -> None:
    """Run a command's body; bad input (ValueError, FileNotFoundError) ends it with one line and exit status 2."""
    try:
        body()
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
