"""`bin/hermes-green` with bench/hubtrace.py installed; writes the trace's report as JSON to
the path in HERMES_GREEN_HUBTRACE when the gateway exits (bench/cascade.py --trace)."""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import hermes_green.runtime  # noqa: E402,F401  (patches first)
import hubtrace  # noqa: E402
from hermes_green.cli import main  # noqa: E402

if __name__ == "__main__":
    trace = hubtrace.install()
    code = main(sys.argv[1:])
    with open(os.environ["HERMES_GREEN_HUBTRACE"], "w") as f:
        json.dump(trace.report(), f, indent=1)
    sys.exit(code)
