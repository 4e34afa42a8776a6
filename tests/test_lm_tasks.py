"""Tests of dipod.lm.tasks: generated data is sound (checked by independent brute force), rewards
take exact values on hand-made completions, data files are read and their errors name the line,
and no completion (random, hostile, enormous) makes a reward raise, hang or leave [0, 1]."""

from __future__ import annotations

import itertools
import json
import math
import random
import re
from fractions import Fraction
from pathlib import Path

import pytest

from dipod.lm.tasks import MAX_COMPLETION_CHARS, Task, get_task, register_task, registered_tasks
from dipod.lm.tasks.answer_format import CHAT_FORMAT
from dipod.lm.tasks.arithmetic import ExpressionError, evaluate, literals, parse_expression
from dipod.lm.tasks.data_files import PACKAGED_DATA
from dipod.lm.tasks.sudoku4 import all_grids

FIXTURES = Path(__file__).parent / "fixtures"

SUDOKU = {"puzzle": "3102200002100320", "solution": "3142243142131324"}  # first row of the d1 set
COUNTDOWN = {"numbers": [30, 100, 93], "target": 23}


# -- independent brute-force oracles (share no code with the package) ----------------------------

def sudoku_units():
    rows = [[r * 4 + c for c in range(4)] for r in range(4)]
    cols = [[r * 4 + c for r in range(4)] for c in range(4)]
    boxes = [[(br + r) * 4 + bc + c for r in range(2) for c in range(2)] for br in (0, 2) for bc in (0, 2)]
    return rows + cols + boxes


UNITS = sudoku_units()


def is_valid_grid(grid: str) -> bool:
    return all(sorted(grid[i] for i in unit) == list("1234") for unit in UNITS)


def count_sudoku_solutions(puzzle: str, cap: int = 2) -> int:
    """Plain backtracking over the blanks, stopping once `cap` solutions are found."""
    cells = list(puzzle)
    blanks = [i for i, c in enumerate(cells) if c == "0"]
    peers = {i: {j for unit in UNITS if i in unit for j in unit if j != i} for i in range(16)}
    found = 0

    def fill(k: int) -> None:
        nonlocal found
        if found >= cap:
            return
        if k == len(blanks):
            found += 1
            return
        cell = blanks[k]
        for digit in "1234":
            if all(cells[p] != digit for p in peers[cell]):
                cells[cell] = digit
                fill(k + 1)
                cells[cell] = "0"

    if all(cells[p] != cells[i] for i in range(16) if cells[i] != "0" for p in peers[i]):
        fill(0)
    return found


def countdown_values(numbers: list[int]) -> set[Fraction]:
    """All values of ((a o b) o c) and (a o (b o c)) over orderings of three numbers."""
    ops = {
        "+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y,
        "/": lambda x, y: x / y if y != 0 else None,
    }
    values = set()
    for a, b, c in itertools.permutations(Fraction(n) for n in numbers):
        for f, g in itertools.product(ops.values(), repeat=2):
            left = f(a, b)
            if left is not None and (v := g(left, c)) is not None:
                values.add(v)
            right = g(b, c)
            if right is not None and (v := f(a, right)) is not None:
                values.add(v)
    return values


# -- registry ------------------------------------------------------------------------------------

def test_registry_lists_the_builtin_tasks_and_names_them_on_unknown():
    assert {"sudoku4", "countdown", "gsm8k", "math500"} <= set(registered_tasks())
    with pytest.raises(ValueError, match=r"unknown task 'sudoko4'.*countdown.*gsm8k.*math500.*sudoku4"):
        get_task("sudoko4")


def test_limits_splits_styles_and_task_names_are_checked_in_one_line():
    task = get_task("countdown")
    example = {"numbers": [30, 100, 93], "target": 23}
    assert task.prompt(example) == task.compact_prompt(example)  # compact by default
    assert task.load("test", limit=0) == []
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError) as refused:
            task.load("test", limit=bad)
        assert str(refused.value) == f"limit must be a non-negative integer or None, got {bad!r}"
    with pytest.raises(ValueError) as refused:
        task.load("valid")
    assert str(refused.value) == "unknown countdown split 'valid'; use one of train, test, d1_test"
    with pytest.raises(ValueError) as refused:
        task.prompt(example, "fancy")
    assert str(refused.value) == "unknown prompt style 'fancy'; use one of compact, chat, d1, d1_3shot"
    with pytest.raises(ValueError) as refused:
        get_task("no_such_task")
    assert str(refused.value).startswith("unknown task 'no_such_task'; registered tasks: countdown, gsm8k, ")
    assert str(refused.value).endswith(", or name your own Task class as package.module:Class")


def test_a_user_task_is_a_small_class(monkeypatch):
    from dipod.lm.tasks import base

    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))  # the test's task leaves with the test
    @register_task
    class ParityTask(Task):
        """Say whether a number is even: the answer is the word, compact or tagged."""

        name = "parity_test_task"

        def load(self, split, path=None, limit=None):
            return [{"n": n, "answer": "even" if n % 2 == 0 else "odd"} for n in range(limit or 10)]

        def compact_prompt(self, example):
            return str(example["n"])

        def chat_prompt(self, example):
            return f"Is {example['n']} even or odd?"

        def demonstration(self, example):
            return example["answer"]

        def _extract_answer(self, completion):
            from dipod.lm.tasks.answer_format import answer_text

            return answer_text(completion) or None

        def _reward(self, completion, example):
            return float(self._extract_answer(completion) == example["answer"])

    task = get_task("parity_test_task")
    examples = task.load("train", limit=4)
    assert [task.prompt(e, "compact") for e in examples] == ["0", "1", "2", "3"]
    assert task.reward("odd", examples[1]) == 1.0 and task.reward("<answer>even</answer>", examples[1]) == 0.0
    assert task.is_correct(task.demonstration(examples[3]), examples[3])
    assert task.reward(None, examples[0]) == 0.0 and task.reward("x" * (MAX_COMPLETION_CHARS + 1), examples[0]) == 0.0
    assert list(task.reward_functions) == ["correctness"]
    with pytest.raises(ValueError, match="unknown prompt style"):
        task.prompt(examples[0], "fancy")
    with pytest.raises(ValueError, match="already registered"):
        register_task(type("Other", (ParityTask,), {"name": "parity_test_task"}))


# -- sudoku4 -------------------------------------------------------------------------------------

