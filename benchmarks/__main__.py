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
         "prune_minilm_structure", "profiler", "pipeline", "calibration_memory", "merge_minilm", "merge_library",
         "int4_algorithms", "optimize", "optimize_knobs", "optimize_minilm", "distill", "realworld"]
_OWN_SECTION = {"realworld": ("<!-- realworld:start -->", "<!-- realworld:end -->")}  # README sections of their own

_README = Path(__file__).resolve().parents[1] / "README.md"
_RESULTS = Path(__file__).with_name("results")
_START, _END = "<!-- bench:start -->", "<!-- bench:end -->"


def _case_text(case: str, seconds: float | None) -> str | None:
    """A case's README subsection from its results JSON, dated with the day it was measured."""
    path = _RESULTS / f"{case}.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    module = importlib.import_module(f"benchmarks.{case}")
    title = " ".join((module.__doc__ or case).strip().split("\n\n")[0].split())
    when = datetime.date.fromtimestamp(path.stat().st_mtime).isoformat()
    took = f"{seconds:.0f} s, " if seconds else ""
    return "\n".join([f"#### {case}", "", title, "", data["table"], "", f"_{took}measured {when}_", ""])


def _readme_section(existing: str, cases: list[str], seconds: dict[str, float]) -> str:
    """The Results block with the subsections of ``cases`` replaced (or added) and the others kept as
    they were, so running one case refreshes its own table only."""
    from onnxforge.pipeline.manifest import machine_description, tool_versions

    machine = machine_description()
    versions = tool_versions()
    kept: dict[str, str] = {}
    for chunk in existing.split("\n#### ")[1:]:
        name = chunk.split("\n", 1)[0].strip()
        kept[name] = "#### " + chunk.rstrip() + "\n"
    for case in cases:
        text = _case_text(case, seconds.get(case))
        if text:
            kept[case] = text
    lines = [
        _START,
        f"Measured by `make bench` on {machine['cpu']}, {machine['cores']} cores; onnxruntime "
        f"{versions.get('onnxruntime')}, torch {versions.get('torch')}, onnx {versions.get('onnx')} (each table "
        "says when). Speedups are ratios of p50 latencies measured interleaved in one run (this machine is shared "
        "and noisy: absolute times vary ±15%, ratios hold better). Reproduce with `make bench` (or "
        "`python -m benchmarks CASE --readme` for one table); JSON with every number is in `benchmarks/results/`.",
        "",
    ]
    lines += [kept[c] for c in [*CASES, *[k for k in kept if k not in CASES]] if c in kept]
    lines.append(_END)
    return "\n".join(lines)


def _update_readme(cases: list[str], seconds: dict[str, float]) -> None:
    from onnxforge._atomic import atomic_write_text

    text = _README.read_text()
    if _START in text and _END in text:
        head, rest = text.split(_START, 1)
        existing, tail = rest.split(_END, 1)
        text = head + _readme_section(existing, cases, seconds) + tail
    else:
        text = text.rstrip() + "\n\n## Results\n\n" + _readme_section("", cases, seconds) + "\n"
    atomic_write_text(_README, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("cases", nargs="*", metavar="CASE", help=f"one of: {', '.join(CASES)}")
    parser.add_argument("--readme", action="store_true", help="write this run's tables into README.md")
    parser.add_argument("--readme-only", action="store_true",
                        help="rewrite README.md's tables of CASE from benchmarks/results/ without running anything")
    args = parser.parse_args()
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case {unknown[0]!r}; cases are: {', '.join(CASES)}")
    cases = args.cases or CASES
    seconds: dict[str, float] = {}
    if args.readme_only:
        _update_readme(cases, seconds)
        print(f"README.md Results: {', '.join(cases)} rewritten from benchmarks/results/")
        return
    for case in cases:
        module = importlib.import_module(f"benchmarks.{case}")
        start = time.perf_counter()
        module.run()
        seconds[case] = time.perf_counter() - start
        print(f"\n[{case}: {seconds[case]:.0f} s]\n")
    if args.readme:
        shared = [c for c in cases if c not in _OWN_SECTION]
        if shared:
            _update_readme(shared, seconds)
        for case in cases:
            if case in _OWN_SECTION:
                _update_own_section(case, seconds[case])
        print(f"README.md updated from this run ({sum(seconds.values()) / 60:.1f} min)")


def _update_own_section(case: str, seconds: float) -> None:
    """Replace the README lines between the case's own markers with this run's table."""
    from onnxforge._atomic import atomic_write_text
    from onnxforge.pipeline.manifest import machine_description, tool_versions

    start, end = _OWN_SECTION[case]
    data = json.loads((_RESULTS / f"{case}.json").read_text())
    machine, versions = machine_description(), tool_versions()
    section = "\n".join([
        start,
        f"Measured by `python -m benchmarks {case} --readme` on {datetime.date.today().isoformat()}: {machine['cpu']}, "
        f"{machine['cores']} cores; onnxruntime {versions.get('onnxruntime')} ({seconds / 60:.0f} min).",
        "",
        data["table"],
        end,
    ])
    text = _README.read_text()
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n## Real models\n\n" + section + "\n"
    atomic_write_text(_README, text)


if __name__ == "__main__":
    main()
