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
    from spinelevel.cli import label as _label  # noqa: F401


_register()


def _bare_flag(argv: list[str], flag: str, value: str) -> list[str]:
    """Give a bare ``flag`` (followed by an option or nothing) the value ``value``."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        out.append(arg)
        if arg == flag and (i + 1 == len(argv) or argv[i + 1].startswith("-")):
            out.append(value)
    return out


def spawned_workers_skip_main() -> None:
    """Keep spawned worker processes from re-running the main script before their first task.

    multiprocessing's spawn runs the parent's main script again in every worker (as
    ``__mp_main__``) unless the main module is a package's ``__main__``. For the installed
    ``spinelevel`` script that is the whole command line (typer, rich, every command: about 0.25 s
    of CPU per worker) for nothing: workers run engine functions only. Naming the main module
    ``spinelevel.__main__``, which is what the script runs, makes spawn skip it, as it does for
    ``python -m spinelevel``. Only the command line does this; a user's script that calls the
    engine keeps multiprocessing's usual behaviour.
    """
    import importlib.machinery
    import sys

    main_module = sys.modules.get("__main__")
    if main_module is not None and getattr(main_module, "__spec__", None) is None:
        main_module.__spec__ = importlib.machinery.ModuleSpec("spinelevel.__main__", None)


def main() -> None:
    """Entry point of the installed `spinelevel` script."""
    import sys

    spawned_workers_skip_main()

    # `spinelevel run ... --ray` (no address) starts a local Ray instance.
    app(args=_bare_flag(sys.argv[1:], "--ray", "local"), prog_name="spinelevel")
