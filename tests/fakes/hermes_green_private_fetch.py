"""bin/hermes-green, with fetch_url allowed to read loopback and private addresses: for tests
that serve the pages the agent fetches from a loopback server. Same arguments as the CLI.

    python tests/fakes/hermes_green_private_fetch.py --config CONFIG_FILE
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import hermes_green.runtime  # noqa: E402,F401  (first, as in bin/hermes-green)
from hermes_green.agent import builtin_tools  # noqa: E402
from hermes_green.cli import main  # noqa: E402

builtin_tools.ALLOW_PRIVATE_ADDRESSES = True

if __name__ == "__main__":
    sys.exit(main())
