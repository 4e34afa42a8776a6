"""The ``dipod`` command: a thin dispatcher; each subcommand lives in its own module.

Modules are imported only when their command runs, so ``dipod toy`` never imports transformers
and ``dipod lm ...`` never imports MuJoCo.
"""

from __future__ import annotations

import importlib
import shlex
import sys

from dipod.quiet import silence_third_party_noise
from dipod.runlog import TrainingDiverged

# command path -> (module with a ``main(argv) -> int``, one-line help)
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("toy",): ("dipod.toy", "exact two-token diagnostic of double drift (paper Fig. 2)"),
    ("lm", "train"): ("dipod.lm.trainer", "online RL post-training of a masked-diffusion LM (d1/FPO/FPO++/SPG + DiPOD)"),
    ("lm", "sft"): ("dipod.lm.sft", "masked-diffusion supervised training (LLaDA loss); makes tiny reference policies"),
    ("lm", "eval"): ("dipod.lm.evaluate", "accuracy and mean reward of a model on a task (greedy by default)"),
    ("lm", "generate"): ("dipod.lm.generate", "print a model's completions on a task's prompts"),
    ("lm", "memory"): ("dipod.lm.memory", "per-GPU peak memory of a train config (--num_gpus, --engine) before any GPU"),
    ("lm", "eval-sweep"): ("dipod.lm.eval_sweep", "the paper's evaluation of every checkpoint of a run (lengths 128/256/512, chosen on validation)"),
    ("plot",): ("dipod.plot", "overlay the metrics (reward, accuracy, gap) of run folders in one PNG"),
    ("demo",): ("dipod.demo", "main job: tiny sudoku4 policy post-trained with SPG(mix)+DiPOD, before/after table + plot"),
    ("control", "train"): ("dipod.control.train", "train a flow (FPO++ + DiPOD) or Gaussian (PPO) policy on a gymnasium task"),
    ("control", "eval"): ("dipod.control.evaluate", "evaluate a control checkpoint over whole episodes"),
}


# how each resumable command continues its run after an interruption
RESUME_FLAGS = {("lm", "train"): ["--resume", "latest"], ("lm", "sft"): ["--resume", "true"],
                ("control", "train"): ["--resume", "latest"]}


def _interrupted(path: tuple[str, ...], args: list[str]) -> str:
    """The Ctrl-C line: what is kept, and the command that continues (or reruns) the run."""
    resume = RESUME_FLAGS.get(path)
    if resume is None:
        return "interrupted; nothing was written that a rerun of the same command does not redo"
    if "--resume" in args:
        at = args.index("--resume")
        args = args[:at] + args[at + 2:] if at + 1 < len(args) and not args[at + 1].startswith("--") else \
            args[:at] + args[at + 1:]
    command = " ".join(["dipod", *path, *(shlex.quote(a) for a in args), *resume])
    return f"interrupted; the checkpoints already written are kept, continue with: {command}"


def _usage() -> str:
    lines = ["usage: dipod COMMAND [ARGS...]   (dipod COMMAND --help for its flags)", "", "commands:"]
    for path, (_, text) in sorted(COMMANDS.items()):
        lines.append(f"  {' '.join(path):<16} {text}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    for depth in (2, 1):
        path = tuple(argv[:depth])
        if path in COMMANDS:
            module_name, _ = COMMANDS[path]
            prog = "dipod " + " ".join(path)
            silence_third_party_noise(language_models=path[0] in ("lm", "demo"))
            module = importlib.import_module(module_name)
            try:
                return int(module.main(argv[depth:], prog=prog) or 0)
            except (ValueError, OSError) as exc:
                # Bad input (configs, flags, data files) and unusable folders or disks end with one
                # clear line, not a traceback.
                print(f"{prog}: error: {exc}", file=sys.stderr)
                return 2
            except KeyboardInterrupt:
                print(f"\n{prog}: {_interrupted(path, argv[depth:])}", file=sys.stderr)
                return 130
            except TrainingDiverged as exc:  # the message says what happened and what to change
                print(f"{prog}: {exc}", file=sys.stderr)
                return 1
    print(f"dipod: unknown command {' '.join(argv[:2])!r}\n\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
