"""Countdown: combine the given numbers with + - * / into an expression equal to the target.

Examples are ``{"numbers": [30, 100, 93], "target": 23}``. Generated items have three numbers in
1..100 and a target in 1..100 drawn from the values a solver proves reachable, so every item is
solvable. Number triples (as multisets) are split between train and test by a seeded hash, so the
splits share no triple, whatever sizes are asked for.

Reward (as d1): 1.0 when the answer is an expression using each given number exactly once whose
exact value is the target; 0.1 when it is a well-formed expression that fails (wrong numbers,
wrong value, division by zero); 0.0 when there is no parseable expression. The answer is read by
the rule of `answer_format` (last box, else the tagged region, else the whole text), written in
plain arithmetic by `plain_math` (``\\times``, ``\\div``, ``\\cdot``, ``\\frac``), split at ``=``
(``55 - 53 = 2``: the side that uses the given numbers counts) and evaluated by `arithmetic`
(never `eval`).
"""

from __future__ import annotations

import functools
import hashlib
from fractions import Fraction
from typing import NamedTuple

import numpy as np

from .answer_format import CHAT_FORMAT, before_eos, boxed_or_region
from .arithmetic import MAX_CHARS, ExpressionError, evaluate, literals, parse_expression
from .base import GeneratedTask, register_task
from .d1_prompts import countdown_prompt
from .data_files import read_jsonl
from .plain_math import plain_math

FORMAT_SCORE = 0.1
MAX_ANSWER_CHARS = 4 * MAX_CHARS  # room for LaTeX around an expression of MAX_CHARS
MAX_SIDES = 4  # "a = b = c" chains longer than this are not answers
D1_TEST_FILE = "countdown_cd3_test.jsonl"
NUMBER_RANGE = (1, 100)
TARGET_RANGE = (1, 100)
MAX_FILE_NUMBERS = 6  # the solver's subset tables grow fast: 6 numbers already take seconds


Value = int | Fraction  # ints while exact, so the common case avoids slow Fraction arithmetic


class _Expr(NamedTuple):
    value: Value
    text: str
    level: int  # 0 for a sum or difference, 1 for a product or quotient, 2 for a literal


def _wrap(expr: _Expr, min_level: int) -> str:
    return expr.text if expr.level >= min_level else f"({expr.text})"


def _divide(x: Value, y: Value) -> Value:
    if isinstance(x, int) and isinstance(y, int):
        return x // y if x % y == 0 else Fraction(x, y)
    quotient = x / y  # a Fraction is involved, so this is exact
    return quotient.numerator if quotient.denominator == 1 else quotient


def _combinations(a: _Expr, b: _Expr) -> list[_Expr]:
    """Every value one operation makes from a and b (both orders), with minimal parentheses."""
    out = [
        _Expr(a.value + b.value, f"{a.text}+{b.text}", 0),
        _Expr(a.value * b.value, f"{_wrap(a, 1)}*{_wrap(b, 1)}", 1),
    ]
    for x, y in ((a, b), (b, a)):
        out.append(_Expr(x.value - y.value, f"{x.text}-{_wrap(y, 1)}", 0))
        if y.value != 0:
            out.append(_Expr(_divide(x.value, y.value), f"{_wrap(x, 1)}/{_wrap(y, 2)}", 1))
    return out


def _shorter(a: str, b: str) -> bool:
    return (len(a), a) < (len(b), b)


@functools.lru_cache(maxsize=1024)  # a table is ~15 kB; generation rarely repeats a triple
def solve(numbers: tuple[int, ...]) -> dict[Value, str]:
    """Every exact value an expression using each number once can take -> a shortest such
    expression (a deterministic choice among equally short ones).

    Dynamic programming over subsets of the numbers: the table of a subset combines the tables
    of each way to split it in two. Keeping the best text per (value, precedence level) keeps
    the shortest overall, since parentheses depend only on the level."""
    full = (1 << len(numbers)) - 1
    tables: dict[int, dict[tuple[int, int, int], _Expr]] = {}
    for mask in sorted(range(1, full + 1), key=int.bit_count):
        if mask.bit_count() == 1:
            n = numbers[mask.bit_length() - 1]
            tables[mask] = {(n, 1, 2): _Expr(n, str(n), 2)}
            continue
        table: dict[tuple[int, int, int], _Expr] = {}
        part = (mask - 1) & mask
        while part:
            rest = mask ^ part
            if part < rest:  # each unordered split once; _combinations covers both orders
                for a in tables[part].values():
                    for b in tables[rest].values():
                        for expr in _combinations(a, b):
                            # ints and Fractions both have numerator/denominator; hashing a tuple
                            # of ints is far cheaper than hashing a Fraction
                            key = (expr.value.numerator, expr.value.denominator, expr.level)
                            if key not in table or _shorter(expr.text, table[key].text):
                                table[key] = expr
            part = (part - 1) & mask
        tables[mask] = table
    best: dict[tuple[int, int], _Expr] = {}
    for (numerator, denominator, _), expr in tables[full].items():
        key = (numerator, denominator)
        if key not in best or _shorter(expr.text, best[key].text):
            best[key] = expr
    return {expr.value: expr.text for expr in best.values()}


