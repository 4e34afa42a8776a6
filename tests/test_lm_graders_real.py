"""Graders on real model text: LLaDA-8B-Instruct completions of the paper's four evaluation sets
(../shared/data/llada8b_instruct_outputs, d1 prompt, length 128) must grade to the accuracy the
paper's protocol publishes for them, and each reading rule is pinned by a snippet of real text.

The snippets are cut from those completions (item numbers in the comments); the rules are the
ones `dipod.lm.tasks.answer_format`, `plain_math` and the task modules document."""

from __future__ import annotations

import json
import random
from pathlib import Path
from fractions import Fraction

import pytest

from dipod.lm.tasks import get_task
from dipod.lm.tasks.answer_format import answer_region, before_eos, boxed_or_region, last_boxed
from dipod.lm.tasks.math500 import cheap_to_verify
from dipod.lm.tasks.plain_math import read_number

# real model text is a cross-check kept beside the clone (../shared), never shipped
OUTPUTS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "llada8b_instruct_outputs"
needs_outputs = pytest.mark.skipif(not OUTPUTS.is_dir(), reason=f"{OUTPUTS} not present")

# task -> (file, our task name, published accuracy in %, how far above the published number our
# reading may land, and why). The published number is the d1 paper's for these very completions.
PUBLISHED = {
    "gsm8k": ("gsm8k_len128.jsonl", "gsm8k", 68.7, 0.5,
              # The file holds 1130 of the 1319 questions the published figure averages: the released
              # d1 parser itself reads 70.27% of this file. We also read two thousands-grouped
              # answers it misses (items 243 "43,500" and 914 "385\\,000"): 70.44%.
              ),
    "math500": ("math500_len128.jsonl", "math500", 26.0, 2.0,
                # The released parser compares normalised strings; math-verify also accepts 17
                # answers that are equal as numbers or sets (15.975 = 639/40, 0.25 = \frac14,
                # \frac{3}{24} = \frac18, 8/18 = 4/9, [-2, 7] = x \in [-2,7], C = \text{(C)}, ...).
                # On the released length-256/512 completions the same 17-item gap appears (36.2 -> 39.6).
                ),
    "countdown": ("countdown_len128.jsonl", "countdown", 20.7, 0.0),
    "sudoku": ("sudoku_len128.jsonl", "sudoku4", 11.7, 0.0),
}
TOLERANCE = 1.5  # points


def read_outputs(filename: str) -> list[dict]:
    return [json.loads(line) for line in (OUTPUTS / filename).read_text().splitlines() if line.strip()]


def accuracy(task, rows: list[dict]) -> float:
    """Percent, as the paper reports it (sudoku: correctly filled blank cells over all blanks)."""
    return 100.0 * task.paper_accuracy([row["completion"] for row in rows], rows)


@needs_outputs
@pytest.mark.parametrize("kind", sorted(PUBLISHED))
def test_accuracy_on_real_completions_matches_the_published_protocol(kind):
    filename, name, published, reader_gain = PUBLISHED[kind]
    rows = read_outputs(filename)
    ours = accuracy(get_task(name), rows)
    assert published - TOLERANCE <= ours <= published + TOLERANCE + reader_gain, (kind, ours, published)


@needs_outputs
def test_countdown_format_reward_sees_real_expressions():
    """d1's 0.1 goes to every well-formed expression that misses; real text must earn it."""
    task = get_task("countdown")
    rewards = [task.reward(row["completion"], row) for row in read_outputs("countdown_len128.jsonl")]
    assert sum(r == 0.0 for r in rewards) <= 0.1 * len(rewards)  # 11 of 256 hold no expression
    assert all(r in (0.0, 0.1, 1.0) for r in rewards)


# -- the rules, each on real text ------------------------------------------------------------------

GSM = get_task("gsm8k")
MATH = get_task("math500")
COUNTDOWN = get_task("countdown")
SUDOKU = get_task("sudoku4")


