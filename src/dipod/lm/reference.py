"""Tiny reference policies: SFT recipes for `sudoku4` and `countdown`, trained once and cached.

A reference policy is the tiny model after `dipod lm sft` on the task's demonstrations, stopped at
a mid-level greedy held-out accuracy so that RL has room to improve it. ``ensure_reference_policy``
returns its model directory, training it first when the cache holds no run with exactly these
settings: the cache folder name carries a hash of the full SFT config, so changed settings (or a
changed recipe) train a new policy instead of reusing a stale one.

Cache root: ``$DIPOD_CACHE`` if set, else ``~/.cache/dipod``; runs live in ``ROOT/reference/``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

from dipod.config import config_from_dict, config_to_dict
from dipod.lm.sft import MODEL_DIR, RESULT_FILE, SFTConfig, train_sft

# Settings found by the search recorded in docs/lm_sft.md; anything not named keeps SFTConfig's default.
RECIPES: dict[str, dict] = {
    "sudoku4": {
        "task": "sudoku4", "model": "tiny", "seed": 0,
        "gen_length": 16, "block_length": 16, "steps": 16,
        "batch_size": 64, "learning_rate": 1e-3, "warmup_steps": 50, "max_steps": 3000,
        "eval_every": 100, "eval_examples": 200, "target_accuracy_min": 0.3, "target_accuracy_max": 0.6,
    },
    # The tiny model learns countdown slowly (docs/lm_sft.md): larger batches, cosine decay, and the
    # low end of the mid-level band as the stopping bar (reached at step 1500 with seed 0).
    "countdown": {
        "task": "countdown", "model": "tiny", "seed": 0,
        "gen_length": 16, "block_length": 16, "steps": 16,
        "batch_size": 128, "learning_rate": 1e-3, "warmup_steps": 50, "max_steps": 2000, "lr_schedule": "cosine",
        "eval_every": 100, "eval_examples": 200, "target_accuracy_min": 0.2, "target_accuracy_max": 0.6,
    },
}
# Fields that change where and how a run is shown, not what it learns: left out of the cache key.
_NOT_IN_KEY = ("output_dir", "progress_bar", "tensorboard", "save_every", "keep_checkpoints", "resume")


def default_cache_dir() -> Path:
    return Path(os.environ.get("DIPOD_CACHE") or Path.home() / ".cache" / "dipod")


def reference_config(task: str, overrides: dict | None = None) -> SFTConfig:
    """The recipe of ``task`` with ``overrides`` applied (output_dir still unset)."""
    if task not in RECIPES:
        raise ValueError(f"no reference-policy recipe for task {task!r}; recipes exist for {sorted(RECIPES)} "
                         "(train another task with `dipod lm sft --task NAME`)")
    return config_from_dict(SFTConfig, {**RECIPES[task], **(overrides or {})}, source=f"reference recipe {task}")


def settings_key(cfg: SFTConfig) -> str:
    """Hash of every setting that affects the trained weights."""
    settings = {k: v for k, v in sorted(config_to_dict(cfg).items()) if k not in _NOT_IN_KEY}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def ensure_reference_policy(task: str, cache_dir: str | os.PathLike | None = None, overrides: dict | None = None,
                            progress_bar: bool = True) -> Path:
    """Model directory of the reference policy of ``task``; trains and caches it when missing."""
    cfg = reference_config(task, overrides)
    run_dir = Path(cache_dir or default_cache_dir()) / "reference" / f"{task}-{settings_key(cfg)}"
    model_dir = run_dir / MODEL_DIR
    # sft_result.json is written after the model, so its presence means the run finished.
    if (run_dir / RESULT_FILE).is_file() and (model_dir / "config.json").is_file():
        return model_dir
    cfg.output_dir = str(run_dir)
    cfg.progress_bar = progress_bar
    train_sft(cfg)
    return model_dir


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
