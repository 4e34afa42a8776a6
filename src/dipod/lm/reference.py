"""Tiny reference policies for `sudoku4` and `countdown`: SFT recipes with room for RL, shipped and cached.

A recipe has a name (``RECIPES``; ``--model reference:NAME``): ``sudoku4`` and ``countdown`` train the
tiny ModernBERT (full-sequence masked diffusion) on their task; ``sudoku4_block`` trains a tiny SDAR
(block-causal, blocks of 4) on sudoku4 the same way.

A reference policy should stand in for a pretrained model with latent skill: its greedy answer is
often wrong while the right answer is often among its samples (pass@8 well above greedy). A recipe
is a list of SFT stages, each starting from the previous stage's model:

1. ``converge``: the task's demonstrations until the held-out accuracy stops rising (cosine decay);
2. ``mislead``: a few hundred steps more on demonstrations that show, with probability
   ``wrong_demonstration_rate``, the task's plausible wrong answer instead of the right one
   (``Task.plausible_wrong_demonstration``: sudoku4 fills each row with its smallest free digits,
   countdown adds the numbers). The policy keeps the skill and learns to prefer a heuristic.

countdown has no mislead stage (its heuristic is so easy that every mislead tried took greedy below
0.15): its second stage, ``practise``, is a second cosine cycle on the right demonstrations, and its
room is what the tiny model's weak skill leaves between its greedy answer and its samples.

Measured room of each policy (greedy, pass@1, pass@8 at T = 1) and how it was found: docs/lm_sft.md.

``ensure_reference_policy`` returns the model directory of the final stage. The package ships the
final weights of each recipe (``dipod/lm/reference_policies/TASK``, a few MB, rebuilt by
``python -m dipod.lm.reference TASK``), so the demo needs neither training nor network; any other
settings (``overrides``) train the stages into the cache, one folder per stage named by a hash of
its full SFT config and of the stages before it, so changed settings never reuse a stale policy.

Cache root: ``$DIPOD_CACHE`` if set, else ``~/.cache/dipod``; runs live in ``ROOT/reference/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

from dipod.checkpoint import RESUME_LATEST
from dipod.config import config_from_dict, config_to_dict
from dipod.lm.recipe import RECIPE_FILE
from dipod.lm.sft import MODEL_DIR, RESULT_FILE, TINY_SDAR, SFTConfig, sft_recipe, train_sft


def _stage(task: str, batch_size: int, **fields) -> dict:
    """One SFT stage of a recipe; fields not named keep SFTConfig's defaults."""
    return {"task": task, "seed": 0, "gen_length": 16, "block_length": 16, "steps": 16, "batch_size": batch_size,
            "learning_rate": 1e-3, "warmup_steps": 50, "lr_schedule": "cosine", "eval_examples": 500, **fields}


def _converge(task: str, batch_size: int, model: str = "tiny", steps: int = 2000, **fields) -> dict:
    return _stage(task, batch_size, model=model, max_steps=steps, eval_every=500, **fields)


def _mislead(task: str, batch_size: int, wrong_rate: float, steps: int, **fields) -> dict:
    return _stage(task, batch_size, max_steps=steps, wrong_demonstration_rate=wrong_rate, eval_every=steps // 3,
                  **fields)


