"""Property-based tests (hypothesis) of every grader and answer parser in dipod.lm.tasks.

The promises, each over generated inputs rather than a handful of examples:

- countdown: an answer is right when it uses each given number exactly as often as given, in any
  order and any bracketing, and reaches the target; reusing, dropping or adding a number is wrong
  whatever the value; the parser reads back what a tree renders;
- gsm8k / math500: nothing after an end-of-sequence marker is read (a sampler's padding after EOS
  is never an answer); equivalent spellings of one answer agree;
- sudoku4: ``clues_kept`` is the fraction of clue cells copied, the reward the fraction of blank
  cells right (clue cells never count), in the compact and the tagged format;
- hostile text (huge numbers, deep brackets, code, every EOS marker, non-ASCII digits) never
  raises, always gives a reward in [0, 1], and never runs code.

Kept fast: modest ``max_examples``, ``deadline=None`` (no wall-time assertion; a shared CPU is slow).
"""

from __future__ import annotations

import itertools
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import dipod
from dipod.lm.tasks import get_task
from dipod.lm.tasks.answer_format import EOS_MARKERS, before_eos, last_boxed
from dipod.lm.tasks.arithmetic import Node, evaluate, literals, parse_expression
from dipod.lm.tasks.countdown import FORMAT_SCORE
from dipod.lm.tasks.plain_math import read_number

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW_GRADER = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])

COUNTDOWN, GSM8K, MATH500, SUDOKU4 = (get_task(name) for name in ("countdown", "gsm8k", "math500", "sudoku4"))


# -- countdown: expression trees over the given numbers ------------------------------------------------

def _trees(numbers: list[int], draw) -> Node:
    """A random binary tree (+ - *) whose leaves are ``numbers`` in the given order."""
    if len(numbers) == 1:
        return Node(None, numbers[0])
    split = draw(st.integers(1, len(numbers) - 1))
    op = draw(st.sampled_from("+-*"))
    return Node(op, left=_trees(numbers[:split], draw), right=_trees(numbers[split:], draw))


_LEVEL = {"+": 1, "-": 1, "*": 2, "/": 2}


def render(node: Node, minimal: bool) -> str:
    """The tree as text: fully bracketed, or with only the brackets precedence needs."""
    if node.op is None:
        return str(node.value)
    left, right = render(node.left, minimal), render(node.right, minimal)
    if not minimal:
        return f"({left} {node.op} {right})"
    if node.left.op is not None and _LEVEL[node.left.op] < _LEVEL[node.op]:
        left = f"({left})"
    if node.right.op is not None and _LEVEL[node.right.op] <= _LEVEL[node.op]:
        right = f"({right})"
    return f"{left} {node.op} {right}"


@st.composite
def countdown_answers(draw):
    """(the given numbers in the example's order, a tree using each exactly once in another order)."""
    numbers = draw(st.lists(st.integers(1, 6), min_size=2, max_size=4))  # small values: repeats are common
    used = draw(st.permutations(numbers))
    return numbers, _trees(list(used), draw)


@FAST
@given(countdown_answers(), st.booleans(), st.sampled_from(["{}", "<answer>{}</answer>", "\\boxed{{{}}}",
                                                            "{} = TARGET", "<answer>\n{}\n</answer><|eot_id|>7"]))
def test_countdown_any_order_and_bracketing_of_a_right_answer_is_right(answer, minimal, wrapper):
    numbers, tree = answer
    target = evaluate(tree)
    assume(target.denominator == 1 and target >= 0)
    text = wrapper.format(render(tree, minimal)).replace("TARGET", str(target))
    assert COUNTDOWN.reward(text, {"numbers": numbers, "target": int(target)}) == 1.0


@FAST
@given(countdown_answers(), st.sampled_from(["reuse", "drop", "extra"]), st.data())
@example(answer=([2, 2, 5], Node("*", left=Node(None, 2), right=Node(None, 5))), misuse="none", data=None)
def test_countdown_any_misuse_of_the_numbers_is_wrong_whatever_the_value(answer, misuse, data):
    """The tree reaches the example's target but uses the numbers wrongly: never 1.0 (``2*5`` for
    [2, 2, 5] -> 10 uses one 2 only)."""
    numbers, tree = answer
    if misuse == "none":  # the @example: the tree itself already leaves a number out
        misused = tree
    elif misuse == "reuse":  # one number used once more, value unchanged: + n - n
        n = data.draw(st.sampled_from(numbers))
        misused = Node("-", left=Node("+", left=tree, right=Node(None, n)), right=Node(None, n))
    elif misuse == "drop":
        assume(len(numbers) > 2)
        misused = _trees(list(numbers[:-1]), data.draw)
    else:  # a number that is not given: * 1 when 1 is not there
        assume(1 not in numbers)
        misused = Node("*", left=tree, right=Node(None, 1))
    value = evaluate(misused)
    assume(value.denominator == 1 and value >= 0)
    assert sorted(literals(misused)) != sorted(numbers)
    assert COUNTDOWN.reward(render(misused, True), {"numbers": numbers, "target": int(value)}) == FORMAT_SCORE


