"""``python -m taskrun status runs.db``: what a ledger holds, for people (a table) and scripts (``--json``).

It only reads: the file is opened read-only (a ``mode=ro`` URI), no byte of it changes and no
-wal or -shm file is created, whatever the file is. It never unpickles a stored result (a
pickle can run code), so it is safe to point at a ledger you do not trust.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

from ._ledger import STATUSES, Ledger, RunRecord
from .errors import LedgerError

PROG = "python -m taskrun"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description="Inspect taskrun ledgers.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    status = commands.add_parser(
        "status",
        help="calls per task and status, and the last errors",
        description="Show how many calls of each task a ledger holds per status, and the last errors.",
    )
    status.add_argument("ledger", help="path of the ledger's SQLite file")
    status.add_argument("--json", action="store_true", help="print JSON for scripts instead of a table")
    status.add_argument("--errors", type=_count, default=5, metavar="N", help="how many of the last errors to show (default 5)")
    args = parser.parse_args(argv)

    path = args.ledger
    if not os.path.exists(path):
        return _fail(f"no ledger at {path!r}: the file does not exist")
    if os.path.isdir(path):
        return _fail(f"{path!r} is a directory; pass the path of a ledger file")
    try:
        ledger = Ledger.open_read_only(path)
        summary = ledger.summary()
        errors = ledger.last_errors(args.errors) if args.errors else []
    except LedgerError as exc:
        return _fail(str(exc))
    text = json.dumps(_as_json(path, summary, errors), indent=2) if args.json else _as_text(path, summary, errors)
    try:
        print(text, flush=True)
    except BrokenPipeError:  # `... | head`: the reader has what it wanted
        # Point stdout at /dev/null so the interpreter's own flush at exit does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return 0


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number of 0 or more, got {text!r}")
    return value


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def _as_json(path: str, summary: dict[str, dict[str, int]], errors: list[RunRecord]) -> dict[str, Any]:
    tasks = {task: {**{s: per.get(s, 0) for s in STATUSES}, "total": sum(per.values())} for task, per in summary.items()}
    return {
        "ledger": os.path.abspath(path),
        "total": sum(t["total"] for t in tasks.values()),
        "tasks": tasks,
        "last_errors": [record.to_dict() for record in errors],
    }


def _as_text(path: str, summary: dict[str, dict[str, int]], errors: list[RunRecord]) -> str:
    if not summary:
        return f"{path}: no calls recorded yet"
    total = sum(sum(per.values()) for per in summary.values())
    lines = [f"{path}: {total:,} call{'s' if total != 1 else ''} of {len(summary)} task{'s' if len(summary) != 1 else ''}", ""]
    header = ["task", *STATUSES, "total"]
    rows = [[task, *(f"{per.get(s, 0):,}" for s in STATUSES), f"{sum(per.values()):,}"] for task, per in summary.items()]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
    interrupted = sum(per.get("interrupted", 0) for per in summary.values())
    if interrupted:
        lines += ["", f"{interrupted:,} interrupted (their process is gone): they run again on the next call."]
    if errors:
        lines += ["", f"Last error{'s' if len(errors) != 1 else ''}:"]
        for record in errors:
            finished = record.finished_at
            when = "" if finished is None else f"{datetime.datetime.fromtimestamp(finished):%Y-%m-%d %H:%M:%S}"
            lines.append(f"  {when}  {record.task}  key {record.key}  (attempts: {record.attempts})")
            if record.call:
                lines.append(f"    call: {record.call}")
            lines.append(textwrap.indent(record.error or "", "    "))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
