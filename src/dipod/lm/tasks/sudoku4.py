"""4x4 sudoku: puzzles generated from all 288 valid grids, each with exactly one solution.

Examples are ``{"puzzle": "3102200002100320", "solution": "3142243142131324"}``: 16 digits read
row by row, ``0`` for a blank. The 288 grids are split by a seeded shuffle into test grids and
train grids, so no solution grid appears in both splits. The paper's files are the splits
`d1_test` (500 puzzles) and `spg_test` (256, the zero-shot split SPG and the paper report); the
generated split `paper_train` uses only the 43 grids that neither file contains, as the paper's
own training split was built. A puzzle is a grid with `num_blanks`
cells blanked; it is kept only when exactly one of the 288 grids agrees with its clues. That test
is exact, because every solution of a 4x4 puzzle is one of the 288 valid grids.

Reward (as d1): the fraction of blank cells the answer fills with the right digit; accuracy: all
16 cells right. The grid is read from the answer region of `answer_format` (unclosed and stray
tags included): its last run of 16 digits, else digits written after a stray ``</answer>``, else
the digits of its all-digit words (so "4x4" or "R1C2" in prose never enter the grid); without
tags, a compact completion of digits, or a 16-digit run in the text. Then padded with 0 or cut
to 16 as d1 does.
"""

from __future__ import annotations

import functools
import re

import numpy as np

from .answer_format import CHAT_FORMAT, CLOSE_STEM, answer_region, before_eos
from .base import GeneratedTask, register_task
from .d1_prompts import sudoku_prompt
from .data_files import data_file, read_csv

CELLS = 16
D1_TEST_FILE = "sudoku4_d1_test.csv"
SPG_TEST_FILE = "sudoku4_spg_test.csv"  # the 256-puzzle zero-shot split SPG and the paper report
_STREAMS = {"train": 0, "test": 1, "paper_train": 2}
_MAX_TAGGED_CHARS = 1000  # an answer of 16 digits has no business being longer
_MAX_COMPACT_CHARS = 64
_BATCH = 256
_GRID_RUN = re.compile(r"(?<![0-9])[0-9]{16}(?![0-9])")
_WORD = re.compile(r"\w+")


