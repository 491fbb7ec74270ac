"""`python -m adapterkit ...`: the same as the `adapterkit` command."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