def _is_test_triple(numbers: tuple[int, ...], seed: int, test_fraction: float) -> bool:
    digest = hashlib.blake2b(f"{seed}:{sorted(numbers)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < test_fraction


@register_task
class CountdownTask(GeneratedTask):
    name = "countdown"
    file_splits = {"d1_test": D1_TEST_FILE}

    def __init__(self, seed: int = 0, test_fraction: float = 0.1, train_size: int = 5000,
                 test_size: int = 500):
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        self.seed, self.test_fraction = seed, test_fraction
        self.default_size = {"train": train_size, "test": test_size}

    # -- data ----------------------------------------------------------------------------------

    def _read_file(self, path: str) -> list[dict]:
        return read_countdown_jsonl(path)

    def _generate(self, split: str, count: int) -> list[dict]:
        """The first `count` items of the split's deterministic stream."""
        rng = np.random.default_rng([self.seed, 0 if split == "train" else 1])
        want_test = split == "test"
        examples: list[dict] = []
        seen: set[tuple] = set()
        while len(examples) < count:
            numbers = tuple(int(n) for n in rng.integers(NUMBER_RANGE[0], NUMBER_RANGE[1] + 1, size=3))
            if _is_test_triple(numbers, self.seed, self.test_fraction) != want_test:
                continue
            targets = sorted(
                int(v) for v in solve(tuple(sorted(numbers)))
                if v.denominator == 1 and TARGET_RANGE[0] <= v <= TARGET_RANGE[1]
            )
            if not targets:
                continue
            target = targets[int(rng.integers(len(targets)))]
            key = (tuple(sorted(numbers)), target)
            if key not in seen:
                seen.add(key)
                examples.append({"numbers": list(numbers), "target": target})
        return examples

    # -- prompts -------------------------------------------------------------------------------

    def compact_prompt(self, example: dict) -> str:
        return ",".join(map(str, example["numbers"])) + f">{example['target']}"

    def chat_prompt(self, example: dict) -> str:
        numbers = ", ".join(map(str, example["numbers"]))
        return (
            f"Using the numbers {numbers}, write an arithmetic expression equal to {example['target']}. "
            "Use each number exactly once; you may use +, -, *, / and parentheses.\n"
            "Inside the answer tags write only the expression, for example (7-2)*4.\n" + CHAT_FORMAT
        )

    def d1_prompt(self, example: dict, shots: int = 0) -> str:
        if shots:
            raise ValueError("countdown has no few-shot d1 prompt (the paper evaluates it zero-shot); use style d1")
        return countdown_prompt(example["numbers"], example["target"])

    def demonstration(self, example: dict) -> str:
        expression = solve(tuple(sorted(example["numbers"]))).get(Fraction(example["target"]))
        if expression is None:
            raise ValueError(f"no expression of {example['numbers']} equals {example['target']}")
        return expression

    def plausible_wrong_demonstration(self, example: dict) -> str:
        """The numbers added in the order given: well formed, uses each number once, rarely the target."""
        return "+".join(map(str, example["numbers"]))

    # -- scoring -------------------------------------------------------------------------------

    def _extract_answer(self, completion: str) -> str | None:
        answer = boxed_or_region(completion)
        text = before_eos(completion) if answer is None else answer
        return text.strip() or None if len(text) <= MAX_ANSWER_CHARS else None

    def _reward(self, completion: str, example: dict) -> float:
        text = self._extract_answer(completion)
        trees = [] if text is None else candidate_expressions(text)
        if not trees:
            return 0.0
        numbers = sorted(example["numbers"])
        for tree in trees:  # the side of "expr = target" that uses the given numbers
            if sorted(literals(tree)) == numbers:
                try:
                    return 1.0 if evaluate(tree) == example["target"] else FORMAT_SCORE
                except ExpressionError:
                    return FORMAT_SCORE
        return FORMAT_SCORE


def candidate_expressions(text: str) -> list:
    """Parsed sides of an answer such as ``\\boxed{(55 - 53) \\times 2 = 4}``: the text in plain
    arithmetic, split at ``=``, each side that parses (never eval'd)."""
    trees = []
    for side in plain_math(text).replace("{", "(").replace("}", ")").split("=")[:MAX_SIDES]:
        side = side.strip().rstrip(".").strip()
        if side:
            try:
                trees.append(parse_expression(side))
            except ExpressionError:
                pass
    return trees


def _int_field(value, what: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{where}: {what} must be an integer, got {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{where}: {what} must be an integer, got {value!r}") from None
    if not 0 <= number <= 10**6:
        raise ValueError(f"{where}: {what} {number} is outside 0..1000000")
    return number


def read_countdown_jsonl(path) -> list[dict]:
    """Read countdown items, one JSON object per line, in d1's format
    ``{"input": "30,100,93", "output": "23"}`` or ours ``{"numbers": [...], "target": 23}``."""
    examples = []
    for line, row in read_jsonl(path):
        where = f"{path}:{line}"
        if "input" in row and "output" in row:
            raw_numbers = str(row["input"]).split(",")
            raw_target = row["output"]
        elif "numbers" in row and "target" in row and isinstance(row["numbers"], list):
            raw_numbers, raw_target = row["numbers"], row["target"]
        else:
            raise ValueError(
                f'{where}: expected keys "input" and "output" (d1) or "numbers" (a list) and '
                f'"target"; found {", ".join(map(str, row)) or "none"}'
            )
        numbers = [_int_field(n.strip() if isinstance(n, str) else n, "number", where) for n in raw_numbers]
        if not 2 <= len(numbers) <= MAX_FILE_NUMBERS:
            raise ValueError(f"{where}: {len(numbers)} numbers; countdown items need 2..{MAX_FILE_NUMBERS}")
        target = _int_field(raw_target.strip() if isinstance(raw_target, str) else raw_target, "target", where)
        examples.append({"numbers": numbers, "target": target})
    if not examples:
        raise ValueError(f"{path}: no items in the file")
    return examples