def test_all_288_grids_are_the_valid_ones():
    grids = all_grids()
    assert len(grids) == len(set(grids)) == 288
    assert all(is_valid_grid(g) for g in grids)
    # independent enumeration: stack row permutations whose columns (and 2x2 boxes, once a pair
    # of rows is complete) repeat no digit, then keep the grids the oracle accepts
    rows = ["".join(p) for p in itertools.permutations("1234")]

    def columns_ok(grid: str) -> bool:
        return all(len(set(grid[c::4])) == len(grid) // 4 for c in range(4))

    partial = [""]
    for _ in range(4):
        partial = [g + r for g in partial for r in rows if columns_ok(g + r)]
    assert sorted(g for g in partial if is_valid_grid(g)) == sorted(grids)


@pytest.fixture(scope="module")
def sudoku_splits():
    task = get_task("sudoku4")
    return task, task.load("train"), task.load("test")


def test_every_generated_sudoku_has_exactly_one_solution(sudoku_splits):
    _, train, test = sudoku_splits
    assert len(train) == 5000 and len(test) == 500
    for ex in train + test:
        puzzle, solution = ex["puzzle"], ex["solution"]
        assert puzzle.count("0") == 8 and is_valid_grid(solution)
        assert all(p in ("0", s) for p, s in zip(puzzle, solution))
        assert count_sudoku_solutions(puzzle) == 1, puzzle
    assert len({ex["puzzle"] for ex in train}) == len(train)


def test_sudoku_splits_share_no_solution_grid_and_are_seeded(sudoku_splits):
    task, train, test = sudoku_splits
    assert not {e["solution"] for e in train} & {e["solution"] for e in test}
    # docs/lm_tasks.md: 48 of the 288 grids are test grids, the other 240 train; the splits' puzzles use them all
    assert (len({e["solution"] for e in test}), len({e["solution"] for e in train})) == (48, 240)
    assert task.load("test", limit=50) == test[:50]  # a smaller request is a prefix
    assert get_task("sudoku4").load("test", limit=20) == test[:20]  # same seed, same puzzles
    assert get_task("sudoku4", seed=1).load("test", limit=20) != test[:20]
    easy = get_task("sudoku4", num_blanks=4).load("train", limit=30)
    assert all(e["puzzle"].count("0") == 4 for e in easy)
    with pytest.raises(ValueError, match="num_blanks"):
        get_task("sudoku4", num_blanks=13)
    with pytest.raises(ValueError, match="unknown sudoku4 split 'dev'"):
        task.load("dev")


def test_sudoku_rewards_on_hand_made_completions():
    task = get_task("sudoku4")
    cases = {  # completion -> (reward, correct); the puzzle has 8 blanks
        "3142243142131324": (1.0, True),
        "<reasoning>\nrows\n</reasoning>\n<answer>\n3142\n2431\n4213\n1324\n</answer>": (1.0, True),
        "3142243142131323": (7 / 8, False),  # last blank wrong
        "3112243142131324": (7 / 8, False),  # second cell (a blank) wrong
        "4142243142131324": (1.0, False),  # a given cell changed: all blanks right, grid wrong
        "31422431": (4 / 8, False),  # d1 pads a short answer with 0
        "31422431421313249999": (1.0, True),  # ... and cuts a long one to 16
        "3142 2431 4213 1324": (1.0, True),
        "solution: 3142243142131324": (1.0, True),  # untagged prose: a written-out 16-digit grid
        "the 4x4 grid has 8 blanks": (0.0, False),  # ... but no prose digits
        "<answer>3142243142131324": (1.0, True),  # an unclosed tag still opens the answer
        "": (0.0, False),
        "0000000000000000": (0.0, False),
    }
    for completion, (reward, correct) in cases.items():
        assert task.reward(completion, SUDOKU) == pytest.approx(reward), completion
        assert task.is_correct(completion, SUDOKU) is correct, completion
    assert task.prompt(SUDOKU, "compact") == SUDOKU["puzzle"]
    assert SUDOKU["puzzle"] in task.prompt(SUDOKU, "chat") and "<answer>" in task.prompt(SUDOKU, "chat")
    assert task.demonstration(SUDOKU) == SUDOKU["solution"]


def test_sudoku_reads_the_d1_test_set():
    task = get_task("sudoku4")
    examples = task.load("d1_test")
    assert len(examples) == 500 and examples[0] == SUDOKU
    assert all(e["puzzle"].count("0") == 8 for e in examples)
    assert task.load("test", path=PACKAGED_DATA / "sudoku4_d1_test.csv", limit=3) == examples[:3]
    assert all(task.reward(task.demonstration(e), e) == 1.0 for e in examples)


def test_sudoku_csv_errors_name_the_line(tmp_path):
    task = get_task("sudoku4")
    good = "3102200002100320,3142243142131324\n"
    cases = {
        "Puzzle,Answer\n" + good: r":1: missing column\(s\) Solution",
        "Puzzle,Solution\n" + good + "31022000021003,3142243142131324\n": r":3: Puzzle must be 16 digits",
        "Puzzle,Solution\n" + good + good + "3102200002100320,3142243142131323\n": r":4: Solution .* not a valid",
        "Puzzle,Solution\n" + "4102200002100320,3142243142131324\n": r":2: Puzzle .* contradicts",
        "Puzzle,Solution\n" + good + "1,2,3\n": r":3: 3 fields, header has 2",
        "": r"empty file",
    }
    for i, (text, message) in enumerate(cases.items()):
        path = tmp_path / f"bad{i}.csv"
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            task.load("test", path=str(path))
    with pytest.raises(FileNotFoundError, match="not found"):
        task.load("test", path=str(tmp_path / "missing.csv"))
    excel = tmp_path / "excel.csv"  # a byte-order mark and extra columns are fine
    excel.write_text("\ufeffid,puzzle,solution\n7," + good, encoding="utf-8")
    assert task.load("test", path=str(excel)) == [SUDOKU]


def test_a_data_override_without_the_file_says_how_to_point_at_it(tmp_path, monkeypatch):
    monkeypatch.setenv("DIPOD_SHARED_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="DIPOD_SHARED_DATA"):
        get_task("countdown").load("d1_test")


# -- countdown -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def countdown_splits():
    task = get_task("countdown")
    return task, task.load("train", limit=500), task.load("test")


def test_every_countdown_item_is_solvable(countdown_splits):
    task, train, test = countdown_splits
    assert len(test) == 500
    for ex in train + test:
        assert len(ex["numbers"]) == 3 and all(1 <= n <= 100 for n in ex["numbers"])
        assert 1 <= ex["target"] <= 100
        assert Fraction(ex["target"]) in countdown_values(ex["numbers"]), ex
        demo = task.demonstration(ex)
        tree = parse_expression(demo)
        assert sorted(literals(tree)) == sorted(ex["numbers"]) and evaluate(tree) == ex["target"]
        assert len(demo) <= 16 and task.reward(demo, ex) == 1.0


@pytest.mark.slow
def test_every_item_of_the_default_countdown_train_split_is_solvable():
    for ex in get_task("countdown").load("train"):
        assert Fraction(ex["target"]) in countdown_values(ex["numbers"]), ex


def test_countdown_splits_share_no_number_triple(countdown_splits):
    task, train, test = countdown_splits
    assert not {tuple(sorted(e["numbers"])) for e in train} & {tuple(sorted(e["numbers"])) for e in test}
    assert task.load("test", limit=40) == test[:40]
    assert get_task("countdown", seed=3).load("test", limit=40) != test[:40]


def test_countdown_splits_are_the_hashed_sides_of_their_own_pinned_streams(countdown_splits):
    """A triple is a test triple when its seeded hash falls below test_fraction (about 10% of triples);
    each split keeps its side of a stream of its own, numbers and targets over the whole of 1..100, and
    the streams are pinned: the results pages and reference policies were made on exactly these items."""
    import hashlib

    from dipod.lm.tasks.countdown import _is_test_triple

    task, train, test = countdown_splits
    assert all(_is_test_triple(tuple(e["numbers"]), 0, 0.1) for e in test)
    assert not any(_is_test_triple(tuple(e["numbers"]), 0, 0.1) for e in train)
    rng = random.Random(0)
    triples = [tuple(rng.randint(1, 100) for _ in range(3)) for _ in range(20_000)]
    assert abs(sum(_is_test_triple(t, 0, 0.1) for t in triples) / len(triples) - 0.1) < 0.01  # 5 standard errors
    items = train + test
    assert len({(tuple(sorted(e["numbers"])), e["target"]) for e in test}) == len(test)  # no item twice
    assert {min(n for e in items for n in e["numbers"]), max(n for e in items for n in e["numbers"])} == {1, 100}
    assert (min(e["target"] for e in items), max(e["target"] for e in items)) == (1, 100)

    def digest(rows):
        return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]

    assert (digest(train[:50]), digest(test[:50])) == ("7bf741f8f7487198", "853f8cc90b8d51a5")
    with pytest.raises(ValueError) as refused:
        task.demonstration({"numbers": [1, 1, 1], "target": 100})
    assert str(refused.value) == "no expression of [1, 1, 1] equals 100"


def _redundant_parentheses(text: str) -> list[str]:
    """The texts left by removing one matched pair of parentheses that leaves the same parse tree."""
    opened, redundant = [], []
    for i, char in enumerate(text):
        if char == "(":
            opened.append(i)
        elif char == ")":
            j = opened.pop()
            shorter = text[:j] + text[j + 1:i] + text[i + 1:]
            if parse_expression(shorter) == parse_expression(text):
                redundant.append(shorter)
    return redundant


def test_the_solver_writes_each_value_with_the_numbers_once_and_no_redundant_parentheses():
    from dipod.lm.tasks.countdown import solve

    rng = random.Random(0)
    for _ in range(60):
        numbers = tuple(sorted(rng.randint(1, 100) for _ in range(3)))
        for value, text in solve(numbers).items():
            tree = parse_expression(text)
            assert evaluate(tree) == value and sorted(literals(tree)) == list(numbers), (numbers, text)
            assert not _redundant_parentheses(text), (numbers, text)


def test_countdown_demonstrations_are_pinned(countdown_splits):
    """The tiny reference policies were trained on these texts: the solver's choice stays put."""
    import hashlib

    task, _, test = countdown_splits
    demos = [task.demonstration(e) for e in test[:100]]
    assert hashlib.sha256("\n".join(demos).encode()).hexdigest()[:16] == "50e4a1d1028f2bcd"


def test_generated_splits_default_to_the_documented_sizes():
    """docs/lm_tasks.md: train 5000 and test 500 for both, sudoku4's paper_train 5000."""
    assert get_task("countdown").default_size == {"train": 5000, "test": 500}
    assert get_task("sudoku4").default_size == {"train": 5000, "test": 500, "paper_train": 5000}


@pytest.mark.parametrize("fraction", [0.0, 1.0, 1.5, -0.1])
def test_countdown_test_fraction_is_strictly_between_0_and_1(fraction):
    with pytest.raises(ValueError) as refused:
        get_task("countdown", test_fraction=fraction)
    assert str(refused.value) == f"test_fraction must be in (0, 1), got {fraction}"


def test_countdown_answers_read_braces_as_parentheses_and_a_closing_full_stop_as_nothing():
    from dipod.lm.tasks.countdown import MAX_ANSWER_CHARS

    task = get_task("countdown")
    assert task.reward("<answer>{100-93}+30-14</answer>", {"numbers": [100, 93, 30, 14], "target": 23}) == 1.0
    assert task.reward("<answer>100-{93-30}*1</answer>", {"numbers": [100, 93, 30, 1], "target": 37}) == 1.0
    assert task.reward("<answer>30+93-100.</answer>", COUNTDOWN) == 1.0
    assert task.reward("<answer>30+93-100X</answer>", COUNTDOWN) == 0.0  # outside the grammar
    padded = "30+93-100" + " " * (MAX_ANSWER_CHARS - 9)
    assert task.reward(padded, COUNTDOWN) == 1.0 and task.reward(padded + " ", COUNTDOWN) == 0.0  # length cap


def test_countdown_rewards_on_hand_made_completions():
    task = get_task("countdown")
    cases = {
        "30+93-100": 1.0,
        "93-100+30": 1.0,
        "<reasoning>\n123-100\n</reasoning>\n<answer>\n(93 + 30) - 100\n</answer>\n": 1.0,
        "(100-93)*30/30+16": 0.1,  # well formed, but extra numbers
        "100-93+30": 0.1,  # right numbers, wrong value (37)
        "30+93": 0.1,  # a number unused
        "30*93/(100-100)": 0.1,  # division by zero is an evaluation failure, not a crash
        "30+93-100=23": 1.0,  # "expr = target": the side that uses the numbers
        "30+93-100=24": 1.0,  # the expression is evaluated; a wrong claimed value does not count
        "23=30+93-100": 1.0,
        "23=24=25=26=30+93-100": 0.1,  # only the first 4 sides of a chain are read
        "-30+93": 0.0,  # no unary minus
        "30+93-100)": 0.0,
        "<answer>30+93-100": 1.0,  # an unclosed tag still opens the answer
        "30 plus 93 minus 100": 0.0,  # prose is not an expression
        "<answer></answer>": 0.0,
        "": 0.0,
    }
    for completion, reward in cases.items():
        assert task.reward(completion, COUNTDOWN) == reward, completion
        assert task.is_correct(completion, COUNTDOWN) is (reward == 1.0)
    assert task.reward("(1/3)*3*23", {"numbers": [1, 3, 3, 23], "target": 23}) == 1.0  # exact, no rounding
    assert task.prompt(COUNTDOWN, "compact") == "30,100,93>23"
    assert "30, 100, 93" in task.prompt(COUNTDOWN, "chat")
    assert task.extract_answer("<answer> 30+93-100 </answer>") == "30+93-100"


def test_countdown_reads_the_d1_test_set():
    task = get_task("countdown")
    examples = task.load("d1_test")
    assert len(examples) == 256 and examples[0] == {"numbers": [30, 100, 93], "target": 23}
    assert all(task.reward(task.demonstration(e), e) == 1.0 for e in examples)  # all solvable


def test_countdown_jsonl_errors_name_the_line(tmp_path):
    task = get_task("countdown")
    good = '{"input": "30,100,93", "output": "23"}\n'
    cases = {
        good + '{"input": "30,100,93"\n': r":2: not valid JSON",
        good + good + '{"numbers": "30", "target": 4}\n': r":3: expected keys",
        good + '{"input": "30,x,93", "output": "23"}\n': r":2: number must be an integer, got 'x'",
        good + '{"input": "30", "output": "23"}\n': r":2: 1 numbers",
        good + '{"numbers": [1, 2], "target": -5}\n': r":2: target -5 is outside",
        good + "[1, 2]\n": r":2: expected a JSON object",
        "\n": r"no items",
    }
    for i, (text, message) in enumerate(cases.items()):
        path = tmp_path / f"bad{i}.jsonl"
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            task.load("test", path=str(path))
    ours = tmp_path / "ours.jsonl"
    ours.write_text('{"numbers": [3, 4, 5], "target": 35}\n')
    assert task.load("test", path=str(ours)) == [{"numbers": [3, 4, 5], "target": 35}]


def test_countdown_files_take_the_documented_ranges_and_refuse_the_rest_in_one_line(tmp_path):
    """A countdown file's contract at its edges: numbers and targets are integers (JSON integers or
    digit strings, padding ignored) in 0..1000000, 2..6 numbers a row, both keys of one format; every
    refusal is one message naming file:line, the bad value without its padding, or the keys found."""
    task, path = get_task("countdown"), tmp_path / "c.jsonl"

    def load(row: dict) -> list[dict]:
        path.write_text(json.dumps(row) + "\n")
        return task.load("test", path=str(path))

    assert load({"numbers": [0, 10**6], "target": 0}) == [{"numbers": [0, 1000000], "target": 0}]
    assert load({"numbers": [5, 7], "target": 10**6}) == [{"numbers": [5, 7], "target": 1000000}]
    assert load({"input": " 1, 2 ,3,4,5,6 ", "output": " 21 "}) == [{"numbers": [1, 2, 3, 4, 5, 6], "target": 21}]
    assert load({"numbers": [1, 2], "target": 3, "output": "7"}) == [{"numbers": [1, 2], "target": 3}]
    keys = 'expected keys "input" and "output" (d1) or "numbers" (a list) and "target"; found '
    refused = [
        ({"numbers": [-1, 2], "target": 1}, "number -1 is outside 0..1000000"),
        ({"numbers": [1, 2], "target": 10**6 + 1}, "target 1000001 is outside 0..1000000"),
        ({"numbers": [1, 2, 3, 4, 5, 6, 7], "target": 1}, "7 numbers; countdown items need 2..6"),
        ({"numbers": [1.5, 2], "target": 1}, "number must be an integer, got 1.5"),  # never truncated to 1
        ({"numbers": [True, 2], "target": 1}, "number must be an integer, got True"),  # never read as 1
        ({"numbers": [1, 2], "target": None}, "target must be an integer, got None"),
        ({"input": "30, x, 93", "output": "23"}, "number must be an integer, got 'x'"),
        ({"input": "30,100,93", "output": " y "}, "target must be an integer, got 'y'"),
        ({"input": "30,100,93"}, keys + "input"),  # half of d1's format is not a row
        ({"numbers": "30", "target": 4}, keys + "numbers, target"),
        ({}, keys + "none"),
    ]
    for row, message in refused:
        with pytest.raises(ValueError) as error:
            load(row)
        assert str(error.value) == f"{path}:1: {message}", row


def test_safe_evaluator_bounds():
    assert evaluate(parse_expression("((2+3)*4-5)/3")) == 5
    assert evaluate(parse_expression("1/3+1/6")) == Fraction(1, 2)
    hostile = [
        "9**9**9", "(" * 33 + "1" + ")" * 33, "1" * 7, "1+" * 101 + "1", "__import__('os')",
        "2e9", "1.5", "99999*99999*99999", "٣+1", "", "()", "1 2",
    ]
    for text in hostile:
        with pytest.raises(ExpressionError):
            evaluate(parse_expression(text))
    assert evaluate(parse_expression("(" * 32 + "1" + ")" * 32)) == 1


# -- gsm8k and math500 ---------------------------------------------------------------------------

def test_gsm8k_loads_fixtures_and_scores_as_d1(tmp_path):
    task = get_task("gsm8k")
    examples = task.load("test", path=str(FIXTURES / "gsm8k_tiny.jsonl"))
    assert [e["answer"] for e in examples] == ["22", "80", "1,295", "6"]
    assert task.load("test", path=str(FIXTURES / "gsm8k_tiny.jsonl"), limit=2) == examples[:2]
    ex = examples[0]
    strict = "<reasoning>\n72 - 50 = 22\n</reasoning>\n<answer>\n22\n</answer>\n"
    fns = task.reward_functions
    values = {name: fn(strict, ex) for name, (fn, _) in fns.items()}
    assert values == {"correctness": 1.0, "integer": 1.0, "strict_format": 1.0, "soft_format": 1.0, "xml_count": 1.0}
    assert sum(fns[n][1] * v for n, v in values.items()) == 4.0  # d1's maximum
    loose = "<reasoning>so</reasoning> <answer>22.0</answer> and more"
    values = {name: fn(loose, ex) for name, (fn, _) in fns.items()}
    assert values["correctness"] == 1.0 and values["integer"] == 0.0
    assert values["strict_format"] == 0.0 and values["soft_format"] == 1.0
    assert values["xml_count"] == 0.0  # no tag is written with its newlines
    assert task.reward("1295", examples[2]) == 1.0  # "1,295" compares as a number
    assert task.reward("22", ex) == 1.0 and task.reward("21", ex) == 0.0 and task.reward("twenty-two", ex) == 0.0
    # the same file as JSON and parquet
    rows = [json.loads(line) for line in (FIXTURES / "gsm8k_tiny.jsonl").read_text().splitlines()]
    (tmp_path / "g.json").write_text(json.dumps(rows))
    assert task.load("test", path=str(tmp_path / "g.json")) == examples
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "g.parquet")
    assert task.load("test", path=str(tmp_path / "g.parquet")) == examples