@pytest.mark.parametrize("completion, answer", [
    # 0: the common case, a box inside closed tags, EOS padding after
    ("9 \\times 2 = 18\\) dollars per day.\n</reasoning>\n<answer>\n\\boxed{18}\n</answer><|eot_id|><|endoftext|>", "18"),
    # 10: <answer> opened, EOS before it closes
    ("Adding these amounts together gives $36 + $18 + $34 = $88.\n</reasoning>\n<answer>\n\\boxed{88}<|eot_id|>", "88"),
    # 9: ... and the box itself left open
    ("the number of teachers is \\(180 \\div 5 = 36\\).\n</reasoning>\n<answer>\n\\boxed{36><|eot_id|>", "36"),
    # 3: a stray </answer>, the box written after it (the last box counts)
    ("a speed of 6 / 1 = 6 miles per hour.\n</answer>\n\\boxed{6}<|eot_id|>", "6"),
    # 742: `</answer}`
    ("The class is missing 400 - 255 = 145 points.\n</reasoning>\n<answer>145</answer}<|eot_id|>", "145"),
    # 188: units in the answer
    ("\\( 50 + 80 = 130 \\) dollars.\n</reasoning>\n<answer>\n130 dollars\n</answer><|eot_id|>", "130"),
    # 2: a LaTeX percent sign in the box
    ("(12/20) * 100% = 60%.\n\\boxed{60\\%}\n</answer><|eot_id|>", "60"),
    # 1: \text{ minutes} inside the box
    ("100 minutes + 20 minutes = 120 minutes.\n</reasoning>\n<answer>\n\\boxed{120\\text{ minutes}}\n</answer>", "120"),
    # 243: thousands commas (the released parser reads 43 here)
    ("gives the total cost of Bill's new truck.\n</reasoning>\n<answer>\n\\boxed{43,500}\n</answer><|eot_id|>", "43500"),
    # 914: LaTeX thin space as the thousands separator
    ("500 * $770 = $385,000.\n</reasoning>\n\n\\boxed{385\\,000}<|eot_id|>", "385000"),
    # 61: a negative answer
    ("is \\(-10\\) degrees Fahrenheit.\n</reasoning>\n<answer>\n\\boxed{-10}\n</answer><|eot_id|>", "-10"),
    # 785: an empty box is no answer; the number after it is
    ("\\[\\$65 + \\$36 = \\$101\\]\n</reasoning>\n<answer>\n\\boxed{}101\n</answer><|eot_id|>", "101"),
    # 287: no tags, no box: the last number of the text (as d1 reads it)
    ("Joe has \\(\\frac{21}{3} = 7\\) servings.\n</reasoning>", "7"),
    # a dollar amount written \$4 and an equation in the answer
    ("<answer>\n2 \\times \\$2 = \\$4\n</answer>", "4"),
])
def test_gsm8k_reads_real_answers(completion, answer):
    assert GSM.is_correct(completion, {"question": "q", "answer": answer}), GSM.extract_answer(completion)
    wrong = str(int(answer) + 1)
    assert not GSM.is_correct(completion, {"question": "q", "answer": wrong})


def test_gsm8k_the_last_box_counts_and_eos_ends_the_text():
    # 947: the model boxed again after </answer>; the final box is its final answer
    completion = "180 + 300 + 400 = 880.\n</answer>\\boxed{888}<|eot_id|>"
    assert GSM.extract_answer(completion) == "888"
    assert GSM.extract_answer("<answer>\\boxed{12}</answer><|eot_id|><answer>\\boxed{99}</answer>") == "12"
    assert read_number("1,234.5") == read_number("1234.5") == Fraction(2469, 2)
    assert read_number("\\frac{3}{4}") == read_number("0.75")
    assert read_number("45^\\circ") == read_number("45^{\\circ}") == read_number("45°") == 45
    assert read_number("\\(180 \\div 5 = 36\\)") == 36 and read_number("22 \\times 44 / 88") == 88  # last number
    assert read_number("-1{,}250") == -1250 and read_number("−7") == -7 and read_number("12 \\text{ cm}") == 12
    assert read_number("12,34") is not None and read_number("12,34") != 1234  # not a thousands group
    assert GSM.reward_functions["integer"][0]("<answer>\\boxed{18}</answer>", {"answer": "18"}) == 1.0


@pytest.mark.parametrize("completion, reward", [
    # 0: a box inside the tags
    ("We can subtract 53 from 55 to get 51.\n</reasoning>\n<answer>\n\\boxed{55 - 53}\n</answer><|eot_id|>", 0.1),
    # 193: no box, the expression in the tags (the released parser misses this one)
    ("the expression is 96 - 48 + 26.\n</reasoning>\n<answer>\n96 - 48  + 26\n</answer><|eot_id|>", 1.0),
    # expr = target, LaTeX operators
    ("<answer>\n\\boxed{(96 - 48) \\times 2 - 22 = 74}\n</answer>", 0.1),
    ("<answer>\n\\boxed{96 - 48 + 26 = 74}\n</answer>", 1.0),
    ("<answer>\n\\boxed{96 \\div 48 \\cdot 26 + 22}\n</answer>", 0.1),  # numbers used twice... and 22 not given
    ("<answer>\n\\boxed{\\frac{96}{48} \\times 26 + 22}\n</answer>", 0.1),
    ("<answer>\n$96 - 48 + 26$\n</answer>", 1.0),
    # 1: a truncated reasoning, no expression at all
    ("We can start by trying to use the numbers in a way that allows us to reach the target..\n\n</,<|eot_id|>", 0.0),
])
def test_countdown_reads_real_answers(completion, reward):
    assert COUNTDOWN.reward(completion, {"numbers": [96, 48, 26], "target": 74}) == reward


