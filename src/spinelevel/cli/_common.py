"""Helpers shared by the CLI commands: error reporting and logging set-up."""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.console import Console

from spinelevel.errors import SpineLevelError

__all__ = ["stderr", "stdout", "fail_cleanly", "setup_logging", "Terminated", "terminate_as_interrupt"]

stderr = Console(stderr=True, highlight=False)
stdout = Console(highlight=False)


class Terminated(KeyboardInterrupt):
    """SIGTERM, delivered like Ctrl-C so that the same clean-up runs."""


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM raises :class:`Terminated` in the main thread."""

    def _raise(signum: int, frame: object) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def fail_cleanly() -> Iterator[None]:
    """Library errors: one red stderr line, exit 1. Ctrl-C: exit 130; SIGTERM: exit 143."""
    try:
        yield
    except SpineLevelError as exc:
        stderr.print(f"[bold red]error:[/] {exc}", soft_wrap=True, markup=True, emoji=False, highlight=False)
        raise typer.Exit(1) from None
    except KeyboardInterrupt as exc:
        what = "terminated" if isinstance(exc, Terminated) else "interrupted"
        stderr.print(f"[bold red]{what}:[/] completed series are saved; run the same command again to resume")
        raise typer.Exit(143 if isinstance(exc, Terminated) else 130) from None


def setup_logging(verbose: bool) -> None:
    """Warnings (or debug with --verbose) from spinelevel to stderr; library chatter stays quiet."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("spinelevel").setLevel(logging.DEBUG if verbose else logging.WARNING)
    # pydicom warns about every odd header; the run records what matters per file.
    logging.getLogger("pydicom").setLevel(logging.ERROR)