def test_gsm8k_and_math_data_errors(tmp_path):
    gsm = get_task("gsm8k")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\n\n{"question": "q2"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: missing field\(s\) answer"):
        gsm.load("test", path=str(bad))
    with pytest.raises(ValueError, match="split 'train' has no built-in data"):
        gsm.load("train")
    bad.write_text('{"question": "q", "answer": "#### twelve"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: final answer 'twelve' is not a number"):
        gsm.load("test", path=str(bad))
    with pytest.raises(FileNotFoundError, match="not found"):  # a missing local file never goes to the hub
        gsm.load("test", path=str(tmp_path / "nope.jsonl"))
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"question": "q", "answer": "1"},\n  {"question": "q2" "answer": "2"}\n]')
    with pytest.raises(ValueError, match=r"broken.json:3: not valid JSON"):
        gsm.load("test", path=str(broken))
    table = tmp_path / "table.csv"
    table.write_text("question,answer\nq,1\n")
    with pytest.raises(ValueError, match="unsupported data file type"):
        gsm.load("test", path=str(table))
    bad.write_text('{"problem": "p", "solution": "no box here"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: no answer field"):
        get_task("math500").load("test", path=str(bad))


def test_format_rewards_accept_the_same_strings_as_d1s_regexes():
    import re

    from dipod.lm.tasks.answer_format import soft_format, strict_format

    soft = re.compile(r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>", re.DOTALL)
    strict = re.compile(r"^<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n$", re.DOTALL)
    pieces = ["<reasoning>", "</reasoning>", "<answer>", "</answer>", "\n", " ", "x"]
    rng = random.Random(1)
    samples = ["<reasoning>\nr\n</reasoning>\n<answer>\n1\n</answer>\n", "<reasoning>\n\n</reasoning>\n<answer>\n\n</answer>\n\n",
               # edges the random pieces rarely hit: the middle marker touching the head or the tail, no middle
               "<reasoning>\n</reasoning>\n<answer>\nx\n</answer>\n", "<reasoning>\nx\n</reasoning>\n<answer>\n</answer>\n",
               "<reasoning>\n" + "x" * 30 + "\n</answer>\n"]
    samples += ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 12))) for _ in range(20_000)]
    def filler() -> str:
        return "".join(rng.choice(pieces) for _ in range(rng.randint(0, 4)))

    # near misses of the strict format: its skeleton with random pieces spliced in
    skeleton = ["<reasoning>\n", "\n</reasoning>\n<answer>\n", "\n</answer>\n"]
    samples += [skeleton[0] + filler() + skeleton[1] + filler() + skeleton[2] + filler() for _ in range(3000)]
    assert sum(strict_format(s) for s in samples) > 20 and sum(soft_format(s) for s in samples) > 200
    for text in samples:
        assert soft_format(text) == float(bool(soft.match(text))), repr(text)
        assert strict_format(text) == float(bool(strict.match(text))), repr(text)