@FAST
@given(countdown_answers(), st.booleans())
def test_arithmetic_parser_reads_back_what_a_tree_renders(answer, minimal):
    _, tree = answer
    parsed = parse_expression(render(tree, minimal))
    assert evaluate(parsed) == evaluate(tree) and literals(parsed) == literals(tree)


# -- gsm8k / math500: the end-of-sequence cut and equivalent spellings ------------------------------------

junk = st.text(alphabet="0123456789 abc<>/\\{}=.,-", max_size=30)


@FAST
@given(st.integers(-10**6, 10**6), st.sampled_from(EOS_MARKERS), junk,
       st.sampled_from(["{}", "The answer is {}.", "<answer>{}</answer>", "<answer>\n{}", "\\boxed{{{}}}"]))
@example(n=42, marker="<|eot_id|>", after="assistant: 7", wrapper="{}")
def test_gsm8k_never_reads_after_the_end_of_sequence_marker(n, marker, after, wrapper):
    example_ = {"answer": str(n)}
    text = wrapper.format(n)
    assert GSM8K.reward(text, example_) == 1.0
    assert GSM8K.reward(text + marker + after + " 999999999", example_) == 1.0  # what follows EOS is padding
    assert GSM8K.reward(str(n + 1) + marker + text, example_) == 0.0  # the answer after EOS is never read


@FAST
@given(st.integers(-10**7, 10**7),
       st.sampled_from(["{n}", "{comma}", "{n}.0", "{n}.00", "\\boxed{{{n}}}", "<answer> {comma} </answer>",
                        "$ {comma}", "so x = {n}", "\\boxed{{{n}}}<|endoftext|>{other}"]))
def test_gsm8k_equivalent_spellings_of_the_answer_agree(n, form):
    text = form.format(n=n, comma=f"{n:,}", other=n + 3)
    assert GSM8K.reward(text, {"answer": str(n)}) == 1.0
    assert GSM8K.reward(text, {"answer": str(n + 1)}) == 0.0
    assert read_number(f"{n:,}") == Fraction(n)


@SLOW_GRADER
@given(st.integers(1, 60), st.integers(2, 60), st.sampled_from(EOS_MARKERS),
       st.sampled_from(["\\frac{{{p}}}{{{q}}}", "\\dfrac{{{p}}}{{{q}}}", "\\tfrac{{{p}}}{{{q}}}",
                        "\\frac{{ {p} }}{{ {q} }}.", "{p}/{q}"]))  # the last one goes through math-verify
def test_math500_equivalent_spellings_agree_and_nothing_after_eos_is_read(p, q, marker, form):
    answer = Fraction(p, q)
    assume(answer.denominator > 1)
    reference = f"\\frac{{{answer.numerator}}}{{{answer.denominator}}}"
    spelled = form.format(p=answer.numerator, q=answer.denominator)
    example_ = {"answer": reference}
    assert MATH500.reward(f"\\boxed{{{spelled}}}", example_) == 1.0
    assert MATH500.reward(f"\\boxed{{{spelled}}}{marker}\\boxed{{{p + q}}}", example_) == 1.0
    assert MATH500.reward(f"\\boxed{{{p + q}}}{marker}\\boxed{{{spelled}}}", example_) == 0.0


@FAST
@given(st.text(max_size=40), st.sampled_from(EOS_MARKERS), st.text(max_size=40))
def test_before_eos_keeps_exactly_the_text_before_the_first_marker(head, marker, tail):
    assume(not any(m in head + marker[:-1] for m in EOS_MARKERS))  # no earlier marker, none across the seam
    assume(not any((head + marker)[i:].startswith(m) for m in EOS_MARKERS for i in range(len(head))))
    assert before_eos(head + marker + tail) == head


