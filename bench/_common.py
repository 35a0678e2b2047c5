"""Shared by the benchmarks: repo on sys.path, the runtime first, JSON output, percentiles."""
import json
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hermes_green.runtime  # noqa: E402,F401  (patches before anything else)
from hermes_green.runtime import percentile  # noqa: E402


def machine() -> dict:
    import psutil
    return {"python": platform.python_version(), "cpus": os.cpu_count(),
            "mem_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "cpu_model": _cpu_model(), "system": platform.platform()}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def ms_summary(seconds: list[float]) -> dict:
    return {"n": len(seconds), "p50_ms": round(percentile(seconds, 50) * 1000, 3),
            "p99_ms": round(percentile(seconds, 99) * 1000, 3),
            "max_ms": round(max(seconds, default=0.0) * 1000, 3)}


def emit(doc: dict) -> None:
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")