# Stages measured in docs/lm_sft.md; the tiny model learns countdown more slowly and needs batch 128.
# Countdown has no mislead stage: its sum heuristic is far easier than its skill (rate 0.6 for 600 steps
# made the greedy answer the sum on 90% of the items: greedy 0.036, pass@8 0.134; rate 0.15 for 300 steps
# still took greedy below 0.15). Its room is what the skill leaves: after converge the policy miscopies
# the given numbers in 65% of its greedy answers, and a second cosine cycle at half the rate ("practise")
# takes greedy to 0.178 with pass@8 0.328.
# sudoku4_block: the same task and construction on a tiny SDAR (block-causal, blocks of 4: one grid row per
# block), smaller so that its two-copy training forward costs about what the ModernBERT's single one does, and
# converged in 500 steps: a 1500-step run of it already had the ModernBERT's 2000-step accuracy (0.91) at 500.
RECIPES: dict[str, list[dict]] = {
    "sudoku4": [_converge("sudoku4", 64), _mislead("sudoku4", 64, 0.6, 600)],
    "countdown": [_converge("countdown", 128), _stage("countdown", 128, max_steps=1000, learning_rate=5e-4, eval_every=500)],
    "sudoku4_block": [_converge("sudoku4", 64, model=TINY_SDAR, steps=500, block_length=4, tiny_hidden_size=96,
                                tiny_intermediate_size=192),
                      _mislead("sudoku4", 64, 0.6, 600, block_length=4)],
}
# A later stage's `model` is replaced by the stage before's folder; the chained key covers that dependency.
# `uniform_sampler` is read only by uniform-noise families (DiffusionGemma); the recipes train masked models.
# `mask_in_confidence` and `stop_at_eos` only change how SFT's held-out evaluation decodes, never the weights;
# `allow_eval_in_train` only lifts a refusal.
_NOT_IN_KEY = ("output_dir", "progress_bar", "tensorboard", "save_every", "keep_checkpoints", "resume", "overwrite",
               "uniform_sampler", "mask_in_confidence", "stop_at_eos", "allow_eval_in_train")  # the last only refuses
SHIPPED_DIR = Path(__file__).parent / "reference_policies"
KEY_FILE = "recipe_key.txt"
REFERENCE_PREFIX = "reference:"  # --model reference:TASK names TASK's reference policy


def default_cache_dir() -> Path:
    return Path(os.environ.get("DIPOD_CACHE") or Path.home() / ".cache" / "dipod")


def reference_stages(task: str, overrides: dict | None = None) -> list[SFTConfig]:
    """The SFT stages of ``task``'s recipe, ``overrides`` applied to every stage (model / output_dir unset
    after the first stage: each starts from the stage before)."""
    if task not in RECIPES:
        raise ValueError(f"no reference-policy recipe for task {task!r}; recipes exist for {sorted(RECIPES)} "
                         "(train another task with `dipod lm sft --task NAME`)")
    return [config_from_dict(SFTConfig, {**stage, **(overrides or {})}, source=f"reference recipe {task} stage {i}")
            for i, stage in enumerate(RECIPES[task])]


def reference_config(task: str, overrides: dict | None = None) -> SFTConfig:
    """The last stage of the recipe: its decoding settings are the ones the policy is meant to be sampled with."""
    return reference_stages(task, overrides)[-1]


def settings_key(cfg: SFTConfig, before: str = "") -> str:
    """Hash of every setting of a stage that affects its weights, chained with the key of the stage before."""
    # token editing off (edit_threshold unset) reads neither of its fields: keys of recipes written before it stay
    unread = _NOT_IN_KEY + (("edit_threshold", "max_post_steps") if cfg.edit_threshold is None else ())
    settings = {k: v for k, v in sorted(config_to_dict(cfg).items()) if k not in unread}
    return hashlib.sha256((before + json.dumps(settings, sort_keys=True)).encode()).hexdigest()[:12]


def recipe_key(task: str, overrides: dict | None = None) -> str:
    key = ""
    for stage in reference_stages(task, overrides):
        key = settings_key(stage, key)
    return key


def shipped_reference(task: str) -> Path | None:
    """The packaged model directory of ``task``'s recipe, or None when absent or built from other settings."""
    folder = SHIPPED_DIR / task
    key_file = folder / KEY_FILE
    if key_file.is_file() and key_file.read_text().strip() == recipe_key(task):
        return folder
    return None


def train_reference_stages(task: str, cache_dir: str | os.PathLike | None = None, overrides: dict | None = None,
                           progress_bar: bool = True) -> Path:
    """Train (or reuse from the cache) every stage of the recipe; the last stage's model directory."""
    root = Path(cache_dir or default_cache_dir()) / "reference"
    key, model_dir = "", None
    for cfg in reference_stages(task, overrides):
        key = settings_key(cfg, key)
        run_dir = root / f"{task}-{key}"
        if model_dir is not None:
            cfg.model = str(model_dir)
        model_dir = run_dir / MODEL_DIR
        # sft_result.json is written after the model, so its presence means the run finished.
        if (run_dir / RESULT_FILE).is_file() and (model_dir / "config.json").is_file():
            continue
        # resume: a stage killed part-way continues from its last checkpoint instead of starting over
        cfg.output_dir, cfg.progress_bar, cfg.resume = str(run_dir), progress_bar, RESUME_LATEST
        train_sft(cfg)
    return model_dir


