"""``python -m xentkit``: the ``xentkit`` command (see :mod:`xentkit.cli`)."""

from xentkit.cli import main

if __name__ == "__main__":  # pytest --doctest-modules imports this module too
    raise SystemExit(main())
