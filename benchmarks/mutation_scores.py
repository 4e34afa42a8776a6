"""Per-module mutation scores from mutmut's results folder (``mutants/``, written by ``mutmut run``).

    python benchmarks/mutation_scores.py            # a markdown table on stdout
    python benchmarks/mutation_scores.py --survivors src/dipod/lm/tasks/countdown.py

mutmut keeps one ``.meta`` file per mutated module with the exit status of the tests per mutant:
1 killed, 0 survived, 33 no test calls the mutated function, -24 / 24 / 36 timeout (killed: the mutant
hung the tests), None not run yet. The score is killed / (killed + survived + no tests), the mutants
not run yet are counted apart.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KILLED, SURVIVED, NO_TESTS = 1, 0, 33
TIMEOUTS = (-24, 24, 36, -9)


def outcomes(meta: Path) -> dict[str, int | None]:
    if not meta.is_file():
        raise SystemExit(f"no mutmut results at {meta}: run `mutmut run` in this checkout first, or pass "
                         "--mutants with the mutants/ folder of the checkout that ran it")
    return json.loads(meta.read_text()).get("exit_code_by_key", {})


def verdict(code: int | None) -> str:
    if code is None:
        return "not run"
    if code == KILLED or code in TIMEOUTS:
        return "killed"
    return {SURVIVED: "survived", NO_TESTS: "no tests"}.get(code, "killed")


def table(folder: Path) -> str:
    lines = ["| module | mutants | killed | survived | no tests | not run | score |", "|---|---|---|---|---|---|---|"]
    for meta in sorted(folder.rglob("*.py.meta")):
        counts = Counter(verdict(code) for code in outcomes(meta).values())
        if not sum(counts.values()):
            continue
        ran = counts["killed"] + counts["survived"] + counts["no tests"]
        score = f"{100 * counts['killed'] / ran:.0f}%" if ran else "-"
        module = meta.relative_to(folder).as_posix().removesuffix(".meta")
        lines.append(f"| {module} | {sum(counts.values())} | {counts['killed']} | {counts['survived']} | "
                     f"{counts['no tests']} | {counts['not run']} | {score} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutants", type=Path, default=ROOT / "mutants")
    parser.add_argument("--survivors", default=None, help="list the surviving mutant names of this module")
    args = parser.parse_args()
    if args.survivors:
        for name, code in outcomes(args.mutants / f"{args.survivors}.meta").items():
            if verdict(code) == "survived":
                print(name)
        return
    print(table(args.mutants))


if __name__ == "__main__":
    main()