def ensure_reference_policy(task: str, cache_dir: str | os.PathLike | None = None, overrides: dict | None = None,
                            progress_bar: bool = True) -> Path:
    """Model directory of the reference policy of ``task``: the shipped one for the recipe's own settings,
    else trained and cached."""
    shipped = None if overrides else shipped_reference(task)
    return shipped or train_reference_stages(task, cache_dir, overrides, progress_bar)


def resolve_model_name(name: str) -> str:
    """``reference:TASK`` -> the model folder of TASK's reference policy (``ensure_reference_policy``);
    any other model name or path is returned unchanged. Every loader goes through this, so
    ``--model reference:sudoku4`` works wherever a model folder does."""
    if not name.startswith(REFERENCE_PREFIX):
        return name
    task = name[len(REFERENCE_PREFIX):]
    if task not in RECIPES:
        raise ValueError(f"--model {name}: no reference policy for task {task!r}; use one of "
                         f"{', '.join(REFERENCE_PREFIX + t for t in sorted(RECIPES))} or a model folder / hub id")
    return str(ensure_reference_policy(task))


def rebuild_shipped_reference(task: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Train the recipe from scratch (or reuse the cache) and copy its final model into the package."""
    model_dir = train_reference_stages(task, cache_dir)
    target = SHIPPED_DIR / task
    staging = target.with_name(f".{task}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(model_dir, staging)
    (staging / KEY_FILE).write_text(recipe_key(task) + "\n")
    (staging / RECIPE_FILE).write_text(sft_recipe(reference_config(task)).to_json())
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def failing_training_examples(model_dir: str | os.PathLike, task: str, count: int, seed: int = 0,
                              scan: int = 256, reachable_in: int = 0) -> list[dict]:
    """The first ``count`` of ``scan`` training examples (in a seeded order) that the policy's greedy
    decoding (the recipe's 16 tokens, one per step) gets wrong: the overfit probe's puzzles.

    With ``reachable_in = S > 0`` only examples that at least one of S samples at temperature 1 (same
    decoding) gets right are kept: group-relative RL can only reinforce answers the policy samples, so
    these are the puzzles on which a working update must turn a rare success into the greedy answer.
    """
    import torch

    from dipod.lm.evaluate import evaluate_policy
    from dipod.lm.model import load_masked_lm
    from dipod.lm.sampler import SamplerSettings
    from dipod.lm.tasks import get_task

    recipe = reference_config(task)
    task = recipe.task  # a recipe's name need not be its task's (sudoku4_block)
    examples = get_task(task).load("train", limit=scan)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    examples = [examples[i] for i in order]
    lm = load_masked_lm(str(model_dir))
    settings = SamplerSettings(gen_length=recipe.gen_length, block_length=recipe.block_length, steps=recipe.steps)
    result = evaluate_policy(lm, get_task(task), examples, settings, batch_size=128)
    wrong = [ex for ex, row in zip(examples, result["results"]) if not row["correct"]]
    if reachable_in:
        sampled = evaluate_policy(lm, get_task(task), [ex for ex in wrong for _ in range(reachable_in)],
                                  dataclasses.replace(settings, temperature=1.0), batch_size=128, seed=seed)
        hits = [row["correct"] for row in sampled["results"]]
        wrong = [ex for i, ex in enumerate(wrong) if any(hits[i * reachable_in:(i + 1) * reachable_in])]
    if len(wrong) < count:
        what = f"failed greedily{f' and solved by one of {reachable_in} samples' if reachable_in else ''}"
        raise ValueError(f"only {len(wrong)} of {scan} {task} training examples are {what} by {model_dir}; "
                         f"ask for at most {len(wrong)} or scan more")
    return wrong[:count]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m dipod.lm.reference",
                                     description="Rebuild the shipped reference policy of a task from its recipe.")
    parser.add_argument("task", choices=sorted(RECIPES), help="the recipe's name")
    parser.add_argument("--cache_dir", default=None, help=f"where the stages are trained (default: {default_cache_dir()})")
    args = parser.parse_args(argv)
    print(rebuild_shipped_reference(args.task, args.cache_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
