"""Our graders against the paper's released parser (d1/SPG ``eval/parse_and_get_acc.py``), item by item,
on real LLaDA-8B-Instruct completions (../shared/data/llada8b_instruct_outputs).

The released rules are restated below in plain Python (read from the release, not copied); that they
reproduce the release is checked by their totals, which must equal the released parser's published
numbers on these files (docs/lm_tasks.md). Then every item's verdict must agree with ours, except
the pinned items, each with the reason we read it differently. A grader change that flips any other
item fails here, even when the aggregate stays within a point.

The helpers of the release's ``parser_helper.py`` (the MATH normaliser ``is_equiv``, the box
readers) are restated the same way, with their quirks: an expression without a box is read as the
whole text, and any exception inside the normaliser falls back to comparing the raw strings.
"""

from __future__ import annotations

import ast
import json
import operator
import re
from pathlib import Path

import pytest

from dipod.lm.tasks import get_task

# real model text is a cross-check kept beside the clone (../shared), never shipped
OUTPUTS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "llada8b_instruct_outputs"
pytestmark = pytest.mark.skipif(not OUTPUTS.is_dir(), reason=f"{OUTPUTS} not present")


def read_outputs(filename: str) -> list[dict]:
    return [json.loads(line) for line in (OUTPUTS / filename).read_text().splitlines() if line.strip()]


# ---- the released rules, restated ----------------------------------------------------------------

_NUMBER = r"-?\d+\.?\d*"


def _float_or_number(text: str, pick: int) -> float | None:
    """The text as a float, else its ``pick``-th number (0: first, -1: last), else None."""
    try:
        return float(text)
    except ValueError:
        numbers = re.findall(_NUMBER, text)
        return float(numbers[pick]) if numbers else None


def released_gsm8k_answer(text: str) -> float | None:
    """The FIRST box that reads as a number (whole, else its first number); else the first closed
    ``<answer>`` region (whole, else its last number); else the text after the last ``<answer>`` and
    before the next ``</answer>``."""
    for boxed in re.findall(r"\\boxed{(.*?)}", text):
        boxed = boxed.strip()
        if boxed and not re.fullmatch(r"\.+", boxed):
            value = _float_or_number(boxed, 0)
            if value is not None:
                return value
    region = re.search(r"<answer>(.*?)</answer>", text, re.DOTALL)
    if region and region.group(1).strip():
        value = _float_or_number(region.group(1).strip(), -1)
        if value is not None:
            return value
    tail = text.split("<answer>")[-1].split("</answer>")[0].strip()
    return _float_or_number(tail, -1) if tail else None


def last_boxed_span(text: str) -> str | None:
    """The MATH helper ``last_boxed_only_string`` as d1 ships it: ``\\boxed X`` up to a ``$`` when the
    text has a ``\\boxed `` (with a space); else the last ``\\boxed`` (or ``\\fbox``) through its
    balanced closing brace, None when it never closes; the WHOLE text when there is no box at all."""
    if "\\boxed " in text:
        return "\\boxed " + text.split("\\boxed ")[-1].split("$")[0]
    start = text.rfind("\\boxed")
    if start < 0:
        start = text.rfind("\\fbox")
        if start < 0:
            return text
    depth = 0
    for i in range(start, len(text)):
        depth += (text[i] == "{") - (text[i] == "}")
        if text[i] == "}" and depth == 0:
            return text[start:i + 1]
    return None


def strip_box(span: str | None) -> str:
    """The MATH helper ``remove_boxed``: the inside of ``\\boxed{...}`` (or what follows ``\\boxed ``),
    anything else unchanged; None raises (a TypeError in the release, caught by its callers)."""
    if span is None:
        raise ValueError("no closed box")
    if "\\boxed " in span:
        return span[len("\\boxed "):]
    if span.startswith("\\boxed{") and span.endswith("}"):
        return span[len("\\boxed{"):-1]
    return span


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos}


