"""``python -m benchmarks [CASE ...]``: run benchmark cases (default: all) and print their tables."""

from __future__ import annotations

import argparse
import importlib
import time

CASES = ["quantize", "prune_channels"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("cases", nargs="*", metavar="CASE", help=f"one of: {', '.join(CASES)}")
    args = parser.parse_args()
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case {unknown[0]!r}; cases are: {', '.join(CASES)}")
    for case in args.cases or CASES:
        try:
            module = importlib.import_module(f"benchmarks.{case}")
        except ModuleNotFoundError:
            print(f"(benchmark {case} not available)")
            continue
        start = time.perf_counter()
        module.run()
        print(f"\n[{case}: {time.perf_counter() - start:.0f} s]\n")


if __name__ == "__main__":
    main()