def test_a_hub_dataset_id_goes_to_datasets_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return [{"question": "q", "answer": "r\n#### 7"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert get_task("gsm8k").load("train", path="openai/gsm8k") == [{"question": "q", "answer": "7"}]
    assert calls == [("openai/gsm8k", "main", "train")]


def test_math500_boxed_extraction_and_math_verify():
    task = get_task("math500")
    examples = task.load("test", path=str(FIXTURES / "math500_tiny.jsonl"))
    assert [e["answer"] for e in examples] == ["\\frac{1}{2}", "6", "5\\sqrt{2}"]
    half, six, root = examples
    cases = [
        ("<reasoning>\n...\n</reasoning>\n<answer>\n\\boxed{\\frac{1}{2}}\n</answer>", half, 1.0, 1.0),
        ("<answer>0.5</answer>", half, 1.0, 0.5),
        ("the answer is \\boxed{1/2}", half, 1.0, 0.0),
        ("\\boxed{\\frac{2}{4}} then \\boxed{3}", half, 0.0, 0.0),  # the last box counts
        ("<answer>\\boxed{x = 6}</answer>", six, 1.0, 1.0),
        ("<answer>\\boxed{\\sqrt{50}}</answer>", root, 1.0, 1.0),
        ("<answer>\\boxed{5\\sqrt{3}}</answer>", root, 0.0, 1.0),
        ("\\boxed{", half, 0.0, 0.0),
    ]
    fns = task.reward_functions
    for completion, ex, correct, boxed in cases:
        assert fns["correctness"][0](completion, ex) == correct, completion
        assert fns["boxed_format"][0](completion, ex) == boxed, completion
    assert fns["correctness"][1] == 2.0 and fns["boxed_format"][1] == 1.0


# -- fuzzing: every reward function, every task, any string ---------------------------------------

def hostile_completions(rng: random.Random) -> list[str]:
    alphabet = "0123456789+-*/()<>=, \n\\{}$.abcxyz^" + "٣²½é中\u200b\x00"
    strings = [
        "", " ", "\x00", "9**9**9", "9" * 5000, "1" + "0" * 100_000, "(" * 100_000 + "1" + ")" * 100_000,
        "1e999999999", "10**10**10", "__import__('os').system('echo hacked')", "eval('1')",
        "<answer>" * 20_000, "</answer>" * 20_000, "<answer>" + "(" * 5000 + "</answer>",
        "<reasoning>" + "</reasoning>" * 15_000, "<reasoning>" + "</reasoning> \n" * 13_000 + "<answer>",
        "(" * 90_000 + "1" + ")" * 90_000, "<answer>" + "3" * 150_000 + "</answer>",
        "\\boxed{" * 5000, "\\boxed{" + "}" * 5000,
        "<answer>\\boxed{9^{9^{9^{9}}}}</answer>", "<answer>\\boxed{10^{10^{10}}!}</answer>",
        "<answer>" + "1/" * 99 + "1</answer>", "1" * 7, "1/0", "0/0", "-" * 1000,
        "x" * 1_000_000, "<answer>" + "3" * 1_000_000 + "</answer>", "🙂" * 10_000,
        "\udcff surrogate", "<answer>\u0663\u0660+\u0669\u0663</answer>",
    ]
    strings += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80))) for _ in range(150)]
    return strings


