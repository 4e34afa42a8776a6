"""Turning the LaTeX and prose that models wrap around an answer into plain arithmetic text.

Real completions write ``130 dollars``, ``60\\%``, ``\\$4``, ``12 \\text{ cm}``, ``45^\\circ``,
``22 \\times 44 / 88``, ``1,000`` or ``\\frac{3}{4}``. `plain_math` rewrites operators, fractions,
currency, percent and degree signs, and unwraps ``\\text{...}`` (keeping its words, which number
reading then skips); `read_number` finds the number an answer states. Every step is a literal
replacement or a regular expression without nested quantifiers, so the cost is linear in the text.
"""

from __future__ import annotations

import re
from fractions import Fraction

MAX_NUMBER_DIGITS = 40  # longer "numbers" are garbage (and int() of 4300+ digits raises)

_REPLACEMENTS = (
    ("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\:", ""), ("{,}", ""),
    ("\\times", "*"), ("\\cdot", "*"), ("\\ast", "*"), ("×", "*"), ("·", "*"), ("∗", "*"),
    ("\\div", "/"), ("÷", "/"), ("−", "-"), ("–", "-"), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"),
    ("^{\\circ}", ""), ("^\\circ", ""), ("\\circ", ""), ("°", ""), ("\\%", ""), ("%", ""),
    ("\\$", ""), ("$", ""), ("\\(", ""), ("\\)", ""), ("\\[", ""), ("\\]", ""),
)
_TEXT_COMMAND = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_FRACTION = re.compile(r"\\frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def plain_math(text: str) -> str:
    """`text` with LaTeX operators as ``* /``, ``\\frac{a}{b}`` as ``(a)/(b)``, unit wrappers
    unwrapped, and currency, percent and degree signs, LaTeX spacing and math delimiters removed."""
    text = _TEXT_COMMAND.sub(r" \1 ", text)
    for old, new in _REPLACEMENTS:
        text = text.replace(old, new)
    return _FRACTION.sub(r"(\1)/(\2)", text)


def _number(token: str) -> Fraction | None:
    digits = len(token) - token.count("-") - token.count(".")
    return Fraction(token) if digits <= MAX_NUMBER_DIGITS else None


def read_number(text: str, pick: str = "last") -> Fraction | None:
    """The number an answer states: the whole text when it is one number (``-1,234.50``, ``3/4``),
    else the `pick` ("first" or "last") number of the part after the last ``=``; None without one.
    Commas that group thousands are dropped first, so ``1,000`` is one number."""
    text = _THOUSANDS.sub("", plain_math(text))
    text = text[text.rfind("=") + 1 :].strip().rstrip(".").strip()
    if _NUMBER.fullmatch(text):
        return _number(text)
    numerator, slash, denominator = text.replace("(", "").replace(")", "").partition("/")
    if slash and _NUMBER.fullmatch(numerator.strip()) and re.fullmatch(r"\d+", denominator.strip()):
        bottom = _number(denominator.strip())
        top = _number(numerator.strip())
        return top / bottom if top is not None and bottom else None
    numbers = _NUMBER.findall(text)
    if not numbers:
        return None
    return _number(numbers[0] if pick == "first" else numbers[-1])
