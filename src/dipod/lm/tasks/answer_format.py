"""Where the answer sits in a completion, and d1's format rewards.

One reading for every task, written for real instruct-model text (LLaDA-8B-Instruct under the d1
prompt) and the tiny model's compact completions alike:

* the text ends at the first end-of-sequence marker (``<|eot_id|>``, ``<|endoftext|>``, ...);
  what a sampler writes after EOS is padding, never an answer;
* the answer region is the text after the last ``<answer>``, up to the next closing tag or the end
  of the text (real completions often open ``<answer>`` and hit EOS). A closing tag is anything
  starting with ``</answer`` (``</answer}`` is a common typo). With no opening tag but a stray
  closing tag, the region is what precedes the last closing tag, after ``</reasoning>`` if that
  is there; with no tag at all there is no region, and a task reads the whole text (compact
  format: the tiny model writes the answer itself and stops at EOS);
* math answers: the content of the last non-empty ``\\boxed{...}`` before EOS (balanced
  braces; the final box, also when a model boxes again after ``</answer>``), else the region.

Everything here is linear in the completion length (``str.find``/``rfind``/``count`` and one
brace scan, no backtracking regular expressions), so hostile completions cannot stall a trainer.
"""

from __future__ import annotations

OPEN, CLOSE = "<answer>", "</answer>"
CLOSE_STEM = "</answer"  # also catches `</answer}` and `</answer >`
REASONING_OPEN, REASONING_CLOSE = "<reasoning>", "</reasoning>"
EOS_MARKERS = ("<|eot_id|>", "<|endoftext|>", "<|end_of_text|>", "<|im_end|>", "<|eom_id|>", "</s>")
BOXES = ("\\boxed", "\\fbox")

CHAT_FORMAT = (
    "Think step by step, then give the final answer. Respond in exactly this format:\n"
    "<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>"
)


def before_eos(completion: str) -> str:
    """The completion up to its first end-of-sequence marker."""
    end = len(completion)
    for marker in EOS_MARKERS:
        at = completion.find(marker, 0, end)
        if at >= 0:
            end = at
    return completion[:end]


def tagged_answer(completion: str) -> str | None:
    """Content of the last complete <answer>...</answer> pair, stripped; None without one."""
    end = completion.rfind(CLOSE)
    if end < 0:
        return None
    start = completion.rfind(OPEN, 0, end)
    if start < 0:
        return None
    return completion[start + len(OPEN) : end].strip()


def answer_region(completion: str) -> str | None:
    """The answer region by the rules above (stripped), or None when the text has no answer tag."""
    text = before_eos(completion)
    start = text.rfind(OPEN)
    if start >= 0:
        body = text[start + len(OPEN) :]
        end = body.find(CLOSE_STEM)
        region = (body if end < 0 else body[:end]).strip()
        # An empty last region (the model reopened the tag and stopped) falls back to the last
        # closed pair, which holds the answer it did give.
        return region or tagged_answer(text) or ""
    end = text.rfind(CLOSE_STEM)
    if end < 0:
        return None
    body = text[:end]
    reasoning_end = body.rfind(REASONING_CLOSE)
    return (body if reasoning_end < 0 else body[reasoning_end + len(REASONING_CLOSE) :]).strip()


def answer_text(completion: str) -> str:
    """The answer region, or the whole text before EOS when there is none (compact format)."""
    region = answer_region(completion)
    return before_eos(completion).strip() if region is None else region


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) with balanced braces, stripped;
    ``\\boxed 5`` (no braces) gives the token after it. None when there is no complete box."""
    start, name = max((text.rfind(box), box) for box in BOXES)
    if start < 0:
        return None
    i = j = start + len(name)
    while j < len(text) and text[j] == " ":
        j += 1
    if j < len(text) and text[j] == "{":
        depth = 0
        for k in range(j, len(text)):
            if text[k] == "{":
                depth += 1
            elif text[k] == "}":
                depth -= 1
                if depth == 0:
                    return text[j + 1 : k].strip()
        return None
    if j > i:  # "\\boxed 5"
        token = text[j:].split(None, 1)
        return (token[0].rstrip("$.") or None) if token else None
    return None


def boxed_or_region(completion: str) -> str | None:
    """Math-style answer: the last non-empty box before EOS, else the answer region; None when
    the text has neither (the caller decides what untagged text means)."""
    text = before_eos(completion)
    boxed = last_boxed(text)
    return boxed if boxed else answer_region(text)


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
