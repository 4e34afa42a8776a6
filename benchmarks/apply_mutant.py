"""Apply one mutmut mutant to a copy of ``src/``, to see a test fail on it (docs/results/mutation.md).

    d=$(mktemp -d) && cp -r src "$d" && mutmut show NAME | python benchmarks/apply_mutant.py "$d/src"
    PYTHONPATH="$d/src" python -m pytest -x -q tests/THE_TEST.py   # fails when the test kills NAME

mutmut prints a method's diff dedented, so a plain ``patch`` cannot place it: each hunk is found by
its lines with the indentation stripped (exactly one match is required) and written back at the
indentation of the file.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(src_root: Path, diff: str) -> None:
    lines_of_diff = diff.splitlines()
    name = next(line[4:].strip() for line in lines_of_diff if line.startswith("+++ "))
    target = src_root / name.removeprefix("src/")
    lines = target.read_text().splitlines()
    hunks: list[list[str]] = []
    for line in lines_of_diff:
        if line.startswith("@@"):
            hunks.append([])
        elif hunks and line[:1] in (" ", "-", "+"):
            hunks[-1].append(line)
    for hunk in hunks:
        old = [line[1:] for line in hunk if line[0] in " -"]
        new = [line[1:] for line in hunk if line[0] in " +"]
        stripped, wanted = [line.strip() for line in lines], [line.strip() for line in old]
        hits = [i for i in range(len(lines) - len(old) + 1) if stripped[i:i + len(old)] == wanted]
        if len(hits) != 1:
            raise SystemExit(f"a hunk of {name} matches {len(hits)} places; apply it by hand")
        at = hits[0]
        ref = next(k for k, line in enumerate(old) if line.strip())
        shift = (len(lines[at + ref]) - len(lines[at + ref].lstrip())) - (len(old[ref]) - len(old[ref].lstrip()))
        lines[at:at + len(old)] = [" " * shift + line if line.strip() else line for line in new]
    target.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.stdin.read())
