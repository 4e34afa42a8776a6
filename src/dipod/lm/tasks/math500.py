"""MATH-500 competition problems, with boxed-answer extraction and `math-verify` equivalence.

Examples are ``{"problem": ..., "answer": "\\frac{1}{2}"}``; `answer` is the dataset's `answer`
field, or the last ``\\boxed{...}`` of its `solution` field. Data comes from a local
.json/.jsonl/.parquet file or a hub dataset id such as ``HuggingFaceH4/MATH-500``; the `test`
split with no file reads the packaged ``math500_test.jsonl`` (offline).

Answer (see `answer_format`): the last non-empty ``\\boxed{...}`` before EOS, else the answer
region, else the whole text. Correctness: equal after removing spacing and ``\\left``/``\\right``
(so every reference grades correct against itself), else `math_verify.verify` of the reference
against that answer, on answers `cheap_to_verify` admits. No clock decides a verdict: math-verify
runs without its SIGALRM timeouts (a timeout under load turned right answers wrong), and the work
is bounded instead by what `cheap_to_verify` and `_MAX_ANSWER_CHARS` let through; answers refused
as too costly are counted (`costly_answers_refused`). Rewards (d1's two): correctness x2.0 and boxed_format x1.0
(0.5 for an <answer>...</answer> pair, 0.5 more when the tagged answer holds a \\boxed{}).
"""

from __future__ import annotations

import functools
import logging
import re

from .answer_format import CHAT_FORMAT, answer_region, before_eos, boxed_or_region, last_boxed
from .base import RewardFn, Task, check_limit, guarded, register_task
from .d1_prompts import math_prompt
from .data_files import data_file, read_records, require_fields

BOXED = "\\boxed"
TEST_FILE = "math500_test.jsonl"  # shipped in dipod/lm/data: the 500 problems and answers
_MAX_ANSWER_CHARS = 300  # MATH answers are short; sympy on long untrusted text is a time sink
_MAX_NESTING = 10
_MAX_EXPONENT_PRODUCT = 10_000
_TOKEN = re.compile(r"-?[0-9]+|\\?[A-Za-z]+|.")
_BIG_FACTORIAL = re.compile(r"([0-9]{4,}|[)}\]])\s*!")
_BIG_BINOMIAL = re.compile(r"binom.*[0-9]{4,}")


def _group_end(text: str, start: int) -> int:
    """Index just past the brace group opening at `start` (or past the text if unbalanced)."""
    depth = 0
    for j in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return j + 1
    return len(text)


def _exponents(text: str) -> list[tuple[str, str, bool]]:
    """(exponent, text after it, whether its base is a bracketed group) for every "^"; the
    exponent is a brace group, else the next token."""
    found = []
    for caret in (i for i, c in enumerate(text) if c == "^"):
        start = caret + 1
        while start < len(text) and text[start] == " ":
            start += 1
        if start < len(text) and text[start] == "{":
            end = _group_end(text, start)
        else:
            token = _TOKEN.match(text, start)
            end = token.end() if token else start
        base = text[:caret].rstrip()[-1:]
        found.append((text[start:end], text[end:].lstrip(), base in (")", "}", "]")))
    return found


def cheap_to_verify(answer: str) -> bool:
    """Refuse the shapes on which sympy's evaluation explodes or its parser crawls: bracket
    nesting deeper than `_MAX_NESTING`, power towers (an exponent holding or followed by "^"),
    powers whose exponents multiply past `_MAX_EXPONENT_PRODUCT`, and factorials or binomials of
    numbers with 4+ digits or of bracketed expressions. MATH answers never need these.

    Exponents multiply only through nesting: a power of a bracketed group may hold powers, so
    the bound is the product of the exponents on bracketed bases times the largest other
    exponent. Sibling powers (the terms of ``x^8 + x^7 + ... + 1``) do not multiply."""
    depth = 0
    for char in answer:
        depth += 1 if char in "{([" else -1 if char in "})]" else 0
        if depth > _MAX_NESTING:
            return False
    if _BIG_FACTORIAL.search(answer) or _BIG_BINOMIAL.search(answer):
        return False
    nested, largest = 1, 1
    for exponent, after, bracketed_base in _exponents(answer):
        if "^" in exponent or after.startswith("^"):
            return False
        value = 1
        for digits in re.findall(r"[0-9]+", exponent):
            value *= max(int(digits), 1) if len(digits) <= 6 else _MAX_EXPONENT_PRODUCT + 1
        if bracketed_base:
            nested *= value
        else:
            largest = max(largest, value)
        if nested * largest > _MAX_EXPONENT_PRODUCT:
            return False
    return True


_refused = 0  # distinct (answer, reference) pairs `cheap_to_verify` kept away from sympy


