"""``python -m musiclib`` runs the command-line interface."""

from .cli import main

if __name__ == "__main__":  # a spawned scan worker imports this module too: run nothing then
    main()
