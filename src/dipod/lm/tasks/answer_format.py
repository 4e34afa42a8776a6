"""Where the answer sits in a completion, and d1's format rewards.

One rule for every task, so compact completions (tiny model) and instruct-model completions are
read the same way:

* if the completion contains ``<answer>`` ... ``</answer>``, the answer is the text between the
  last ``</answer>`` and the last ``<answer>`` before it, stripped (instruct models, d1 format);
* otherwise the whole completion, stripped, is the answer (compact format: the tiny model writes
  the answer itself and stops at EOS).

Everything here is linear in the completion length (``str.find``/``rfind``/``count``, no
backtracking regular expressions), so hostile completions cannot stall the trainer.
"""

from __future__ import annotations

OPEN, CLOSE = "<answer>", "</answer>"
REASONING_OPEN, REASONING_CLOSE = "<reasoning>", "</reasoning>"

CHAT_FORMAT = (
    "Think step by step, then give the final answer. Respond in exactly this format:\n"
    "<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>"
)


def tagged_answer(completion: str) -> str | None:
    """Content of the last complete <answer>...</answer> pair, stripped; None without one."""
    end = completion.rfind(CLOSE)
    if end < 0:
        return None
    start = completion.rfind(OPEN, 0, end)
    if start < 0:
        return None
    return completion[start + len(OPEN) : end].strip()


def answer_text(completion: str) -> str:
    """The answer part of a completion by the rule above (tagged if present, else compact)."""
    tagged = tagged_answer(completion)
    return completion.strip() if tagged is None else tagged


def soft_format(completion: str) -> float:
    """1.0 when the completion starts with <reasoning>...</reasoning>, then (after optional
    whitespace) <answer>...</answer>; the same set of strings d1's soft-format regex accepts."""
    if not completion.startswith(REASONING_OPEN):
        return 0.0
    close = completion.find(REASONING_CLOSE, len(REASONING_OPEN))
    while close >= 0:
        i = close + len(REASONING_CLOSE)
        while i < len(completion) and completion[i].isspace():
            i += 1
        if completion.startswith(OPEN, i):
            # Later candidates lie further right, so they cannot find a closing tag this one misses.
            return 1.0 if completion.find(CLOSE, i + len(OPEN)) >= 0 else 0.0
        close = completion.find(REASONING_CLOSE, i)
    return 0.0


def strict_format(completion: str) -> float:
    """1.0 for exactly "<reasoning>\\n...\\n</reasoning>\\n<answer>\\n...\\n</answer>\\n" (like
    d1's anchored regex, whose `$` also lets one extra newline follow)."""
    head, middle, tail = "<reasoning>\n", "\n</reasoning>\n<answer>\n", "\n</answer>\n"
    candidates = [completion, completion[:-1]] if completion.endswith("\n\n") else [completion]
    for text in candidates:
        if text.startswith(head) and text.endswith(tail):
            # The earliest middle marker after the head leaves the most room for the answer.
            middle_at = text.find(middle, len(head))
            if 0 <= middle_at and middle_at + len(middle) <= len(text) - len(tail):
                return 1.0
    return 0.0


def xml_count(completion: str) -> float:
    """d1-style tag-count reward in [0, 1]: a quarter for each of the four tags written once
    with its newlines, minus 0.002 per character after the closing answer tag (floored at 0)."""
    score = 0.0
    if completion.count("<reasoning>\n") == 1:
        score += 0.25
    if completion.count("\n</reasoning>\n") == 1:
        score += 0.25
    if completion.count("\n<answer>\n") == 1:
        score += 0.25
    if completion.count("\n</answer>") == 1:
        score += 0.25
        trailing = len(completion) - completion.rfind("\n</answer>") - len("\n</answer>")
        score -= 0.002 * max(trailing - 1, 0)
    return max(score, 0.0)
