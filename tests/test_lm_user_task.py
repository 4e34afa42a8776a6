"""A user's own task reaches every command: `--task package.module:Class` (a module beside the run,
imported like `python -m` would) or an installed package's `dipod.tasks` entry point works for
`lm sft`, `lm eval` (its name then comes from the model's recipe), `lm generate`, `lm train` and
`lm eval-sweep`; a bad `module:Class` is one clear line."""

from __future__ import annotations

import importlib.metadata
import json
import re
import sys

import pytest

from dipod.cli import main as dipod
from dipod.lm.tasks import get_task

MODULE = "h24_user_tasks"
# The docs' "Adding a task" example (docs/lm_tasks.md), with its train / test split.
SOURCE = '''
from dipod.lm.tasks import Task


class Sum2(Task):
    """a + b for one-digit a, b: train on the pairs with a <= b, test on those with a > b."""
    name = "sum2"
    splits = ("train", "test")

    def load(self, split, path=None, limit=None):
        if split not in self.splits:
            raise ValueError(f"unknown sum2 split {split!r}; use train or test")
        pairs = [(a, b) for a in range(10) for b in range(10) if (a <= b) == (split == "train")]
        return [{"a": a, "b": b, "answer": str(a + b)} for a, b in pairs][:limit]

    def compact_prompt(self, example):
        return f"{example['a']}+{example['b']}="

    def chat_prompt(self, example):
        return f"What is {example['a']} + {example['b']}? Answer inside <answer></answer>."

    def demonstration(self, example):
        return example["answer"]

    def _extract_answer(self, completion):
        return completion.strip() or None

    def _reward(self, completion, example):
        return float(self._extract_answer(completion) == example["answer"])


def helper():
    return 1
'''
TINY = ["--tiny_hidden_size", "32", "--tiny_layers", "1", "--tiny_heads", "2", "--tiny_intermediate_size", "32"]


