#!/usr/bin/env python3
"""Run the robustness corpus of issue #7 and write ``docs/robustness.md``.

The cases are those of ``Testing/Python/robustness_cases.py``, the same list ``Testing/Python/test_robustness.py``
runs under pytest: bad, corrupt and hostile inputs and faults, each through the library, the command line or
the Slicer module's MRML logic, each in its own empty folder. The document has one row per case (what was
tried, the entry point, the outcome) and the totals, with the machine and the date of the run.

Examples (from the repository root)::

    python benchmarks/robustness_report.py                  # every case, writes docs/robustness.md
    python benchmarks/robustness_report.py --skip-subprocess  # without the cases that start samfewshot processes
    python benchmarks/robustness_report.py --cases baseline two-runs-at-once --output /tmp/robustness.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "Testing" / "Python"))
sys.path.insert(0, str(REPO))

import robustness_cases as corpus  # noqa: E402

BAD = ("hang", "wrong result", "unclear error")  # besides tracebacks: outcomes no case may end in


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "robustness.md")
    parser.add_argument("--cache-dir", type=Path, default=corpus.DEFAULT_CACHE,
                        help="embedding cache shared by the cases (default: the test suite's)")
    parser.add_argument("--skip-subprocess", action="store_true",
                        help="leave out the cases that start samfewshot processes (then covered by pytest only)")
    parser.add_argument("--cases", nargs="*", help="only these case names")
    args = parser.parse_args(argv)
    # The command line configures logging on first use; give the root logger a quiet handler first so that
    # the cases' warnings are only collected by the runner, not printed between the progress lines.
    logging.basicConfig(level=logging.WARNING, handlers=[logging.NullHandler()])

    try:
        import mrml_helpers

        has_mrml = mrml_helpers.HAS_MRML
    except ImportError:
        has_mrml = False
    cases = [c for c in corpus.CASES if not args.cases or c.name in args.cases]
    outcomes, skipped = [], []
    started = time.perf_counter()
    for number, case in enumerate(cases, start=1):
        if case.needs_mrml and not has_mrml:
            skipped.append((case, "slicer-core is not installed"))
            continue
        if args.skip_subprocess and case.cost == "subprocess":
            skipped.append((case, "left out with --skip-subprocess; covered by pytest only"))
            continue
        with tempfile.TemporaryDirectory(prefix="samfewshot-robustness-") as folder:
            outcome = corpus.run_case(case, Path(folder), args.cache_dir)
            outcome.detail = outcome.detail.replace(str(Path(folder).resolve()) + "/", "").replace(folder + "/", "")
        outcomes.append(outcome)
        flag = "ok" if not outcome.problems() else ("known failure" if case.xfail else "FAILED")
        print(f"[{number}/{len(cases)}] {case.name}: {flag} ({outcome.seconds:.1f} s) {outcome.summary()[:150]}",
              flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(render(outcomes, skipped, time.perf_counter() - started), encoding="utf-8")
    print(f"wrote {args.output}")
    unexpected = [o for o in outcomes if o.problems() and not o.case.xfail]
    return 1 if unexpected else 0


def machine() -> str:
    import numpy
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{platform.system()} {platform.machine()}, {cores} CPU cores, Python {platform.python_version()}, "
            f"torch {torch.__version__}, numpy {numpy.__version__}, device: CPU")


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def render(outcomes: list, skipped: list, seconds: float) -> str:
    counts = Counter(o.kind for o in outcomes)
    known = [o for o in outcomes if o.case.xfail]
    unexpected = [o for o in outcomes if o.problems() and not o.case.xfail]
    changed = sum(bool(o.inputs_changed) for o in outcomes)
    stray = sum(bool(o.stray_files) for o in outcomes)
    settled = [o for o in outcomes if not o.case.xfail]
    lines = [
        "# Robustness: bad input, faults and hostile files",
        "",
        "Issue #7: *bad input, faults and hostile files never lose a clinician's work.* Every case below wrote its",
        "own inputs into an empty folder, drove one entry point (the library, the `samfewshot` command line in",
        "this process or as a separate process, or the Slicer module's MRML logic on real MRML from `slicer-core`)",
        "and had to end in a **correct result** (checked as the row says) or a **clear error** (a",
        "`SAMFewshotLib.errors` exception, or exit status 1 with one `samfewshot: error: ...` line on stderr).",
        "Every input file was hashed before and after, the scene's input nodes (voxels, geometry, every segment)",
        "compared before and after, and the case's folder listed before and after: only the output path and the",
        "cache dir may gain files ($SAMFEWSHOT_CACHE_DIR pointed into the folder, so the default cache counts as",
        "outside). A case that asks the encoder for more slices than its budget, or the pipeline for more decoders,",
        "or runs past its time limit, is stopped and counted as a hang.",
        "",
        f"Generated by `benchmarks/robustness_report.py` on {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC,",
        f"{machine()}; {seconds / 60:.1f} minutes. The same cases run in the test suite",
        "(`Testing/Python/test_robustness.py`; the corpus is `Testing/Python/robustness_cases.py`).",
        "",
        "## Totals",
        "",
        "| | cases |",
        "|---|---:|",
        f"| cases tried | {len(outcomes)} |",
        f"| clear errors | {counts['clear error']} |",
        f"| correct results | {counts['correct result']} |",
        f"| tracebacks (must be 0) | {sum(o.kind == 'traceback' for o in settled)} |",
        f"| hangs, wrong results, unclear errors (must be 0) | {sum(o.kind in BAD for o in settled)} |",
        f"| inputs changed (must be 0) | {changed} |",
        f"| files written outside the output path and the cache dir (must be 0) | {stray} |",
        f"| known failures, each needing a fix outside this change (listed below) | {len(known)} |",
        f"| unexpected failures | {len(unexpected)} |",
        "",
    ]
    if known:
        lines += ["Known failures are counted in their own row, not above: each is a case of the corpus that",
                  "fails today for the reason given; the test suite marks it `xfail(strict=True)`, so it turns into",
                  "a failure to notice once the fix lands.", ""]
    if skipped:
        lines += ["Not run here: " + "; ".join(f"`{c.name}` ({why})" for c, why in skipped) + ".", ""]
    number = 0
    for group in dict.fromkeys(o.case.group for o in outcomes):
        lines += [f"## {group[:1].upper()}{group[1:]}", "", "| # | case | entry point | what was tried | outcome | s |",
                  "|---:|---|---|---|---|---:|"]
        for outcome in (o for o in outcomes if o.case.group == group):
            number += 1
            text = outcome.summary()
            if outcome.case.xfail:
                text = f"**known failure** ({outcome.kind}): {outcome.detail}"
            elif outcome.problems():
                text = "**FAILED**: " + "; ".join(outcome.problems())
            lines.append(f"| {number} | `{outcome.case.name}` | {outcome.case.entry} | {_cell(outcome.case.tried)} | "
                         f"{_cell(text)} | {outcome.seconds:.1f} |")
        lines.append("")
    if known:
        lines += ["## Known failures and the fix each needs", ""]
        lines += [f"- `{o.case.name}` ({o.case.entry}, {o.case.tried}): {o.case.xfail}. Today: {o.kind}: "
                  f"{_cell(o.detail)[:300]}" for o in known]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
