"""Language-model tasks: data, prompts, answer extraction and rewards (see docs/lm_tasks.md).

    task = get_task("sudoku4")            # or get_task("countdown", seed=1), ...
    examples = task.load("test", limit=100)
    prompt = task.prompt(examples[0], "compact")      # or "chat" for instruct models
    task.reward(completion_text, examples[0])         # float in [0, 1], never raises

Users add a task by subclassing `Task` and decorating the class with `@register_task`.
"""

from .base import MAX_COMPLETION_CHARS, STYLES, Task, get_task, register_task, registered_tasks
from .countdown import CountdownTask
from .gsm8k import GSM8KTask
from .math500 import Math500Task
from .sudoku4 import Sudoku4Task

__all__ = [
    "MAX_COMPLETION_CHARS",
    "STYLES",
    "CountdownTask",
    "GSM8KTask",
    "Math500Task",
    "Sudoku4Task",
    "Task",
    "get_task",
    "register_task",
    "registered_tasks",
]
