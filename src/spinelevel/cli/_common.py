"""Helpers shared by the CLI commands: error reporting and logging set-up."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.console import Console

from spinelevel.errors import SpineLevelError

__all__ = ["stderr", "stdout", "fail_cleanly", "setup_logging"]

stderr = Console(stderr=True, highlight=False)
stdout = Console(highlight=False)


@contextmanager
def fail_cleanly() -> Iterator[None]:
    """Turn a library error into one red stderr line and exit code 1; Ctrl-C into exit code 130."""
    try:
        yield
    except SpineLevelError as exc:
        stderr.print(f"[bold red]error:[/] {exc}", soft_wrap=True, markup=True, emoji=False)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        stderr.print("[bold red]interrupted:[/] parts written so far are complete and readable")
        raise typer.Exit(130) from None


def setup_logging(verbose: bool) -> None:
    """Warnings (or debug with --verbose) from spinelevel to stderr; library chatter stays quiet."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("spinelevel").setLevel(logging.DEBUG if verbose else logging.WARNING)
    # pydicom warns about every odd header; the run records what matters per file.
    logging.getLogger("pydicom").setLevel(logging.ERROR)