def costly_answers_refused() -> int:
    """How many distinct answers were graded wrong without parsing because their shape would make
    sympy's work explode (a power tower, a huge factorial, deep nesting)."""
    return _refused


class _DropDisabledTimeoutNotice(logging.Filter):
    # math-verify warns once that its timeout is off; our work bound replaces it, so the line
    # tells a user nothing they can act on.
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


@functools.lru_cache(maxsize=1)
def _math_verify():
    import math_verify  # imported on first use: it pulls in sympy, which most tasks never need

    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_DropDisabledTimeoutNotice())
    return math_verify


@functools.lru_cache(maxsize=4096)
def _parsed_reference(answer: str) -> tuple:
    return tuple(_math_verify().parse(f"{BOXED}{{{answer}}}", parsing_timeout=None))


def _canonical(answer: str) -> str:
    """The answer with spacing, \\left/\\right and \\dfrac/\\tfrac spelling removed."""
    for old, new in (("\\left", ""), ("\\right", ""), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"),
                     ("\\!", ""), ("\\,", ""), ("\\;", ""), (" ", ""), ("\n", "")):
        answer = answer.replace(old, new)
    return answer.rstrip(".")


@functools.lru_cache(maxsize=1 << 14)  # reward, is_correct and the trainer's table all ask
def equivalent(predicted: str, reference: str) -> bool:
    """math-verify equivalence; anything the third-party parser chokes on counts as wrong."""
    global _refused
    if _canonical(predicted) == _canonical(reference):
        return True  # also makes every reference equal to itself, whatever the parser makes of it
    if not cheap_to_verify(predicted):
        _refused += 1
        return False
    math_verify = _math_verify()
    try:
        gold = list(_parsed_reference(reference))
        guess = math_verify.parse(f"{BOXED}{{{predicted}}}", parsing_timeout=None)
        return bool(gold and guess and math_verify.verify(gold, guess, timeout_seconds=None))
    except Exception:  # math-verify/sympy failures on untrusted text mean "not verified"
        return False


@register_task
class Math500Task(Task):
    name = "math500"
    splits = ("test",)

    def __init__(self, hub_config: str | None = None):
        self.hub_config = hub_config

    def load(self, split: str, path: str | None = None, limit: int | None = None) -> list[dict]:
        check_limit(limit)
        if path is None and split == "test":
            path = str(data_file(TEST_FILE))
        if path is None:
            raise ValueError(
                f"math500 split {split!r} has no built-in data (only 'test' is read offline, from {TEST_FILE}): pass a .json/.jsonl/.parquet file with problem and "
                "answer (or solution) fields, or a hub dataset id such as HuggingFaceH4/MATH-500"
            )
        examples = []
        for where, row in read_records(path, split, self.hub_config):
            if limit is not None and len(examples) >= limit:
                break
            require_fields(row, ("problem",), where)
            if row.get("answer") not in (None, ""):
                answer = str(row["answer"]).strip()
            elif row.get("solution"):
                answer = last_boxed(str(row["solution"]))
                if not answer:
                    raise ValueError(f"{where}: no answer field and no \\boxed{{...}} in the solution")
            else:
                raise ValueError(f"{where}: missing field answer (or solution with a \\boxed answer)")
            examples.append({"problem": str(row["problem"]).strip(), "answer": answer})
        return examples

    def compact_prompt(self, example: dict) -> str:
        return example["problem"]

    def chat_prompt(self, example: dict) -> str:
        return (
            f"{example['problem']}\n\n"
            "Inside the answer tags give the final answer in \\boxed{}.\n" + CHAT_FORMAT
        )

    def d1_prompt(self, example: dict, shots: int = 0) -> str:
        if shots:
            raise ValueError("math500 has no few-shot d1 prompt (the paper evaluates it zero-shot); use style d1")
        return math_prompt(example["problem"])

    def demonstration(self, example: dict) -> str:
        return example["answer"]

    def _extract_answer(self, completion: str) -> str | None:
        answer = boxed_or_region(completion)
        if answer is None:
            answer = before_eos(completion).strip()
        return answer if 0 < len(answer) <= _MAX_ANSWER_CHARS else None

    def _reward(self, completion: str, example: dict) -> float:
        answer = self._extract_answer(completion)
        return 1.0 if answer is not None and equivalent(answer, example["answer"]) else 0.0

    def _boxed_format(self, completion: str, example: dict) -> float:
        region = answer_region(completion)
        if region is None:
            return 0.0
        return 1.0 if last_boxed(region) is not None else 0.5

    @property
    def reward_functions(self) -> dict[str, tuple[RewardFn, float]]:
        return {"correctness": (self.reward, 2.0), "boxed_format": (guarded(self._boxed_format), 1.0)}