# -- sudoku4: clues kept, scoring per blank ----------------------------------------------------------------

SUDOKU_EXAMPLES = SUDOKU4.load("test", limit=40)


@st.composite
def sudoku_answers(draw):
    """(an example, an answer grid with a chosen set of blanks and clues changed, those sets)."""
    ex = draw(st.sampled_from(SUDOKU_EXAMPLES))
    blanks = [i for i, c in enumerate(ex["puzzle"]) if c == "0"]
    clues = [i for i, c in enumerate(ex["puzzle"]) if c != "0"]
    wrong_blanks = draw(st.sets(st.sampled_from(blanks)))
    changed_clues = draw(st.sets(st.sampled_from(clues)))
    grid = list(ex["solution"])
    for i in wrong_blanks | changed_clues:
        grid[i] = draw(st.sampled_from([d for d in "1234" if d != ex["solution"][i]]))
    return ex, "".join(grid), wrong_blanks, changed_clues


@FAST
@given(sudoku_answers(), st.sampled_from(["{}", "<answer>\n{}\n</answer>", "<answer>{rows}</answer>",
                                          "{}<|eot_id|>1111222233334444"]))
def test_sudoku4_scores_each_blank_and_counts_the_clues_kept(answer, wrapper):
    ex, grid, wrong_blanks, changed_clues = answer
    rows = "\n".join(grid[r:r + 4] for r in range(0, 16, 4))
    text = wrapper.format(grid, rows=rows)
    n_blanks, n_clues = ex["puzzle"].count("0"), 16 - ex["puzzle"].count("0")
    assert SUDOKU4.reward(text, ex) == pytest.approx(1 - len(wrong_blanks) / n_blanks)
    assert SUDOKU4.clues_kept(text, ex) == pytest.approx(1 - len(changed_clues) / n_clues)
    assert SUDOKU4.is_correct(text, ex) == (not wrong_blanks and not changed_clues)


# -- hostile text ------------------------------------------------------------------------------------------

FRAGMENTS = ["<answer>", "</answer>", "</answer}", "<reasoning>", "</reasoning>", "\\boxed{", "\\fbox{", "}", "{",
             "(", ")", "=", "/", "*", "**", "^", "!", "\\frac{", "9" * 60, "1" * 5000, "(" * 500, "{" * 300,
             "\\binom{99999}{5000}", "10^{10^{10}}", "99999!", "__import__('dipod').__dict__.__setitem__('PWNED', 1)",
             "exec('import dipod; dipod.PWNED = 1')", "٣٤", "１２", "\x00", "\ud7ff", *EOS_MARKERS]
hostile = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=12)), max_size=25).map("".join)
EXAMPLES = {
    "countdown": {"numbers": [3, 4, 7], "target": 5},
    "gsm8k": {"answer": "42"},
    "math500": {"answer": "\\frac{3}{4}"},
    "sudoku4": SUDOKU_EXAMPLES[0],
}


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_hostile_text_never_raises_and_never_runs_code(name):
    task, example_ = get_task(name), EXAMPLES[name]

    @(SLOW_GRADER if name == "math500" else FAST)
    @given(hostile)
    def check(text):
        assert task.extract_answer(text) is None or isinstance(task.extract_answer(text), str)
        for score, _ in task.reward_functions.values():
            assert 0.0 <= score(text, example_) <= 1.0
        last_boxed(text), read_number(text), before_eos(text)
        assert not hasattr(dipod, "PWNED")

    check()


@FAST
@given(st.lists(st.sampled_from(["1", "22", "(", ")", "+", "-", "*", "/", " ", "0"]), max_size=40).map("".join))
def test_the_expression_parser_fails_only_with_its_own_error(text):
    from dipod.lm.tasks.arithmetic import ExpressionError

    try:
        value = evaluate(parse_expression(text))
    except ExpressionError:
        return
    assert isinstance(value, Fraction)


def test_every_order_of_three_numbers_is_right():
    """The exhaustive small case beside the sampled ones: every permutation and both bracketings of 2*5+2."""
    for a, b, c in itertools.permutations([2, 5, 2]):
        for text in (f"{a}*{b}+{c}", f"({a}*{b})+{c}", f"{c}+{a}*{b}", f"{c}+({a}*{b})"):
            value = evaluate(parse_expression(text))
            assert COUNTDOWN.reward(text, {"numbers": [2, 2, 5], "target": int(value)}) == 1.0
