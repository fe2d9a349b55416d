"""``python -m vesta``: the vesta command (as if run as ``vesta``)."""

from vesta.cli.vesta import main

if __name__ == "__main__":
    main()
