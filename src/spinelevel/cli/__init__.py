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
    # Each command module adds itself to `app` when imported; heavy imports stay inside commands.
    from spinelevel.cli import run as _run  # noqa: F401
    from spinelevel.cli import phantom as _phantom  # noqa: F401
    from spinelevel.cli import train as _train  # noqa: F401
    from spinelevel.cli import export as _export  # noqa: F401
    from spinelevel.cli import evaluate as _evaluate  # noqa: F401
    from spinelevel.cli import build as _build  # noqa: F401
    from spinelevel.cli import selftest as _selftest  # noqa: F401
    from spinelevel.cli import bench as _bench  # noqa: F401
    from spinelevel.cli import card as _card  # noqa: F401
    from spinelevel.cli import report as _report  # noqa: F401
    from spinelevel.cli import extract as _extract  # noqa: F401
    from spinelevel.cli import quantize as _quantize  # noqa: F401


_register()


def _bare_flag(argv: list[str], flag: str, value: str) -> list[str]:
    """Give a bare ``flag`` (followed by an option or nothing) the value ``value``."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        out.append(arg)
        if arg == flag and (i + 1 == len(argv) or argv[i + 1].startswith("-")):
            out.append(value)
    return out


def main() -> None:
    """Entry point of the installed `spinelevel` script."""
    import sys

    # `spinelevel run ... --ray` (no address) starts a local Ray instance.
    app(args=_bare_flag(sys.argv[1:], "--ray", "local"), prog_name="spinelevel")