def test_countdown_latex_operators_evaluate():
    example = {"numbers": [22, 44, 88], "target": 11}
    assert COUNTDOWN.reward("<answer>\\boxed{22 \\times 44 / 88}</answer>", example) == 1.0
    assert COUNTDOWN.reward("<answer>\\boxed{22 \\times 44 / 88 - 0}</answer>", example) == 0.1  # 0 is not given
    assert COUNTDOWN.reward("<answer>\\boxed{\\frac{22 \\times 44}{88}}</answer>", example) == 1.0
    assert COUNTDOWN.reward("<answer>\\boxed{\\frac{22 + 44}{88}}</answer>", example) == 0.1
    assert COUNTDOWN.reward("<answer>\\boxed{88 \\div 44 \\cdot 22}</answer>", {"numbers": [22, 44, 88], "target": 44}) == 1.0


@pytest.mark.parametrize("completion, answer", [
    # 0 (sudoku): 16 digits in closed tags
    ("logical deduction.\n</reasoning>\n<answer>\n1234432121433412\n</answer><|eot_id|>", "1234432121433412"),
    # rows one per line
    ("</reasoning>\n<answer>\n1234\n4321\n2143\n3412\n</answer>", "1234432121433412"),
    # prose around the grid: "4x4" and "R1" are not cells
    ("<answer>\nThe solved 4x4 grid is:\nR1: 1 2 3 4\nR2: 4 3 2 1\nR3: 2 1 4 3\nR4: 3 4 1 2\n</answer>", "1234432121433412"),
    # a stray </answer>, the grid after it
    ("Each 2x2 box contains all digits.\n</answer>\n\n```\n1234432121433412\n```<|eot_id|>", "1234432121433412"),
    # untagged prose holding a written-out grid
    ("To solve this 4x4 Sudoku the grid is 1234432121433412 in the end", "1234432121433412"),
])
def test_sudoku_reads_real_grids(completion, answer):
    example = {"puzzle": "0204032001400402", "solution": "1234432121433412"}
    assert SUDOKU.extract_answer(completion) == answer
    assert SUDOKU.reward(completion, example) == 1.0


def test_sudoku_prose_digits_never_enter_the_grid():
    example = {"puzzle": "0204032001400402", "solution": "1234432121433412"}
    prose = "To solve this 4x4 Sudoku puzzle, fill in digits 1-4 in each 2x2 box.<|eot_id|>"
    assert SUDOKU.extract_answer(prose) is None and SUDOKU.reward(prose, example) == 0.0
    assert SUDOKU.extract_answer("<answer>\nthe 4x4 grid 1234 4321 2143 3412\n</answer>") == "1234432121433412"


