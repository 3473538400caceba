#!/usr/bin/env python3
"""Checks that every CSV results file reads with no options and has its provenance.

    python3 scripts/check-results.py [DIR ...]      (default: results/)

For every `*.csv` under each DIR: Python's csv module reads it with its defaults (what
`pandas.read_csv(path)` does with no options), the header is on line 1 (no `#` comment
lines), every row is as wide as the header, and `<name>.meta.json` beside it is a JSON object
of format "rso-results-meta" naming the command (an argv array), revision, machine and end
time. Exits 1 naming every file at fault.
"""
import csv
import json
import pathlib
import sys


def problems(path):
    text = path.read_text(encoding="utf-8")
    if not text:
        yield "empty"
        return
    if text.startswith("#"):
        yield "line 1 is a comment, not the header"
    rows = list(csv.reader(text.splitlines()))
    width = len(rows[0])
    for number, row in enumerate(rows[1:], start=2):
        if len(row) != width:
            yield f"line {number} has {len(row)} fields, the header {width}"
    meta_path = path.with_suffix(".meta.json")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        yield f"{meta_path.name}: {e}"
        return
    if not isinstance(meta, dict) or meta.get("format") != "rso-results-meta":
        yield f"{meta_path.name}: not an rso-results-meta object"
        return
    if not (isinstance(meta.get("command"), list) and meta["command"]):
        yield f"{meta_path.name}: command is not an argv array"
    for key in ("revision", "machine", "ended"):
        if not meta.get(key):
            yield f"{meta_path.name}: {key} missing"


def main():
    dirs = [pathlib.Path(d) for d in sys.argv[1:]] or [pathlib.Path("results")]
    bad, count = 0, 0
    for d in dirs:
        for path in sorted(d.rglob("*.csv")):
            count += 1
            found = list(problems(path))
            for p in found[:3]:
                print(f"{path}: {p}", file=sys.stderr)
            if len(found) > 3:
                print(f"{path}: … {len(found) - 3} more", file=sys.stderr)
            bad += len(found)
    print(f"check-results: {count} CSV files, {bad} problems")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
