"""Check the suite's combined coverage data against the project's bars, per group of modules.

Usage: python .ci/coverage_gate.py [DATA_FILE]   (default: .coverage, combined)

Prints, for each group, its statements, branches and coverage.py's branch-mode figure
((covered statements + covered branches) / (statements + branches)), and exits 1 if any
group is below its bar. The groups are the parts of taskrun that run across processes
and threads, where untested failure paths hide.
"""

from __future__ import annotations

import fnmatch
import json
import os
import sys
import tempfile

import coverage

#: group name -> (file patterns relative to the repository, bar in percent)
GROUPS: dict[str, tuple[list[str], float]] = {
    "process runner": (["taskrun/runners/process/*.py", "taskrun/_fingerprint.py", "taskrun/_pickling.py"], 95.0),
    "timer": (["taskrun/_timer.py"], 95.0),
    "ledger": (["taskrun/_ledger/*.py"], 95.0),
}


def main(argv: list[str]) -> int:
    data_file = argv[1] if len(argv) > 1 else ".coverage"
    if not os.path.exists(data_file):
        print(f"coverage gate: no coverage data at {data_file}: run the suite under coverage first", file=sys.stderr)
        return 1
    cov = coverage.Coverage(data_file=data_file)
    cov.load()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "coverage.json")
        cov.json_report(outfile=out, include=["taskrun/*"])
        with open(out) as f:
            files = json.load(f)["files"]
    failed = []
    print(f"{'group':<16} {'stmts':>6} {'miss':>5} {'branches':>8} {'missing br':>10} {'branch-only':>11} {'cover':>7}  bar")
    for group, (patterns, bar) in GROUPS.items():
        summaries = [
            info["summary"] for name, info in files.items()
            if any(fnmatch.fnmatch(name.replace(os.sep, "/"), pattern) for pattern in patterns)
        ]
        if not summaries:
            print(f"{group:<16} no measured files match {patterns}")
            failed.append(group)
            continue
        stmts = sum(s["num_statements"] for s in summaries)
        covered = sum(s["covered_lines"] for s in summaries)
        branches = sum(s["num_branches"] for s in summaries)
        covered_branches = sum(s["covered_branches"] for s in summaries)
        total = stmts + branches
        percent = 100.0 * (covered + covered_branches) / total if total else 100.0
        branch_only = 100.0 * covered_branches / branches if branches else 100.0
        verdict = "ok" if percent >= bar else "BELOW"
        print(f"{group:<16} {stmts:>6} {stmts - covered:>5} {branches:>8} {branches - covered_branches:>10} "
              f"{branch_only:>10.1f}% {percent:>6.1f}%  {bar:.0f}% {verdict}")
        if percent < bar:
            failed.append(group)
    if failed:
        print(f"coverage gate: FAILED: below the bar: {', '.join(failed)} "
              "(see `coverage report -m --include=...` for the missing lines and branches)")
        return 1
    print("coverage gate: passed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
