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
    import importlib
    import importlib.util

    # phantom arrives with its own module; until then the command is simply absent.
    if importlib.util.find_spec("spinelevel.cli.phantom") is not None:
        importlib.import_module("spinelevel.cli.phantom")


_register()


def main() -> None:
    """Entry point of the installed `spinelevel` script."""
    app()
