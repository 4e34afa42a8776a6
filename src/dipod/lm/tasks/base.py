"""The `Task` interface every language-model task implements, and the registry of task names.

A task owns its data (`load`), how a question is shown to a model (`prompt`), what a correct
answer looks like (`demonstration`) and how a completion is scored (`reward`, `is_correct`,
`reward_functions`). Completions are untrusted model output: the public scoring methods take any
object, refuse non-strings and over-long strings with a score of 0, and hand everything else to
the subclass hooks `_reward`, `_is_correct` and `_extract_answer`, which are written so that no
string makes them raise, hang or run code (see tests/test_lm_tasks.py for the fuzzing).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar

from .data_files import data_file

# compact: the tiny model's bare prompt; chat: our instruction for instruct models; d1: the
# paper's instruction format (d1/SPG: reasoning and answer sections, math answers boxed);
# d1_3shot: d1 with three solved examples before the question (the released sudoku setting).
STYLES = ("compact", "chat", "d1", "d1_3shot")
CHAT_STYLES = ("chat", "d1", "d1_3shot")  # styles whose text is a user turn for the chat template
# What the paper's evaluation appends after the chat template's assistant header: the model
# continues an opened reasoning section. Training prompts (SPG, d1) end at the header.
EVAL_RESPONSE_PREFIX = {"d1": "<reasoning>", "d1_3shot": "<reasoning>"}

# Far above any real completion (LLaDA's longest setting, 512 tokens, is a few thousand
# characters); a longer string is garbage and scores 0 without being parsed at all.
MAX_COMPLETION_CHARS = 200_000

RewardFn = Callable[[Any, dict], float]


def _scorable(completion: Any) -> bool:
    return isinstance(completion, str) and len(completion) <= MAX_COMPLETION_CHARS


def guarded(score: Callable[[str, dict], float]) -> RewardFn:
    """Wrap a (completion, example) -> float scorer so non-strings and huge strings get 0.0."""

    def guarded_score(completion: Any, example: dict) -> float:
        return float(score(completion, example)) if _scorable(completion) else 0.0

    guarded_score.__name__ = getattr(score, "__name__", "reward")
    return guarded_score


class Task(ABC):
    """One task. Subclasses set `name` and implement the abstract methods; register them with
    `@register_task`. Task options (sizes, seeds) are constructor keyword arguments."""

    name: ClassVar[str]
    splits: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def load(self, split: str, path: str | None = None, limit: int | None = None) -> list[dict]:
        """Examples of `split` (or read from `path`), at most `limit` of them."""

    @abstractmethod
    def compact_prompt(self, example: dict) -> str:
        """Short prompt for the tiny character-level model."""

    @abstractmethod
    def chat_prompt(self, example: dict) -> str:
        """User-message text for instruct models (the caller applies the chat template)."""

    def d1_prompt(self, example: dict, shots: int = 0) -> str:
        """User-turn text in the paper's instruction format, after `shots` solved examples."""
        raise ValueError(f"task {self.name} has no d1 prompt; use one of compact, chat")

    @abstractmethod
    def demonstration(self, example: dict) -> str:
        """A correct completion in the compact format (used to train tiny reference policies)."""

    def plausible_wrong_demonstration(self, example: dict) -> str:
        """A well-formed answer a shallow heuristic gives, usually wrong (compact format): the tiny
        reference policies learn it beside the right answer, so that their greedy answer is often
        wrong while the right one is among their samples (docs/lm_sft.md)."""
        raise ValueError(f"task {self.name} has no plausible wrong demonstration; use wrong_demonstration_rate 0")

    @abstractmethod
    def _extract_answer(self, completion: str) -> str | None:
        """The answer a completion gives, or None when it gives none."""

    @abstractmethod
    def _reward(self, completion: str, example: dict) -> float:
        """Headline reward in [0, 1]; must not raise on any string."""

    def _is_correct(self, completion: str, example: dict) -> bool:
        return self._reward(completion, example) >= 1.0

    # -- public API: the guards live here so every task gets them -----------------------------

    def prompt(self, example: dict, style: str = "compact") -> str:
        if style == "compact":
            return self.compact_prompt(example)
        if style == "chat":
            return self.chat_prompt(example)
        if style in ("d1", "d1_3shot"):
            return self.d1_prompt(example, shots=3 if style == "d1_3shot" else 0)
        raise ValueError(f"unknown prompt style {style!r}; use one of {', '.join(STYLES)}")

    def extract_answer(self, completion: Any) -> str | None:
        return self._extract_answer(completion) if _scorable(completion) else None

    def reward(self, completion: Any, example: dict) -> float:
        return float(self._reward(completion, example)) if _scorable(completion) else 0.0

    def is_correct(self, completion: Any, example: dict) -> bool:
        return bool(self._is_correct(completion, example)) if _scorable(completion) else False

    def paper_accuracy(self, completions: list, examples: list[dict]) -> float:
        """The accuracy the paper reports for these completions: the fraction graded correct."""
        return sum(self.is_correct(c, ex) for c, ex in zip(completions, examples)) / max(len(examples), 1)

    @property
    def reward_functions(self) -> dict[str, tuple[RewardFn, float]]:
        """name -> (callable(completion, example) -> float, weight); the trainer sums
        weight * value. Default: the headline reward alone."""
        return {"correctness": (self.reward, 1.0)}


class GeneratedTask(Task):
    """A task whose generated splits (`default_size`: split -> size) are deterministic streams
    made here and whose file splits (`file_splits`: split -> file name, e.g. `d1_test`) are the
    paper's evaluation files shipped in dipod/lm/data. Subclasses set both and implement
    `_read_file` and `_generate`."""

    file_splits: ClassVar[dict[str, str]]
    default_size: dict[str, int]

    @property
    def splits(self) -> tuple[str, ...]:
        return (*self.default_size, *self.file_splits)

    def load(self, split: str, path: str | None = None, limit: int | None = None) -> list[dict]:
        check_limit(limit)
        if path is None and split in self.file_splits:
            path = data_file(self.file_splits[split])
        if path is not None:
            examples = self._read_file(path)
            return examples if limit is None else examples[:limit]
        if split not in self.default_size:
            raise ValueError(f"unknown {self.name} split {split!r}; use one of {', '.join(self.splits)}")
        return self._generate(split, self.default_size[split] if limit is None else limit)

    @abstractmethod
    def _read_file(self, path: str) -> list[dict]:
        """Every example of a data file in the format the paper's code uses."""

    @abstractmethod
    def _generate(self, split: str, count: int) -> list[dict]:
        """The first `count` examples of the split's deterministic stream."""


def check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative integer or None, got {limit!r}")


_REGISTRY: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator adding a Task subclass to the registry under `cls.name`."""
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise TypeError(f"register_task expects a Task subclass, got {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__name__} needs a non-empty class attribute `name`")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"a task named {name!r} is already registered ({_REGISTRY[name].__name__})")
    _REGISTRY[name] = cls
    return cls


def registered_tasks() -> list[str]:
    return sorted(_REGISTRY)


def get_task(name: str, **options: Any) -> Task:
    """A new instance of the task registered as `name`, built with `options`."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; registered tasks: {', '.join(registered_tasks())}")
    return _REGISTRY[name](**options)