@pytest.fixture()
def user_module(tmp_path, monkeypatch):
    """The task module in a folder of its own, which is the working directory (not installed)."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / f"{MODULE}.py").write_text(SOURCE)
    monkeypatch.chdir(folder)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".")])
    yield f"{MODULE}:Sum2"
    sys.modules.pop(MODULE, None)


def test_every_command_takes_a_task_named_module_colon_class(user_module, tmp_path, capsys):
    sft = tmp_path / "sft"
    assert dipod(["lm", "sft", "--task", user_module, *TINY, "--gen_length", "4", "--block_length", "4", "--steps",
                  "4", "--max_steps", "3", "--batch_size", "8", "--eval_examples", "3", "--eval_every", "0",
                  "--progress_bar", "false", "--output_dir", str(sft)]) == 0
    result = json.loads((sft / "sft_result.json").read_text())
    assert result["eval_examples"] == 3 and 0.0 <= result["eval_accuracy"] <= 1.0
    # eval: the task (and the decoding) come from the model's recipe
    assert dipod(["lm", "eval", "--model", str(sft / "model"), "--limit", "6",
                  "--json", str(tmp_path / "eval.json")]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    test = get_task(user_module).load("test", limit=6)
    assert report["task"] == "sum2" and report["num_examples"] == 6 and test[0] == {"a": 1, "b": 0, "answer": "1"}
    assert [r["prompt"] for r in report["results"]] == [f"{ex['a']}+{ex['b']}=" for ex in test]
    assert report["sampler"]["gen_length"] == 4
    assert dipod(["lm", "generate", "--model", str(sft / "model"), "--task", user_module, "--n", "2"]) == 0
    assert capsys.readouterr().out.count("--- example") == 2
    run = tmp_path / "rl"
    assert dipod(["lm", "train", "--model", str(sft / "model"), "--task", user_module, "--prompt_style", "compact",
                  "--lora_r", "0", "--dtype", "float32", "--prompts_per_step", "2", "--num_generations", "2",
                  "--gradient_accumulation_steps", "1", "--gen_length", "4", "--block_length", "4",
                  "--diffusion_steps", "4", "--num_iterations", "1", "--max_steps", "1", "--eval_examples", "3",
                  "--gap_monitor_steps", "0", "--gap_monitor_sequences", "1", "--masking", "unbiased_random",
                  "--save_final_model", "false", "--tensorboard", "false", "--progress_bar", "false",
                  "--log_completions", "0", "--output_dir", str(run)]) == 0
    assert dipod(["lm", "eval-sweep", str(run), "--val_split", "train", "--limit", "3", "--val_limit", "3",
                  "--include_base", "false"]) == 0
    sweep = json.loads((run / "eval_sweep" / "results.json").read_text())
    assert sweep["task"] == "sum2" and sweep["lengths"] == [4]
    assert {(r["step"], r["split_role"], r["num_examples"]) for r in sweep["records"]} == {
        (1, "validation", 3), (1, "test", 3)}


def test_an_installed_package_names_its_task_in_the_entry_point_group(user_module, monkeypatch):
    entry = importlib.metadata.EntryPoint(name="sum2", value=user_module, group="dipod.tasks")
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [entry] if group == "dipod.tasks" else [])
    assert get_task("sum2").load("train", limit=2) == [{"a": 0, "b": 0, "answer": "0"},
                                                       {"a": 0, "b": 1, "answer": "1"}]


@pytest.mark.parametrize("spec, message", [
    ("no_such_module_h24:Task", "cannot import module 'no_such_module_h24'.*PYTHONPATH"),
    (f"{MODULE}:Missing", f"module '{MODULE}' has no attribute 'Missing'"),
    (f"{MODULE}:helper", "helper is not a subclass of dipod.lm.tasks.Task"),
    (":Sum2", "package.module:Class"),
    ("sum_two", "unknown task 'sum_two'.*package.module:Class"),
])
def test_a_bad_task_name_is_one_clear_line(user_module, spec, message, capsys):
    assert dipod(["lm", "eval", "--model", "reference:sudoku4", "--task", spec]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("dipod lm eval: error: ")
    assert re.search(message, err[-1]), err[-1]


def test_a_task_spec_is_split_at_its_first_colon_and_messages_are_whole(user_module):
    from dipod.lm.tasks.base import _import_task

    with pytest.raises(ValueError) as refused:
        _import_task(f"{MODULE}:Sum2:extra")
    assert str(refused.value) == (f"--task {MODULE}:Sum2:extra: module '{MODULE}' has no attribute 'Sum2:extra'; "
                                  "name a Task subclass defined there")
    with pytest.raises(ValueError) as refused:
        _import_task("no_such_module_h24:Task")
    assert str(refused.value) == ("--task no_such_module_h24:Task: cannot import module 'no_such_module_h24' (No "
                                  "module named 'no_such_module_h24'); make it importable (install its package, run "
                                  "from its folder, or add the folder to PYTHONPATH)")


@pytest.mark.parametrize("entries", [["CWD"], [""]])
def test_the_working_directory_joins_the_import_path_only_when_it_is_not_there(user_module, monkeypatch, entries):
    import os

    from dipod.lm.tasks.base import _import_task

    path = [os.getcwd() if e == "CWD" else e for e in entries] + [p for p in sys.path if p]
    monkeypatch.setattr(sys, "path", list(path))
    assert _import_task(user_module).name == "sum2"
    assert sys.path == path  # nothing appended: the folder is importable already


def test_registering_a_task_checks_the_class_and_its_name():
    from dipod.lm.tasks.base import Task, register_task

    with pytest.raises(TypeError) as refused:
        register_task(5)
    assert str(refused.value) == "register_task expects a Task subclass, got 5"
    for name in (None, ""):
        nameless = type("Nameless", (Task,), {} if name is None else {"name": name})
        with pytest.raises(ValueError) as refused:
            register_task(nameless)
        assert str(refused.value) == "Nameless needs a non-empty class attribute `name`"


def test_guarded_rewards_score_strings_and_keep_the_scorer_name():
    import functools

    from dipod.lm.tasks.base import MAX_COMPLETION_CHARS, guarded

    def half_of_value(completion, example):
        return example["value"] / 2

    reward = guarded(half_of_value)
    assert reward("text", {"value": 3}) == 1.5 and reward.__name__ == "half_of_value"
    assert reward("x" * MAX_COMPLETION_CHARS, {"value": 3}) == 1.5  # the longest completion is still graded
    assert reward(None, {"value": 3}) == 0.0 and reward("x" * (MAX_COMPLETION_CHARS + 1), {"value": 3}) == 0.0
    assert guarded(functools.partial(half_of_value)).__name__ == "reward"  # a callable without a name


def test_the_base_task_defaults_refuse_in_one_line_and_grade_an_empty_list_as_zero(user_module):
    task = get_task(user_module)
    with pytest.raises(ValueError) as refused:
        task.d1_prompt({"a": 1, "b": 2})
    assert str(refused.value) == "task sum2 has no d1 prompt; use one of compact, chat"
    with pytest.raises(ValueError) as refused:
        task.plausible_wrong_demonstration({"a": 1, "b": 2})
    assert str(refused.value) == "task sum2 has no plausible wrong demonstration; use wrong_demonstration_rate 0"
    assert task.paper_accuracy([], []) == 0.0
    assert task.paper_accuracy(["3"], [{"a": 1, "b": 2, "answer": "3"}]) == 1.0
    from dipod.lm.tasks.base import MAX_COMPLETION_CHARS

    right = {"a": 1, "b": 2, "answer": "3"}
    assert task.is_correct("3", right) and not task.is_correct(None, right)  # not text: never correct
    assert not task.is_correct("3" + " " * MAX_COMPLETION_CHARS, right)  # too long to grade
