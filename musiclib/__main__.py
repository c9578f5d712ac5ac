"""``python -m musiclib`` runs the command-line interface."""

if __name__ == "__main__":
    # imported here only: a scan worker that ``serve`` spawns imports this module again
    # (as ``__mp_main__``), and needs none of the CLI (cyclopts, rich: some 80 ms each)
    from musiclib.cli import main

    main()
