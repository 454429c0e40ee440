"""`mailmesh domain ...` and `mailmesh user ...`: administration over the mailbox service's gRPC API."""

from __future__ import annotations

import argparse


def add_admin_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Registers the admin subcommands; each sets `func(args) -> int` on its parser."""
    return None
