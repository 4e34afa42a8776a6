"""The chat prompts are pinned text.

A chat prompt is part of a checkpoint's recipe: the SFT demonstrations and RL rollouts of the
results pages were made with exactly this wording, and a model trained on one wording is evaluated
on it. A change must therefore be deliberate: it fails here, and whoever makes it updates the text
below and says in the results which runs used which wording."""

import pytest

from dipod.lm.tasks import get_task

ANSWER_FORMAT = ("Think step by step, then give the final answer. Respond in exactly this format:\n"
                 "<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>")

PINNED = [
    ("countdown", {"numbers": [3, 7, 25], "target": 46},
     "Using the numbers 3, 7, 25, write an arithmetic expression equal to 46. "
     "Use each number exactly once; you may use +, -, *, / and parentheses.\n"
     "Inside the answer tags write only the expression, for example (7-2)*4.\n" + ANSWER_FORMAT),
    ("gsm8k", {"question": "Tom has 3 apples and buys 4 more. How many does he have?", "answer": "7"},
     "Tom has 3 apples and buys 4 more. How many does he have?\n\n"
     "Inside the answer tags write only the final number.\n" + ANSWER_FORMAT),
    ("math500", {"problem": "Compute $2^{10}$.", "answer": "1024"},
     "Compute $2^{10}$.\n\n"
     "Inside the answer tags give the final answer in \\boxed{}.\n" + ANSWER_FORMAT),
    ("sudoku4", {"puzzle": "1030020420010120", "solution": "1432321423414123"},
     "Solve this 4x4 Sudoku. Replace every 0 with a digit from 1 to 4 so that each row, "
     "each column and each of the four 2x2 boxes contains 1, 2, 3 and 4 exactly once.\n"
     "The grid is written as 16 digits, row by row, 0 for an empty cell:\n"
     "1030020420010120\n\n"
     "Inside the answer tags write only the solved grid as 16 digits, row by row.\n" + ANSWER_FORMAT),
]


@pytest.mark.parametrize("name, example, text", PINNED, ids=[p[0] for p in PINNED])
def test_the_chat_prompt_is_the_pinned_text(name, example, text):
    assert get_task(name).prompt(example, "chat") == text
