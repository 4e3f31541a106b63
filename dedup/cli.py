"""Subcommands of this stage (registered into the ``vitray`` parser)."""

from __future__ import annotations

import argparse


def register(sub: "argparse._SubParsersAction") -> None:
    """Add this stage's subcommands to ``sub``."""