EXAMPLES = {
    "sudoku4": SUDOKU,
    "countdown": COUNTDOWN,
    "gsm8k": {"question": "q", "answer": "22"},
    "math500": {"problem": "p", "answer": "\\frac{1}{2}"},
}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_reward_fuzzing_never_raises_and_stays_in_unit_interval(name):
    task = get_task(name)
    example = EXAMPLES[name]
    rng = random.Random(0)
    completions = hostile_completions(rng) + [None, 123, b"bytes", ["list"]]
    if name == "math500":  # sympy parsing is slow; the hostile strings plus a few random ones suffice
        completions = completions[:40] + completions[-4:]
    for completion in completions:
        scores = [task.reward(completion, example)]
        scores += [fn(completion, example) for fn, _ in task.reward_functions.values()]
        task.is_correct(completion, example)
        task.extract_answer(completion)
        for score in scores:
            assert isinstance(score, float) and math.isfinite(score) and 0.0 <= score <= 1.0, (score, repr(completion)[:60])


# -- the paper's prompts and data files ---------------------------------------------------------

def test_paper_data_files_load_offline():
    gsm, math500 = get_task("gsm8k").load("test"), get_task("math500").load("test")
    assert len(gsm) == 1130 and gsm[0]["answer"] == "18" and "ducks" in gsm[0]["question"]
    assert len(math500) == 500 and all(e["answer"] for e in math500)
    spg = get_task("sudoku4").load("spg_test")
    assert len(spg) == 256 and {e["puzzle"].count("0") for e in spg} <= set(range(7, 13))
    assert get_task("sudoku4").load("spg_test", limit=5) == spg[:5]


def test_paper_train_split_holds_no_test_grid_of_either_paper_file():
    task = get_task("sudoku4")
    tested = {e["solution"] for split in ("d1_test", "spg_test") for e in task.load(split)}
    train = task.load("paper_train", limit=2000)
    assert len(train) == 2000 and len({e["puzzle"] for e in train}) == 2000
    assert not {e["solution"] for e in train} & tested
    assert len({e["solution"] for e in train}) == 288 - len(tested) == 43  # every free grid is used
    assert all(count_sudoku_solutions(e["puzzle"]) == 1 and is_valid_grid(e["solution"]) for e in train[:200])
    assert "paper_train" in task.splits and "spg_test" in task.splits


def test_d1_prompts_follow_the_paper_format():
    sudoku, countdown = get_task("sudoku4"), get_task("countdown")
    gsm, math500 = get_task("gsm8k"), get_task("math500")
    for task, example in ((sudoku, SUDOKU), (countdown, COUNTDOWN), (gsm, {"question": "How many?", "answer": "3"}),
                          (math500, {"problem": "Find x.", "answer": "2"})):
        prompt = task.prompt(example, "d1")
        assert prompt.index("<reasoning>") < prompt.index("</reasoning>") < prompt.index("<answer>") < prompt.index("</answer>")
    assert countdown.prompt(COUNTDOWN, "d1").endswith("\n\nNumbers: [30, 100, 93]\nTarget: 23")
    assert "\\boxed{" in countdown.prompt(COUNTDOWN, "d1") and "\\boxed{...}" in gsm.prompt({"question": "q"}, "d1")
    assert gsm.prompt({"question": "How many?"}, "d1").endswith("\n\nHow many?")
    assert sudoku.prompt(SUDOKU, "d1").endswith(f"\n\nSolve the following Sudoku puzzle: {SUDOKU['puzzle']}\n")
    assert countdown.d1_prompt(COUNTDOWN) == countdown.prompt(COUNTDOWN, "d1")  # zero-shot by default, as Task declares
    for task, example in ((countdown, COUNTDOWN), (gsm, {"question": "q"})):
        with pytest.raises(ValueError, match=rf"^{task.name} has no few-shot d1 prompt \(the paper evaluates it "
                                             r"zero-shot\); use style d1$"):
            task.prompt(example, "d1_3shot")


