"""``python -m benchmarks [CASE ...] [--readme]``: run benchmark cases (default: all), print their
tables, write ``benchmarks/results/<case>.json``; with ``--readme``, replace README.md's Results
section with the tables of this run (dated, with the machine), so no number there is hand-written."""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import time
from pathlib import Path

CASES = ["simplify", "quantize", "quantize_minilm", "quantize_bert_random", "prune_channels", "prune_minilm",
         "profiler", "pipeline", "calibration_memory", "merge_minilm", "optimize"]

_README = Path(__file__).resolve().parents[1] / "README.md"
_RESULTS = Path(__file__).with_name("results")
_START, _END = "<!-- bench:start -->", "<!-- bench:end -->"


def _readme_section(cases: list[str], seconds: dict[str, float]) -> str:
    from onnxforge.pipeline.manifest import machine_description, tool_versions

    machine = machine_description()
    versions = tool_versions()
    lines = [
        _START,
        f"Measured by `make bench` on {datetime.date.today().isoformat()}: {machine['cpu']}, "
        f"{machine['cores']} cores; onnxruntime {versions.get('onnxruntime')}, torch {versions.get('torch')}, "
        f"onnx {versions.get('onnx')}. Speedups are ratios of p50 latencies measured interleaved in one run "
        "(this machine is shared and noisy: absolute times vary ±15%, ratios hold better). "
        "Reproduce with `make bench` (or `python -m benchmarks CASE`); JSON with every number is in `benchmarks/results/`.",
        "",
    ]
    for case in cases:
        path = _RESULTS / f"{case}.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        module = importlib.import_module(f"benchmarks.{case}")
        first_paragraph = (module.__doc__ or case).strip().split("\n\n")[0]
        title = " ".join(first_paragraph.split())
        lines += [f"#### {case}", "", title, "", data["table"], "", f"_{seconds.get(case, 0):.0f} s_", ""]
    lines.append(_END)
    return "\n".join(lines)


def _update_readme(section: str) -> None:
    from onnxforge._atomic import atomic_write_text

    text = _README.read_text()
    if _START in text and _END in text:
        head, rest = text.split(_START, 1)
        text = head + section + rest.split(_END, 1)[1]
    else:
        text = text.rstrip() + "\n\n## Results\n\n" + section + "\n"
    atomic_write_text(_README, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("cases", nargs="*", metavar="CASE", help=f"one of: {', '.join(CASES)}")
    parser.add_argument("--readme", action="store_true", help="write this run's tables into README.md")
    args = parser.parse_args()
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case {unknown[0]!r}; cases are: {', '.join(CASES)}")
    cases = args.cases or CASES
    seconds: dict[str, float] = {}
    for case in cases:
        module = importlib.import_module(f"benchmarks.{case}")
        start = time.perf_counter()
        module.run()
        seconds[case] = time.perf_counter() - start
        print(f"\n[{case}: {seconds[case]:.0f} s]\n")
    if args.readme:
        _update_readme(_readme_section(cases, seconds))
        print(f"README.md Results updated from this run ({sum(seconds.values()) / 60:.1f} min)")


if __name__ == "__main__":
    main()
