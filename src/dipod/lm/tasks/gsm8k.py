"""GSM8K grade-school word problems, scored as d1 scores them.

Examples are ``{"question": ..., "answer": "72"}``; `answer` is the text after ``####`` in the
dataset's answer field (or the whole field when it has no ``####``). Data comes only from where
the user points: a local .json/.jsonl/.parquet file with `question` and `answer` fields, or a
hub dataset id such as ``openai/gsm8k`` (the only case that touches the network). The `test`
split with no file reads the packaged ``gsm8k_test.jsonl`` (offline).

Answer (the reading of `answer_format`): the last non-empty ``\\boxed{}`` before EOS, else the
answer region (unclosed and stray tags included), else the whole text. The number it states is
read by `plain_math.read_number` (units, ``\\$``, ``\\%``, ``\\text{...}``, thousands commas and LaTeX
operators removed; the part after the last ``=``; else its last number), so ``\\boxed{43,500}``,
``130 dollars`` and ``-3`` all read as numbers.

Rewards (d1's five, each here in [0, 1], weights restoring d1's scale, maximum total 4.0):
correctness x2.0 (the stated number equals the reference exactly), integer x0.5 (the
answer is all digits), strict_format x0.5, soft_format x0.5, xml_count x0.5. The headline
`reward` is correctness alone, so it is also the accuracy.
"""

from __future__ import annotations

from .answer_format import CHAT_FORMAT, before_eos, boxed_or_region, soft_format, strict_format, xml_count
from .base import RewardFn, Task, check_limit, guarded, register_task
from .d1_prompts import math_prompt
from .data_files import data_file, read_records, require_fields
from .plain_math import read_number


def final_answer(answer_field: str) -> str:
    return answer_field.split("####")[-1].strip()


def same_answer(predicted: str, reference: str) -> bool:
    """The number `predicted` states equals the reference number (exactly, as fractions)."""
    stated, wanted = read_number(predicted), read_number(reference)
    return stated is not None and stated == wanted


TEST_FILE = "gsm8k_test.jsonl"  # shipped in dipod/lm/data: the paper's 1130 test questions


@register_task
class GSM8KTask(Task):
    name = "gsm8k"
    splits = ("train", "test")

    def __init__(self, hub_config: str | None = "main"):
        self.hub_config = hub_config  # the configuration name openai/gsm8k needs on the hub

    def load(self, split: str, path: str | None = None, limit: int | None = None) -> list[dict]:
        check_limit(limit)
        if path is None and split == "test":
            path = str(data_file(TEST_FILE))
        if path is None:
            raise ValueError(
                f"gsm8k split {split!r} has no built-in data (only 'test' is read offline, from {TEST_FILE}): "
                "pass a .json/.jsonl/.parquet file with question and answer fields, or a hub dataset id "
                "such as openai/gsm8k"
            )
        examples = []
        for where, row in read_records(path, split, self.hub_config):
            if limit is not None and len(examples) >= limit:
                break
            require_fields(row, ("question", "answer"), where)
            answer = final_answer(str(row["answer"]))
            if read_number(answer) is None:
                raise ValueError(f"{where}: final answer {answer[:40]!r} is not a number (expected one after '####')")
            examples.append({"question": str(row["question"]).strip(), "answer": answer})
        return examples

    def compact_prompt(self, example: dict) -> str:
        return example["question"]

    def chat_prompt(self, example: dict) -> str:
        return (
            f"{example['question']}\n\n"
            "Inside the answer tags write only the final number.\n" + CHAT_FORMAT
        )

    def d1_prompt(self, example: dict, shots: int = 0) -> str:
        if shots:
            raise ValueError("gsm8k has no few-shot d1 prompt (the paper evaluates it zero-shot); use style d1")
        return math_prompt(example["question"])

    def demonstration(self, example: dict) -> str:
        return example["answer"]

    def _extract_answer(self, completion: str) -> str | None:
        answer = boxed_or_region(completion)
        return (before_eos(completion).strip() if answer is None else answer) or None

    def _reward(self, completion: str, example: dict) -> float:
        answer = self._extract_answer(completion)
        return 1.0 if answer is not None and same_answer(answer, example["answer"]) else 0.0

    def _integer(self, completion: str, example: dict) -> float:
        answer = self._extract_answer(completion)
        return 1.0 if answer and all(c in "0123456789" for c in answer) else 0.0

    @property
    def reward_functions(self) -> dict[str, tuple[RewardFn, float]]:
        return {
            "correctness": (self.reward, 2.0),
            "integer": (guarded(self._integer), 0.5),
            "strict_format": (guarded(lambda c, _: strict_format(c)), 0.5),
            "soft_format": (guarded(lambda c, _: soft_format(c)), 0.5),
            "xml_count": (guarded(lambda c, _: xml_count(c)), 0.5),
        }
