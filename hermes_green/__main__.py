"""`python -m hermes_green` and the installed `hermes-green` command (pyproject.toml).

The runtime is imported first: it monkey-patches the standard library, which must happen
before anything imports `socket`, `ssl` or `requests` (bin/hermes-green does the same).
"""
import sys

import hermes_green.runtime  # noqa: F401  (monkey-patches: before anything else)
from hermes_green.cli import main


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
