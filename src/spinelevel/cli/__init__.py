"""The `spinelevel` command line: a Typer app with one module per command."""

from __future__ import annotations

import typer

__all__ = ["app", "main"]

app = typer.Typer(
    name="spinelevel",
    help="Find vertebral levels and the L3 slice in CT archives.",
    no_args_is_help=True,
    add_completion=False,
    # Locals may hold DICOM headers, i.e. patient data: never print them.
    pretty_exceptions_show_locals=False,
)


def _register() -> None:
    # Each command module adds itself to `app` when imported.
    from spinelevel.cli import card as _card  # noqa: F401
    from spinelevel.cli import run as _run  # noqa: F401
    # phantom: registered below when spinelevel.cli.phantom exists
    try:
        from spinelevel.cli import phantom as _phantom  # noqa: F401
    except ModuleNotFoundError as exc:  # pragma: no cover - only while phantom is absent
        if exc.name != "spinelevel.cli.phantom":
            raise


_register()


def main() -> None:
    """Entry point of the installed `spinelevel` script."""
    app()