def _unit_of(cell: int) -> tuple[int, int, int]:
    row, col = divmod(cell, 4)
    return row, 4 + col, 8 + (row // 2) * 2 + col // 2  # ids of its row, column and box


@functools.cache
def all_grids() -> tuple[str, ...]:
    """The 288 valid 4x4 sudoku grids, in lexicographic order (filled cell by cell)."""
    grids: list[str] = []
    cells: list[str] = []
    used: list[set[str]] = [set() for _ in range(12)]

    def fill(cell: int) -> None:
        if cell == CELLS:
            grids.append("".join(cells))
            return
        units = _unit_of(cell)
        for digit in "1234":
            if all(digit not in used[u] for u in units):
                for u in units:
                    used[u].add(digit)
                cells.append(digit)
                fill(cell + 1)
                cells.pop()
                for u in units:
                    used[u].discard(digit)

    fill(0)
    return tuple(grids)


@functools.cache
def _grid_array() -> np.ndarray:
    return np.array([[int(c) for c in grid] for grid in all_grids()], dtype=np.int8)


def solution_counts(puzzles_nc: np.ndarray) -> np.ndarray:
    """Number of solutions of each puzzle in `puzzles_nc` [N, 16] (0 = blank), vectorised."""
    grids_gc = _grid_array()
    clue_n1c = puzzles_nc[:, None, :]
    agrees_ng = ((clue_n1c == 0) | (clue_n1c == grids_gc[None, :, :])).all(axis=2)
    return agrees_ng.sum(axis=1)


@functools.cache
def paper_train_grids() -> np.ndarray:
    """Indices (into `all_grids`) of the grids that no puzzle of either paper test file solves to:
    the `paper_train` split is made of these, so it holds none of the paper's test grids."""
    tested = {ex["solution"] for name in (D1_TEST_FILE, SPG_TEST_FILE) for ex in read_sudoku_csv(data_file(name))}
    return np.array([i for i, grid in enumerate(all_grids()) if grid not in tested])


def _digits(text: str) -> str:
    return "".join(c for c in text if c in "0123456789")


def last_grid_run(text: str) -> str:
    """The last run of exactly 16 digits in `text` (a grid written out), or ""."""
    runs = _GRID_RUN.findall(text)
    return runs[-1] if runs else ""


def digits_after_close(text: str) -> str:
    """The digits after the last closing answer tag when nothing else is there but whitespace and
    code fences (models often close the tag, then write the grid), or ""."""
    close = text.rfind(CLOSE_STEM)
    if close < 0:
        return ""
    tail = text[close + len(CLOSE_STEM) :].lstrip(">}").replace("`", "")
    tail = "".join(tail.split())
    return tail if tail.isascii() and tail.isdigit() else ""


def grid_words(region: str) -> str:
    """The digits of the region's all-digit words, in order (rows one per line, or cells with
    separators such as "1 2 | 3 4"). Words that mix digits and letters ("4x4", "R1C2") are prose."""
    return "".join(word for word in _WORD.findall(region) if word.isascii() and word.isdigit())


@register_task
class Sudoku4Task(GeneratedTask):
    name = "sudoku4"
    file_splits = {"d1_test": D1_TEST_FILE, "spg_test": SPG_TEST_FILE}

    def __init__(self, num_blanks: int = 8, seed: int = 0, test_grids: int = 48,
                 train_size: int = 5000, test_size: int = 500, paper_train_size: int = 5000):
        if not 1 <= num_blanks <= 12:
            raise ValueError(f"num_blanks must be in 1..12 (a 4x4 sudoku needs >= 4 clues), got {num_blanks}")
        if not 1 <= test_grids < len(all_grids()):
            raise ValueError(f"test_grids must be in 1..{len(all_grids()) - 1}, got {test_grids}")
        self.num_blanks, self.seed = num_blanks, seed
        self.default_size = {"train": train_size, "test": test_size, "paper_train": paper_train_size}
        order = np.random.default_rng(seed).permutation(len(all_grids()))
        self.split_grids = {"test": np.sort(order[:test_grids]), "train": np.sort(order[test_grids:])}

    # -- data ----------------------------------------------------------------------------------

    def _read_file(self, path: str) -> list[dict]:
        return read_sudoku_csv(path)

    def _generate(self, split: str, count: int) -> list[dict]:
        """The first `count` puzzles of the split's deterministic stream (so a smaller `count`
        gives a prefix of a larger one)."""
        grids = paper_train_grids() if split == "paper_train" else self.split_grids[split]
        grids_gc = _grid_array()[grids]
        rng = np.random.default_rng([self.seed, _STREAMS[split]])
        rows_b1 = np.arange(_BATCH)[:, None]
        examples: list[dict] = []
        seen: set[bytes] = set()
        fruitless = 0
        while len(examples) < count:
            solutions_bc = grids_gc[rng.integers(len(grids_gc), size=_BATCH)]
            blanks_bk = np.argsort(rng.random((_BATCH, CELLS)), axis=1)[:, : self.num_blanks]
            puzzles_bc = solutions_bc.copy()
            puzzles_bc[rows_b1, blanks_bk] = 0
            unique_b = solution_counts(puzzles_bc) == 1
            before = len(examples)
            for puzzle, solution in zip(puzzles_bc[unique_b], solutions_bc[unique_b]):
                key = puzzle.tobytes()
                if key not in seen and len(examples) < count:
                    seen.add(key)
                    examples.append({"puzzle": "".join(map(str, puzzle)), "solution": "".join(map(str, solution))})
            fruitless = 0 if len(examples) > before else fruitless + 1
            if fruitless >= 50:
                raise ValueError(
                    f"only {len(examples)} distinct unique-solution puzzles with {self.num_blanks} blanks "
                    f"found on the {split} grids; ask for fewer or use fewer blanks"
                )
        return examples

    # -- prompts -------------------------------------------------------------------------------

    def d1_prompt(self, example: dict, shots: int = 0) -> str:
        return sudoku_prompt(example["puzzle"], shots)

    def compact_prompt(self, example: dict) -> str:
        return example["puzzle"]

    def chat_prompt(self, example: dict) -> str:
        return (
            "Solve this 4x4 Sudoku. Replace every 0 with a digit from 1 to 4 so that each row, "
            "each column and each of the four 2x2 boxes contains 1, 2, 3 and 4 exactly once.\n"
            "The grid is written as 16 digits, row by row, 0 for an empty cell:\n"
            f"{example['puzzle']}\n\n"
            "Inside the answer tags write only the solved grid as 16 digits, row by row.\n"
            + CHAT_FORMAT
        )

    def demonstration(self, example: dict) -> str:
        return example["solution"]

    def plausible_wrong_demonstration(self, example: dict) -> str:
        """Row by row, each blank gets the smallest digit not yet in its row (clues and earlier
        fills): every row is valid, columns and boxes are ignored, so the grid is rarely solved."""
        cells = list(example["puzzle"])
        for row in range(4):
            for cell in range(4 * row, 4 * row + 4):
                if cells[cell] == "0":
                    taken = set(cells[4 * row:4 * row + 4])
                    cells[cell] = next(d for d in "1234" if d not in taken)
        return "".join(cells)

    # -- scoring -------------------------------------------------------------------------------

    def _extract_answer(self, completion: str) -> str | None:
        text = before_eos(completion)
        region = answer_region(text)
        if region is not None:
            words = grid_words(region) if len(region) <= _MAX_TAGGED_CHARS else ""
            digits = last_grid_run(region) or digits_after_close(text) or words
        elif len(text.strip()) <= _MAX_COMPACT_CHARS and all(c in "0123456789 \n\t" for c in text.strip()):
            digits = _digits(text)  # compact format: the completion is the grid
        else:  # untagged prose: only a written-out 16-digit grid counts
            digits = last_grid_run(text)
        if not digits:
            return None
        return digits[:CELLS].ljust(CELLS, "0")

    def _reward(self, completion: str, example: dict) -> float:
        answer = self._extract_answer(completion)
        blanks = [i for i, c in enumerate(example["puzzle"]) if c == "0"]
        if answer is None or not blanks:
            return 0.0
        return sum(answer[i] == example["solution"][i] for i in blanks) / len(blanks)

    def _is_correct(self, completion: str, example: dict) -> bool:
        return self._extract_answer(completion) == example["solution"]

    def clues_kept(self, completion, example: dict) -> float:
        """Fraction of the clue cells the answer copies unchanged (0 without an answer)."""
        answer = self.extract_answer(completion)
        clues = [i for i, c in enumerate(example["puzzle"]) if c != "0"]
        if answer is None or not clues:
            return 0.0
        return sum(answer[i] == example["puzzle"][i] for i in clues) / len(clues)

    @property
    def reward_functions(self):
        """d1's reward and ``clues_kept`` at weight 0 (runs turn it on with ``reward_weights``): d1's
        reward ignores the clue cells, and the tiny policy under RL rewrites them for free, which
        breaks every answer (docs/lm_rl_diagnosis.md)."""
        return {"correctness": (self.reward, 1.0), "clues_kept": (self.clues_kept, 0.0)}

    def paper_accuracy(self, completions: list, examples: list[dict]) -> float:
        """d1's sudoku accuracy: blank cells filled correctly over all blank cells of the set."""
        blanks = [ex["puzzle"].count("0") for ex in examples]
        filled = sum(self.reward(c, ex) * b for c, ex, b in zip(completions, examples, blanks))
        return filled / max(sum(blanks), 1)


def read_sudoku_csv(path) -> list[dict]:
    """Read the d1/SPG CSV format (columns Puzzle, Solution), checking every row."""
    valid = set(all_grids())
    examples = []
    for line, row in read_csv(path, ("Puzzle", "Solution")):
        puzzle, solution = row["Puzzle"], row["Solution"]
        where = f"{path}:{line}"
        if len(puzzle) != CELLS or any(c not in "01234" for c in puzzle):
            raise ValueError(f"{where}: Puzzle must be 16 digits 0-4 (0 = blank), got {puzzle!r}")
        if solution not in valid:
            raise ValueError(f"{where}: Solution {solution!r} is not a valid 4x4 sudoku grid")
        if any(p != "0" and p != s for p, s in zip(puzzle, solution)):
            raise ValueError(f"{where}: Puzzle {puzzle!r} contradicts its Solution {solution!r}")
        examples.append({"puzzle": puzzle, "solution": solution})
    if not examples:
        raise ValueError(f"{path}: no puzzles in the file")
    return examples
