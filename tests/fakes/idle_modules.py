"""The real gateway (`bin/hermes-green --config FILE`), which on SIGUSR2 writes what it holds
at that moment as JSON to OUT_FILE: its imported modules and whether gevent's monitor thread
runs. For tests of what an idle gateway imports.

    python tests/fakes/idle_modules.py CONFIG_FILE OUT_FILE
"""
import json
import os
import runpy
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    config_path, out = sys.argv[1], sys.argv[2]
    sys.path.insert(0, ROOT)
    import hermes_green.runtime  # noqa: F401  (first, as in bin/hermes-green)
    import gevent

    def dump() -> None:
        doc = {"modules": sorted(sys.modules),
               "monitor_thread": gevent.get_hub().periodic_monitoring_thread is not None}
        with open(out + ".tmp", "w") as f:
            json.dump(doc, f)
        os.replace(out + ".tmp", out)

    gevent.signal_handler(signal.SIGUSR2, dump)
    sys.argv = [os.path.join(ROOT, "bin", "hermes-green"), "--config", config_path]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