def test_sudoku_three_shot_examples_are_solved_free_grids():
    from dipod.lm.tasks.d1_prompts import SUDOKU_SHOTS

    task = get_task("sudoku4")
    prompt = task.prompt(SUDOKU, "d1_3shot")
    assert prompt.endswith(f"\n\nQuestion: Solve the following Sudoku puzzle: {SUDOKU['puzzle']}\nAnswer:\n")
    assert prompt.count("Question:") == 4 and prompt.count("<answer>") == 4  # 3 shots + the format line
    for puzzle, solution in SUDOKU_SHOTS:
        assert count_sudoku_solutions(puzzle) == 1 and is_valid_grid(solution)
        assert all(p in ("0", s) for p, s in zip(puzzle, solution))
        shot = prompt[prompt.index(f"puzzle: {puzzle}"):]
        shot = shot[: shot.index("</answer>") + len("</answer>")]
        assert task.reward(shot, {"puzzle": puzzle, "solution": solution}) == 1.0  # our grader reads the shot
    tested = {e["solution"] for split in ("d1_test", "spg_test") for e in task.load(split)}
    assert not {s for _, s in SUDOKU_SHOTS} & tested


def _grid_from_rows(lines: list[str]) -> str:
    assert [line[:4] for line in lines] == ["R1: ", "R2: ", "R3: ", "R4: "], lines
    return "".join(line[4:].replace(" ", "") for line in lines)


