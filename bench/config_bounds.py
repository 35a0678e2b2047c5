"""How long the config loader takes to refuse hostile YAML (bounds: hermes_green/safe_yaml.py).

    python bench/config_bounds.py [--repeat 20]

Prints JSON: per input, its size and the time parse_config takes to raise ConfigError (p50/max).
Before the bounds, the 9-level alias bomb ran for minutes and gigabytes (6 levels: 0.23 s,
each level x9) and the deep nesting ended in a RecursionError.
"""
import argparse
import time

from _common import emit, machine, ms_summary

from hermes_green.config import ConfigError, parse_config


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    lines = ["a0: &a0 [" + ",".join(['"lol"'] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


INPUTS = {
    "alias_bomb_9x9": alias_bomb(),
    "deep_flow_nesting_100k": "gateway: " + "[" * 100_000 + "]" * 100_000 + "\n",
    "deep_block_nesting_400": "gateway:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 400)),
    "few_aliases_many_values": ("a: &a [" + ",".join(["1"] * 6000) + "]\nb: ["
                                + ",".join(["*a"] * 10) + "]\n"),
    "one_mib_comment": "gateway: {}\n# " + "x" * ((1 << 20) - 20) + "\n",
    "over_one_mib": "# " + "x" * (1 << 20) + "\n",
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    results = {}
    for name, text in INPUTS.items():
        took, outcome = [], None
        for _ in range(args.repeat):
            t = time.perf_counter()
            try:
                parse_config(text, env={})
                outcome = "accepted"
            except ConfigError as e:
                outcome = str(e)
            took.append(time.perf_counter() - t)
        results[name] = {"bytes": len(text.encode()), "outcome": outcome, **ms_summary(took)}
    emit({"bench": "config_bounds", "machine": machine(), "results": results})


if __name__ == "__main__":
    main()