@pytest.mark.parametrize("completion, reference", [
    ("The answer is $2$ units.\n</reasoning>\n<answer>\n\\boxed{2}\n</answer><|eot_id|>", "2"),
    ("<answer>\n\\boxed{15.975}\n</answer>", "\\frac{639}{40}"),  # item 33
    ("<answer>\n\\boxed{\\frac{3}{24}}\n</answer>", "\\frac{1}{8}"),  # item 72
    ("<answer>\n\\boxed{[-2, 7]}\n</answer>", "x \\in [-2,7]"),  # item 414
    ("<answer>\n\\boxed{36.00}\n</answer>", "\\$36"),  # item 202
    ("<answer>\n\\boxed{x^8 + x^7 + x^6 + x^5 + x^4 + x^3 + x^2 + x + 1}\n</answer>",
     "x^8 + x^7 + x^6 + x^5 + x^4 + x^3 + x^2 + x + 1"),
    ("<answer>\n\\boxed{1 + x + x^2 + x^3 + x^4 + x^5 + x^6 + x^7 + x^8}\n</answer>",
     "x^8 + x^7 + x^6 + x^5 + x^4 + x^3 + x^2 + x + 1"),
    ("<answer>\n\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
])
def test_math500_reads_real_answers(completion, reference):
    assert MATH.is_correct(completion, {"problem": "p", "answer": reference})


def test_every_math500_reference_grades_correct_against_itself():
    from dipod.lm.tasks.data_files import data_file

    rows = [json.loads(line) for line in data_file("math500_test.jsonl").read_text().splitlines()]
    failing = [r["answer"] for r in rows if not MATH.is_correct(f"<answer>\\boxed{{{r['answer']}}}</answer>", r)]
    assert failing == []


def test_reading_helpers_on_edge_cases():
    assert before_eos("a<|endoftext|>b<|eot_id|>c") == "a"
    assert answer_region("no tags") is None
    assert answer_region("<answer>\n\n</answer> <answer>") == ""  # reopened and empty
    assert answer_region("<answer> 7 </answer> then <answer>") == "7"
    assert answer_region("<reasoning>x = 3</reasoning> 3 </answer>") == "3"
    assert last_boxed("\\boxed{\\frac{1}{2}} and \\boxed{a{b}c}") == "a{b}c"
    assert last_boxed("\\boxed 5$.") == "5" and last_boxed("\\boxed{") is None and last_boxed("\\fbox{4}") == "4"
    assert boxed_or_region("<answer>\\boxed{}</answer>") == "\\boxed{}"  # an empty box is no answer


# -- hostile text: every task, every reward function, bounded time --------------------------------

def hostile_real_shaped() -> list[str]:
    rng = random.Random(3)
    near_limit = 190_000  # just under MAX_COMPLETION_CHARS: parsed, not refused
    return [
        "<answer>\\boxed{9^{9^{9}}}</answer>", "<answer>\\boxed{9**9**9}</answer>",
        "<answer>\\boxed{(9^{9999})^{9999}}</answer>", "<answer>\\boxed{((2^{99})^{99})^{99}}</answer>",
        "\\boxed{" + "9" * 5000 + "}", "<answer>" + "1," * (near_limit // 2) + "</answer>",
        "<answer>" + "1=" * (near_limit // 2) + "</answer>", "\\text{ " * (near_limit // 7),
        "\\frac{" * (near_limit // 6), "<answer>\\boxed{" + "{" * 50_000 + "1" + "}" * 50_000 + "}</answer>",
        "<answer>" + "1234 " * (near_limit // 5), "</answer" * (near_limit // 8), "<|eot_id|>" * 1000,
        bytes(rng.randrange(256) for _ in range(near_limit)).decode("latin-1"),
        "".join(chr(rng.randrange(0x110000)) for _ in range(20_000)).encode("utf-8", "replace").decode("utf-8", "replace"),
        "<answer>\\boxed{" + "x^{2}+" * 40 + "1}</answer>",
    ]


@pytest.mark.parametrize("name", ["gsm8k", "math500", "countdown", "sudoku4"])
def test_hostile_real_shaped_text_scores_in_unit_interval(name, monkeypatch):
    task = get_task(name)
    example = {"gsm8k": {"answer": "18"}, "math500": {"answer": "\\frac{1}{2}"},
               "countdown": {"numbers": [96, 48, 26], "target": 74},
               "sudoku4": {"puzzle": "0204032001400402", "solution": "1234432121433412"}}[name]
    # Work, not time, bounds the grader: every text that reaches sympy passed the shape check.
    reached_sympy = _spy_on_math_verify(monkeypatch)
    for completion in hostile_real_shaped():
        scores = [task.reward(completion, example)] + [fn(completion, example) for fn, _ in task.reward_functions.values()]
        assert all(0.0 <= s <= 1.0 for s in scores), (name, completion[:60], scores)
    assert all(len(text) <= 300 + len("\\boxed{}") and cheap_to_verify(text[len("\\boxed{"):-1]) for text in reached_sympy)


def _spy_on_math_verify(monkeypatch) -> list[str]:
    """Record every string math-verify is asked to parse (the grader's only way into sympy)."""
    import math_verify

    from dipod.lm.tasks import math500

    seen: list[str] = []
    real_parse = math_verify.parse

    def parse(text, *args, **kwargs):
        seen.append(text)
        assert kwargs.get("parsing_timeout", 5) is None, "a clock must not decide a verdict"
        return real_parse(text, *args, **kwargs)

    monkeypatch.setattr(math_verify, "parse", parse)
    math500.equivalent.cache_clear()
    math500._parsed_reference.cache_clear()
    return seen


def test_math500_verdicts_do_not_depend_on_a_clock(monkeypatch):
    """The answer that flipped to False under load (math-verify's 1 s timeout) is right, and no
    timeout is handed to math-verify; pathological shapes are refused before sympy and counted."""
    from dipod.lm.tasks import math500

    reached_sympy = _spy_on_math_verify(monkeypatch)
    reference = "x^8+x^7+x^6+x^5+x^4+x^3+x^2+x+1"
    assert MATH.is_correct("<answer>\\boxed{1 + x + x^2 + x^3 + x^4 + x^5 + x^6 + x^7 + x^8}</answer>",
                           {"problem": "p", "answer": reference})
    assert reached_sympy, "the reordered polynomial must be compared by math-verify, not by text"
    before = math500.costly_answers_refused()
    assert not MATH.is_correct("<answer>\\boxed{((2^{99})^{99})^{99}}</answer>", {"problem": "p", "answer": "1"})
    assert math500.costly_answers_refused() == before + 1
    assert not any("99" in text for text in reached_sympy)