def test_each_worked_solution_is_a_correct_single_candidate_derivation():
    """Replayed on the grid, every step of a worked example fills an empty cell whose row, column and box
    leave exactly the digit it names; the rows shown first are the puzzle and last the solution."""
    import re

    from dipod.lm.tasks.d1_prompts import SUDOKU_SHOTS, worked_solution

    for puzzle, solution in SUDOKU_SHOTS:
        text = worked_solution(puzzle, solution)
        head, steps, tail = text.split("\n\n")
        assert head.startswith("The puzzle as four rows:\n") and _grid_from_rows(head.split("\n")[1:]) == puzzle
        assert tail.startswith("Solved grid:\n") and _grid_from_rows(tail.split("\n")[1:]) == solution
        grid = list(puzzle)
        lines = steps.split("\n")
        assert lines[0] == "Cells with a single candidate, in order:" and len(lines) - 1 == puzzle.count("0")
        for line in lines[1:]:
            r, c, digit, r2, c2, digit2 = re.fullmatch(r"R(\d)C(\d) can only be (\d) → R(\d)C(\d)=(\d)\.", line).groups()
            assert (r, c, digit) == (r2, c2, digit2)
            cell = (int(r) - 1) * 4 + int(c) - 1
            row, col = divmod(cell, 4)
            box = {(row // 2 * 2 + i) * 4 + col // 2 * 2 + j for i in range(2) for j in range(2)}
            peers = {row * 4 + k for k in range(4)} | {k * 4 + col for k in range(4)} | box
            assert grid[cell] == "0" and set("1234") - {grid[p] for p in peers} == {digit}, line
            grid[cell] = digit
        assert "".join(grid) == solution


def test_worked_solutions_refuse_puzzles_they_cannot_explain():
    from dipod.lm.tasks.d1_prompts import sudoku_prompt, worked_solution

    with pytest.raises(ValueError) as refused:
        worked_solution("0" * 16, "1234341221434321")
    assert str(refused.value) == f"puzzle {'0' * 16} needs more than single-candidate steps"
    with pytest.raises(ValueError) as refused:
        worked_solution("0304140330010030", "1234341221434321")
    assert str(refused.value) == "puzzle 0304140330010030 does not solve to 1234341221434321"
    for shots in (-1, 4):
        with pytest.raises(ValueError) as refused:
            sudoku_prompt("0" * 16, shots)
        assert str(refused.value) == f"sudoku shots must be in 0..3, got {shots}"


def test_the_three_shot_prompt_keeps_the_released_layout():
    """Instruction, blank line, each example (Question / Answer / reasoning / answer) separated by one
    blank line, then the question: the strings models were evaluated on."""
    import re

    from dipod.lm.tasks.d1_prompts import SUDOKU_INSTRUCTION, SUDOKU_SHOTS, sudoku_prompt

    prompt = sudoku_prompt("1" * 16, shots=2)
    example = (r"Question:\nSolve the following Sudoku puzzle: (\d{16})\nAnswer:\n<reasoning>\nThe puzzle as four "
               r"rows:\n[^<]*\n</reasoning>\n<answer>\n(\d{16})\n</answer>")
    layout = (re.escape(SUDOKU_INSTRUCTION) + r"\n\n" + example + r"\n\n" + example
              + r"\n\nQuestion: Solve the following Sudoku puzzle: 1{16}\nAnswer:\n")
    match = re.fullmatch(layout, prompt)
    assert match and match.groups() == (*SUDOKU_SHOTS[0], *SUDOKU_SHOTS[1])
    assert sudoku_prompt("1" * 16) == f"{SUDOKU_INSTRUCTION}\n\nSolve the following Sudoku puzzle: {'1' * 16}\n"  # 0 shots


def _nest(depth: int) -> str:
    opening = "".join("([{"[i % 3] for i in range(depth))
    return opening + "1" + "".join({"(": ")", "[": "]", "{": "}"}[c] for c in reversed(opening))


@pytest.mark.parametrize("answer,admitted", [
    # nesting: at most 10 brackets of any kind deep; siblings do not nest
    (_nest(10), True), (_nest(11), False), ("{" * 11 + "1" + "}" * 11, False), ("(1)" * 30, True),
    # factorials and binomials of 4+ digit numbers or of bracketed expressions
    ("999!", True), ("1000!", False), ("1000 !", False), ("n!", True), ("(n+1)!", False), ("\\{n\\}!", False),
    ("[n]!", False), ("\\binom{999}{2}", True), ("\\binom{1000}{2}", False),
    # power towers: an exponent holding "^", or followed by one (spaces skipped)
    ("x^{2^{3}}", False), ("x^2^3", False), ("x^ {2^3}", False), ("x^{2} ^3", False), ("x^{2}+y^{3}", True),
    # exponents multiply through bracketed bases only: (x^100)^100 = x^10000 is the bound
    ("(x^{100})^{100}", True), ("(x^{101})^{100}", False), ("[x^{101}]^{100}", False), ("{x^{101}}^{100}", False),
    ("(x^{100})^{100}5", True), ("x^{100}+y^{100}+z^{100}", True), ("x^{10000}", True), ("x^{10001}", False),
    ("(x^{0})^{10000}", True), ("(x^{1})^{10001}", False), ("x^{1234567}", False), ("x^{12", True),
    ("(x^{10})^{10} (y^{10})^{10}", True), ("((x^{10})^{10})^{101}", False), ("((x^{10})^{10})^{100}", True),
    ("x^{{100}}", True), ("x^{100\\cdot 101}", False), ("x^{100\\cdot 100}", True), ("(x^{2})^{-5001}", False), ("(5^{2})^{5000}", True), ("2^{3}\\cdot(5^{2})^{5000}", False),
])
def test_math500_sends_to_sympy_only_the_shapes_it_can_afford(answer, admitted):
    """`cheap_to_verify`'s bounds, exactly: every bound is met by an admitted answer and passed by one
    more step (depth 11, a 4-digit factorial, an exponent product of 10001); a refused answer is
    graded wrong without parsing and counted."""
    from dipod.lm.tasks import math500

    assert math500.cheap_to_verify(answer) is admitted
    before = math500.costly_answers_refused()
    assert math500.equivalent(answer, "7") is False
    assert math500.costly_answers_refused() == before + (not admitted)


def test_gsm8k_reads_the_text_after_its_marker_and_names_each_bad_input(tmp_path):
    from dipod.lm.tasks.gsm8k import final_answer

    gsm = get_task("gsm8k")
    assert final_answer("5 + 2 = 7 apples\n#### 1 234") == "1 234"  # everything after ####, not the last word
    with pytest.raises(ValueError, match="limit must be a non-negative integer or None, got -1"):
        gsm.load("test", limit=-1)
    with pytest.raises(ValueError, match=r"^gsm8k split 'train' has no built-in data \(only 'test' is read offline, "
                                         r"from gsm8k_test.jsonl\): pass a .json/.jsonl/.parquet file with question "
                                         r"and answer fields, or a hub dataset id such as openai/gsm8k$"):
        gsm.load("train")
    wordy = "about " * 9  # 54 characters: the message quotes the first 40
    (tmp_path / "g.jsonl").write_text(json.dumps({"question": "q", "answer": f"#### {wordy}"}) + "\n")
    with pytest.raises(ValueError, match=rf"g.jsonl:1: final answer {wordy.strip()[:40]!r} is not a number"):
        gsm.load("test", path=str(tmp_path / "g.jsonl"))
    example = {"question": "How many?", "answer": "7"}
    assert "How many?" in gsm.d1_prompt(example)  # zero-shot by default
    with pytest.raises(ValueError, match=r"^gsm8k has no few-shot d1 prompt \(the paper evaluates it zero-shot\); "
                                         r"use style d1$"):
        gsm.d1_prompt(example, shots=2)
    integer = gsm.reward_functions["integer"][0]
    assert integer("<answer>17</answer>", example) == 1.0 and integer("<answer>X17</answer>", example) == 0.0


def test_math500_load_keeps_each_problem_and_limit_and_names_each_bad_input(tmp_path):
    """Rows as a user's file holds them: the problem text (stripped), the answer field (an empty one
    falls back to the solution's last box), at most `limit` rows; the messages in full."""
    from dipod.lm.tasks.d1_prompts import math_prompt

    task = get_task("math500")
    rows = [{"problem": "  What is 1/2?  ", "answer": "", "solution": "so \\boxed{\\frac{1}{2}}"},
            {"problem": "Two?", "answer": " 2 "}, {"problem": "Three?", "answer": "3"}]
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert task.load("test", path=str(path), limit=2) == [{"problem": "What is 1/2?", "answer": "\\frac{1}{2}"},
                                                          {"problem": "Two?", "answer": "2"}]
    assert len(task.load("test", path=str(path))) == 3
    with pytest.raises(ValueError, match="limit must be a non-negative integer or None, got -1"):
        task.load("test", path=str(path), limit=-1)
    with pytest.raises(ValueError, match=r"^math500 split 'train' has no built-in data \(only 'test' is read offline, "
                                         r"from math500_test.jsonl\): pass a .json/.jsonl/.parquet file with problem "
                                         r"and answer \(or solution\) fields, or a hub dataset id such as "
                                         r"HuggingFaceH4/MATH-500$"):
        task.load("train")
    path.write_text(json.dumps({"answer": "1"}) + "\n")
    with pytest.raises(ValueError, match=r"m.jsonl:1: missing field\(s\) problem"):
        task.load("test", path=str(path))
    path.write_text(json.dumps({"problem": "p"}) + "\n")
    with pytest.raises(ValueError, match=r"^.*m.jsonl:1: missing field answer \(or solution with a \\boxed answer\)$"):
        task.load("test", path=str(path))
    example = {"problem": "Two?", "answer": "2"}
    assert task.d1_prompt(example) == math_prompt("Two?")  # zero-shot by default
    with pytest.raises(ValueError, match=r"^math500 has no few-shot d1 prompt \(the paper evaluates it zero-shot\); "
                                         r"use style d1$"):
        task.d1_prompt(example, shots=3)


@pytest.mark.parametrize("name,example,field", [
    ("gsm8k", {"question": "How many?", "answer": "7"}, "question"),
    ("math500", {"problem": "Find x.", "answer": "\\frac{1}{2}"}, "problem"),
])
def test_gsm8k_and_math500_prompts_carry_the_question_and_ask_for_what_the_grader_reads(name, example, field):
    """The compact prompt is the question itself; the chat prompt starts with it and ends with the shared
    answer format; an answer written as the chat prompt asks (math500: in the command it names, \\boxed{})
    and the demonstration both score 1."""
    task = get_task(name)
    assert task.prompt(example, "compact") == example[field]
    chat = task.prompt(example, "chat")
    assert chat.startswith(example[field]) and chat.endswith(CHAT_FORMAT)
    asked = re.findall(r"(\\[A-Za-z]+)\{\}", chat)  # the LaTeX command the prompt asks the answer in
    answer = f"{asked[0]}{{{example['answer']}}}" if asked else example["answer"]
    assert task.reward(f"<reasoning>r</reasoning>\n<answer>{answer}</answer>", example) == 1.0
    assert task.reward(task.demonstration(example), example) == 1.0


def test_math500_silences_only_math_verifys_disabled_timeout_notice():
    import logging

    from dipod.lm.tasks.math500 import _DropDisabledTimeoutNotice

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("math_verify.grader", logging.WARNING, __file__, 1, message, None, None)

    notice = _DropDisabledTimeoutNotice()
    assert not notice.filter(record("Timeout is disabled as timeout_seconds is None"))
    assert notice.filter(record("timeout is disabled elsewhere")) and notice.filter(record("Could not parse x"))


def test_math500_hub_id_goes_to_datasets_with_its_split_and_config(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return [{"problem": "p", "answer": "1"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    from dipod.lm.tasks.math500 import Math500Task

    assert Math500Task(hub_config="default").load("test", path="HuggingFaceH4/MATH-500") == [{"problem": "p", "answer": "1"}]
    assert calls == [("HuggingFaceH4/MATH-500", "default", "test")]


def test_math500_reads_answers_up_to_300_characters():
    task, long = get_task("math500"), "1" * 300
    assert task.reward(f"\\boxed{{{long}}}", {"answer": long}) == 1.0
    assert task.reward(f"\\boxed{{{long}1}}", {"answer": long + "1"}) == 0.0  # too long to read


# -- sudoku4: where the grid is read from, and the scores around it (mutation testing, issue 28) ----

def test_sudoku_reads_a_grid_written_after_the_closing_tag_only_when_nothing_else_follows():
    """A model that closes the tag and then writes the grid (rows on lines, in a code fence) is read;
    text after the last closing tag that is not only digits, whitespace and fences is not, and the
    answer then comes from the tagged region."""
    task = get_task("sudoku4")
    grid, rows = SUDOKU["solution"], "3142\n2431\n4213\n1324"
    cases = {
        f"<answer>\nsee below\n</answer>\n{rows}": grid,
        f"<answer>\nsee below\n</answer>\n```\n{rows}\n```": grid,
        f"</answer>\n{grid}": grid,  # a stray closing tag at the very start of the text
        f"<answer>\n3142\n</answer>\n</answer>\n{grid}": grid,  # after the LAST closing tag
        f"<answer>\nsee below\n</answer>X{grid}": None,  # a letter after the tag: prose, not a grid
        "<answer>\n3142 2431 4213 1324\n</answer>\nDone.": grid,  # prose after the tag: the region's words
        "<answer>\n3142 2431 4213 1324": grid,  # unclosed: the region's words
        "<answer>\nsee below\n</answer>\nDone.": None,
    }
    for completion, answer in cases.items():
        assert task.extract_answer(completion) == answer, completion
        assert task.is_correct(completion, SUDOKU) is (answer == grid), completion


def test_sudoku_reads_words_of_a_tagged_region_up_to_1000_characters_and_compact_text_up_to_64():
    """The limits on what is read as a grid: an answer region of at most 1000 characters is read
    word by word (cells with separators), a longer one only for a written-out 16-digit run; an
    untagged completion of digits and whitespace is the grid when at most 64 characters long
    (stripped), a longer one counts only for a 16-digit run."""
    task = get_task("sudoku4")
    spaced = " ".join(SUDOKU["solution"])  # 31 characters, no 16-digit run
    for length, read in ((1000, True), (1001, False)):
        region = spaced + " " * (length - len(spaced) - 1) + "."
        assert len(region) == length
        completion = f"<answer>{region}</answer>"
        assert task.extract_answer(completion) == (SUDOKU["solution"] if read else None), length
    for length, read in ((64, True), (65, False)):
        compact = spaced + " " * (length - len(spaced) - 1) + "0"
        assert len(compact) == length
        expected = (SUDOKU["solution"] + "0")[:16] if read else None
        assert task.extract_answer(compact) == expected, length


def test_sudoku_scores_without_an_answer_or_a_clue_are_zero_and_paper_accuracy_weights_blanks():
    task = get_task("sudoku4")
    assert task.clues_kept("no grid here", SUDOKU) == 0.0 and task.reward("no grid here", SUDOKU) == 0.0
    assert task.clues_kept(SUDOKU["solution"], {"puzzle": "0" * 16, "solution": SUDOKU["solution"]}) == 0.0
    assert task.reward(SUDOKU["solution"], {"puzzle": SUDOKU["solution"], "solution": SUDOKU["solution"]}) == 0.0
    one_blank = {"puzzle": "0" + SUDOKU["solution"][1:], "solution": SUDOKU["solution"]}
    assert task.paper_accuracy([SUDOKU["solution"]], [one_blank]) == 1.0
    # blank-weighted: 8 blanks with 7 right and 1 blank right = 8 of 9, not the mean 15/16
    assert task.paper_accuracy(["3142243142131323", SUDOKU["solution"]], [SUDOKU, one_blank]) == pytest.approx(8 / 9)
    assert task.paper_accuracy([], []) == 0.0
    assert {name: weight for name, (_, weight) in task.reward_functions.items()} == {"correctness": 1.0, "clues_kept": 0.0}


def test_sudoku_d1_prompt_is_zero_shot_by_default():
    task = get_task("sudoku4")
    assert task.d1_prompt(SUDOKU) == task.prompt(SUDOKU, "d1") != task.d1_prompt(SUDOKU, shots=1)


def test_sudoku_plausible_wrong_demonstration_fills_each_row_with_its_smallest_free_digits():
    """Row by row, each blank gets the smallest digit its row lacks (clues and earlier fills): every
    row valid, clues untouched, columns and boxes ignored."""
    task = get_task("sudoku4")
    cases = {
        "3102200002100320": "3142213432141324",
        "0000" * 4: "1234" * 4,
        "0040" + "3000" + "0001" + "0200": "1243" + "3124" + "2341" + "1234",
        SUDOKU["solution"]: SUDOKU["solution"],
    }
    for puzzle, fill in cases.items():
        assert task.plausible_wrong_demonstration({"puzzle": puzzle, "solution": ""}) == fill, puzzle


def test_sudoku_csv_refuses_a_letter_in_a_puzzle_and_a_file_without_rows(tmp_path):
    task = get_task("sudoku4")
    letter = tmp_path / "letter.csv"
    letter.write_text("Puzzle,Solution\nX102200002100320,3142243142131324\n")
    with pytest.raises(ValueError, match=r"letter.csv:2: Puzzle must be 16 digits 0-4 \(0 = blank\), got 'X102200002100320'$"):
        task.load("test", path=str(letter))
    header_only = tmp_path / "header_only.csv"
    header_only.write_text("Puzzle,Solution\n\n")
    with pytest.raises(ValueError, match=r"header_only.csv: no puzzles in the file$"):
        task.load("test", path=str(header_only))


def test_sudoku_options_take_their_documented_ranges_and_refuse_the_rest_in_one_line():
    get_task("sudoku4", num_blanks=12)
    get_task("sudoku4", num_blanks=1)
    get_task("sudoku4", test_grids=287)
    for options, message in [
        ({"num_blanks": 13}, "num_blanks must be in 1..12 (a 4x4 sudoku needs >= 4 clues), got 13"),
        ({"num_blanks": 0}, "num_blanks must be in 1..12 (a 4x4 sudoku needs >= 4 clues), got 0"),
        ({"test_grids": 288}, "test_grids must be in 1..287, got 288"),
        ({"test_grids": 0}, "test_grids must be in 1..287, got 0"),
    ]:
        with pytest.raises(ValueError) as refused:
            get_task("sudoku4", **options)
        assert str(refused.value) == message


def test_sudoku_asking_for_more_distinct_puzzles_than_exist_is_refused_with_the_count_found():
    """One test grid with one blank has exactly 16 puzzles (one per cell), all with one solution:
    16 are generated, a 17th is refused in one message naming how many were found."""
    task = get_task("sudoku4", num_blanks=1, test_grids=1)
    puzzles = task.load("test", limit=16)
    assert sorted(ex["puzzle"].index("0") for ex in puzzles) == list(range(16))
    with pytest.raises(ValueError, match=r"^only 16 distinct unique-solution puzzles with 1 blanks found on the test "
                                         r"grids; ask for fewer or use fewer blanks$"):
        task.load("test", limit=17)
    # one grid with 12 blanks holds 12 unique-solution puzzles, and seed 0's first batch of 256 draws finds
    # none of them: the refusal still comes as one message, not from the empty first batch
    with pytest.raises(ValueError, match=r"^only 12 distinct unique-solution puzzles with 12 blanks found"):
        get_task("sudoku4", num_blanks=12, test_grids=1).load("test", limit=13)


def test_sudoku_compact_answers_are_digits_and_whitespace_padded_with_zeros():
    """d1 pads a short grid with 0 (a blank, never right); a letter makes the text prose, where only
    a written-out 16-digit run counts."""
    task = get_task("sudoku4")
    assert task.extract_answer("31422431") == "3142243100000000"
    assert task.extract_answer("X 3142 2431 4213 1324") is None
    assert task.extract_answer("X 3142243142131324") == SUDOKU["solution"]


def test_sudoku_generation_refuses_only_after_50_fruitless_batches_in_a_row(monkeypatch):
    """Batches that find no new puzzle are counted in a row, not in total: with batches of one draw,
    100 of the 120 two-blank puzzles of one grid take 230 batches, 130 of them fruitless but never
    more than 26 in a row, so all 100 are generated."""
    from dipod.lm.tasks import sudoku4

    monkeypatch.setattr(sudoku4, "_BATCH", 1)
    puzzles = get_task("sudoku4", num_blanks=2, test_grids=1).load("test", limit=100)
    assert len({ex["puzzle"] for ex in puzzles}) == 100 and all(ex["puzzle"].count("0") == 2 for ex in puzzles)
