"""``python -m spinelevel`` runs the command line."""

from spinelevel.cli import main

main()