def _arith(node):
    if isinstance(node, ast.Expression):
        return _arith(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_arith(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _arith(node.left), _arith(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 64:
            raise ValueError("power too large to evaluate here")
        return _OPS[type(node.op)](left, right)
    raise ValueError("not arithmetic")


def released_countdown_correct(text: str, numbers: list[int], target: int) -> bool:
    """The last box (the whole text when there is none); when the box never closes, the first closed
    ``<answer>`` region, else the whole text; LaTeX operators to
    Python; the part before ``= number`` when present; the numbers used must be exactly the given
    multiset; the value within 1e-5 of the target (the release evaluates with ``eval`` after a
    character check; we walk the same arithmetic)."""
    try:
        equation = strip_box(last_boxed_span(text))
    except ValueError:
        region = re.search(r"<answer>(.*?)</answer>", text, re.DOTALL)
        equation = region.group(1).strip() if region else text
    equation = equation.replace("\\div", "/").replace("\\times", "*").replace("\\cdot", "*")
    lhs = re.search(r"([0-9+\-*/() ]+)=[0-9. ]+", equation)
    if lhs:
        equation = lhs.group(1).strip()
    if sorted(int(n) for n in re.findall(r"\d+", equation)) != sorted(numbers):
        return False
    if not re.match(r"^[\d+\-*/().\s]+$", equation):
        return False
    try:
        value = _arith(ast.parse(equation.strip(), mode="eval"))
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, TypeError):
        return False
    return abs(value - target) < 1e-5


_SUDOKU_PATTERNS = (
    r"<answer>.*?```\s*([\d\s]+)```",
    r"<answer>(.*?)(?:<\|eot_id\|>|<\|endoftext\|>|</answer>)",
    r"</answer>\s*(.*?)(?:<\|eot_id\|>|<\|endoftext\|>|$)",
    r".*?(\d{16})\s*</answer>",
    r"\b(\d{16})\b",
)


def released_sudoku_cells(text: str, puzzle: str, solution: str) -> int:
    """Blank cells filled correctly: the first pattern with a non-blank group, whitespace removed,
    cut or 0-padded to 16 characters, compared position by position."""
    answer = ""
    for pattern in _SUDOKU_PATTERNS:
        match = re.search(pattern, text, re.DOTALL)
        if match and match.group(1).strip():
            answer = match.group(1).strip()
            break
    answer = re.sub(r"\s", "", answer)
    if not answer:
        return 0
    answer = answer[:16].ljust(16, "0")
    return sum(answer[i] == solution[i] for i, c in enumerate(puzzle) if c == "0")


def _braced_sqrt(s: str) -> str:
    """``\\sqrt3`` -> ``\\sqrt{3}`` (IndexError on a trailing ``\\sqrt``, as the release)."""
    head, *rest = s.split("\\sqrt")
    return head + "".join("\\sqrt" + (part if part[0] == "{" else "{" + part[0] + "}" + part[1:]) for part in rest)


def _braced_fracs(s: str) -> str:
    """``\\frac12`` -> ``\\frac{1}{2}``, ``\\frac1{2}`` -> ``\\frac{1}{2}``; a ``\\frac`` with under two
    characters after it leaves the whole string as it was."""
    head, *rest = s.split("\\frac")
    out = head
    for part in rest:
        out += "\\frac"
        if part[0] == "{":
            out += part
        elif len(part) < 2:
            return s
        elif part[1] != "{":
            out += "{" + part[0] + "}{" + part[1] + "}" + part[2:]
        else:
            out += "{" + part[0] + "}" + part[1:]
    return out


def _slash_as_frac(s: str) -> str:
    """``a/b`` of two integers -> ``\\frac{a}{b}``; ValueError when either side is not an integer."""
    parts = s.split("/")
    if len(parts) != 2:
        return s
    a, b = int(parts[0]), int(parts[1])
    return "\\frac{" + str(a) + "}{" + str(b) + "}" if s == f"{a}/{b}" else s


def math_normal_form(s: str) -> str:
    """The MATH normaliser's rewrite, step by step in the release's order."""
    for old, new in (("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac"),
                     ("\\left", ""), ("\\right", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("\\$", "")):
        s = s.replace(old, new)
    if "\\text{ " in s:  # units on the right; more than one is an error (the raw strings are compared)
        parts = s.split("\\text{ ")
        if len(parts) != 2:
            raise ValueError("several \\text{ ")
        s = parts[0]
    s = s.replace("\\%", "").replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:  # "k = 5" -> "5"
        s = sides[1]
    s = _braced_fracs(_braced_sqrt(s).replace(" ", ""))
    return _slash_as_frac("\\frac{1}{2}" if s == "0.5" else s)


def released_math_correct(text: str, reference: str) -> bool:
    try:
        answer = strip_box(last_boxed_span(text))
    except ValueError:
        answer = None
    if not answer:
        region = re.search(r"<answer>(.*?)</answer>", text, re.DOTALL)
        answer = region.group(1).strip() if region else answer
    if answer is None:
        return False
    try:
        return math_normal_form(answer) == math_normal_form(reference)
    except Exception:  # the release compares the raw strings when its normaliser fails
        return answer == reference


# ---- item by item -------------------------------------------------------------------------------

def _disagreements(ours: list, released: list) -> dict[int, tuple]:
    return {i: (a, b) for i, (a, b) in enumerate(zip(ours, released)) if a != b}


def test_gsm8k_verdicts_item_by_item():
    rows, task = read_outputs("gsm8k_len128.jsonl"), get_task("gsm8k")
    released = []
    for row in rows:
        value = released_gsm8k_answer(row["completion"])
        released.append(value is not None and value == float(row["answer"]))
    assert sum(released) == 794  # 70.27% of 1130: the released parser's own figure on this file
    ours = [task.is_correct(row["completion"], row) for row in rows]
    # 243 "\boxed{43,500}" and 914 "\boxed{385\,000}": thousands groups, which the release reads as 43 and 385
    assert _disagreements(ours, released) == {243: (True, False), 914: (True, False)}


def test_countdown_verdicts_item_by_item():
    rows, task = read_outputs("countdown_len128.jsonl"), get_task("countdown")
    released = [released_countdown_correct(row["completion"], row["numbers"], row["target"]) for row in rows]
    assert sum(released) == 53  # 20.70% of 256
    ours = [task.is_correct(row["completion"], row) for row in rows]
    # 193: "96 - 48  + 26" in closed tags without a box; the release, finding no box, reads the whole
    # text, whose other numbers break its "exactly the given numbers" check
    assert _disagreements(ours, released) == {193: (True, False)}


def test_sudoku_cells_item_by_item():
    rows, task = read_outputs("sudoku_len128.jsonl"), get_task("sudoku4")
    released = [released_sudoku_cells(row["completion"], row["puzzle"], row["solution"]) for row in rows]
    blanks = sum(row["puzzle"].count("0") for row in rows)
    assert round(100 * sum(released) / blanks, 2) == 11.72
    ours = [round(task.reward(row["completion"], row) * row["puzzle"].count("0")) for row in rows]
    # 184: "<answer>\n<answer>\n132132132132132132": the release keeps the second tag's letters in the grid
    assert _disagreements(ours, released) == {184: (1, 0)}
    assert task.extract_answer(rows[184]["completion"]) == "1321321321321321"  # an over-long grid: its first 16


def test_math500_verdicts_item_by_item():
    rows, task = read_outputs("math500_len128.jsonl"), get_task("math500")
    released = [released_math_correct(row["completion"], row["answer"]) for row in rows]
    assert sum(released) == 130  # 26.00% of 500
    ours = [task.is_correct(row["completion"], row) for row in rows]
    # math-verify accepts answers equal as numbers, sets or intervals that the string normaliser misses
    assert _disagreements(ours, released) == PINNED_MATH500


# item: (ours, the release's), each because the release compares normalised strings and reads a text
# without a box as a whole; ours reads the last box or the tags and compares values with math-verify.
PINNED_MATH500 = {
    33: (True, False),  # 15.975 = \frac{639}{40}
    46: (True, False),  # 0.25 = \frac14
    72: (True, False),  # \frac{3}{24} = \frac{1}{8}
    131: (True, False),  # \boxed{8 + 8 + 15 = 31 units}: the value after the last "="
    202: (True, False),  # 36.00 = \$36
    226: (True, False),  # \frac{6}{3} = 2
    231: (True, False),  # 1.5 = \frac{3}{2}
    238: (True, False),  # 58500 = 58,500
    247: (True, False),  # 2516 for 2516_8 (the question asks for base 8; the digits are right)
    251: (True, False),  # \frac{1}{4} in tags without a box: the release compares the whole text
    311: (True, False),  # \frac{8}{84} = \frac{2}{21}
    312: (True, False),  # C = \text{(C)}
    348: (True, False),  # \frac{2240}{78125} = \frac{448}{15625}
    351: (True, False),  # 8/18 = \frac{4}{9}
    406: (True, False),  # "\boxed{23>" never closes: we read its 23, the release the whole text
    414: (True, False),  # [-2, 7] = x \in [-2,7]
    441: (True, False),  # 0.09 = \frac{9}{100}
}
