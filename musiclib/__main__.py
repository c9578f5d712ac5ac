"""``python -m musiclib`` runs the command-line interface."""

from .cli import main

main()
