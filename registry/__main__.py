"""`python -m adapterkit_registry serve --root DIR --port N`."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
