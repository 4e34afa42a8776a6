"""The paper's instruction format (the d1/SPG prompts), written here from its specification.

Every prompt asks for two sections, ``<reasoning>`` then ``<answer>``; GSM8K and MATH500 want
the final answer in ``\\boxed{}``, Countdown a boxed expression without ``=`` or the target,
Sudoku the 16-digit solved grid. The question lines keep the released layout ("Numbers: [...]\\n
Target: t", "Solve the following Sudoku puzzle: P"), because models are evaluated on exactly
those strings. The 3-shot Sudoku setting puts three solved puzzles ("Question: ... Answer:
<reasoning>...</reasoning> <answer>...</answer>") between the instruction and the question;
our three are drawn from grids that appear in neither paper test file, and their worked
solutions are generated below from the rules.
"""

from __future__ import annotations

SECTIONS = "Respond in the following format:\n<reasoning>\n{reasoning}\n</reasoning>\n<answer>\n{answer}\n</answer>"

MATH_INSTRUCTION = (
    "Act as a math expert: solve the question below step by step and put the final answer "
    "inside \\boxed{}.\n" + SECTIONS.format(reasoning="Your reasoning here", answer="\\boxed{...}")
)

COUNTDOWN_INSTRUCTION = (
    "Using only the numbers provided, write an arithmetic expression whose value is exactly the "
    "target number. You may use +, -, * and /, and every number must be used exactly once. Think "
    "step by step. After reasoning, give only the final expression inside \\boxed{}, without an "
    "equals sign or the target, for example \\boxed{a + b * c}.\n"
    + SECTIONS.format(reasoning="Your reasoning here", answer="\\boxed{...}")
)

SUDOKU_INSTRUCTION = (
    "Solve the 4x4 Sudoku puzzle below. It is written as a 16-character string, row by row from "
    "the top left, with '0' for an empty cell.\n\n"
    "Rules:\n"
    "- Every empty cell gets a digit from 1 to 4\n"
    "- Each row holds the digits 1-4 exactly once\n"
    "- Each column holds the digits 1-4 exactly once\n"
    "- Each of the four 2x2 boxes holds the digits 1-4 exactly once\n\n"
    "Your answer must be the COMPLETE solved grid: 16 characters, only the digits 1-4.\n\n"
    + SECTIONS.format(reasoning="Your step-by-step solution", answer="[the 16-digit solved grid, no spaces or separators]")
)

# (puzzle, solution) of the three worked examples: grids in neither sudoku4_d1_test.csv nor
# sudoku4_spg_test.csv (tests/test_lm_tasks.py checks this), 8 blanks, unique solutions.
SUDOKU_SHOTS = (
    ("0304140330010030", "2314142332414132"),
    ("0030031030010143", "1234431234212143"),
    ("2030431034001000", "2134431234211243"),
)


def math_prompt(question: str) -> str:
    return f"{MATH_INSTRUCTION}\n\n{question}"


def countdown_prompt(numbers: list[int], target: int) -> str:
    return f"{COUNTDOWN_INSTRUCTION}\n\nNumbers: {list(numbers)}\nTarget: {target}"


def sudoku_prompt(puzzle: str, shots: int = 0) -> str:
    if not 0 <= shots <= len(SUDOKU_SHOTS):
        raise ValueError(f"sudoku shots must be in 0..{len(SUDOKU_SHOTS)}, got {shots}")
    if shots == 0:
        return f"{SUDOKU_INSTRUCTION}\n\nSolve the following Sudoku puzzle: {puzzle}\n"
    examples = "\n\n".join(
        f"Question:\nSolve the following Sudoku puzzle: {p}\nAnswer:\n<reasoning>\n{worked_solution(p, s)}\n"
        f"</reasoning>\n<answer>\n{s}\n</answer>"
        for p, s in SUDOKU_SHOTS[:shots]
    )
    return f"{SUDOKU_INSTRUCTION}\n\n{examples}\n\nQuestion: Solve the following Sudoku puzzle: {puzzle}\nAnswer:\n"


def _rows(grid: str) -> str:
    return "\n".join(f"R{r + 1}: " + " ".join(grid[4 * r : 4 * r + 4]) for r in range(4))


def _peers(cell: int) -> set[int]:
    row, col = divmod(cell, 4)
    box = [(row // 2 * 2 + r) * 4 + col // 2 * 2 + c for r in range(2) for c in range(2)]
    return ({row * 4 + c for c in range(4)} | {r * 4 + col for r in range(4)} | set(box)) - {cell}


def worked_solution(puzzle: str, solution: str) -> str:
    """A step-by-step solution in the released examples' shape: the rows, one line per filled
    cell (each a cell whose row, column and box leave one digit), the final rows."""
    cells = list(puzzle)
    steps = []
    while "0" in cells:
        for cell in (i for i, c in enumerate(cells) if c == "0"):
            left = set("1234") - {cells[p] for p in _peers(cell)}
            if len(left) == 1:
                digit = left.pop()
                row, col = divmod(cell, 4)
                steps.append(f"R{row + 1}C{col + 1} can only be {digit} → R{row + 1}C{col + 1}={digit}.")
                cells[cell] = digit
                break
        else:
            raise ValueError(f"puzzle {puzzle} needs more than single-candidate steps")
    if "".join(cells) != solution:
        raise ValueError(f"puzzle {puzzle} does not solve to {solution}")
    return (f"The puzzle as four rows:\n{_rows(puzzle)}\n\nCells with a single candidate, in order:\n"
            + "\n".join(steps) + f"\n\nSolved grid:\n{_rows(solution)}")
