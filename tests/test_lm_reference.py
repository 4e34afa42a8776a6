"""Reference policies with room for RL: the plausible wrong answers they learn, the SFT mixing of
wrong demonstrations, the staged recipe and its shipped weights, pass@k, and the placebo reward."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from dipod.advantages import group_relative_advantages
from dipod.lm import reference
from dipod.lm.evaluate import pass_at_k
from dipod.lm.model import load_masked_lm
from dipod.lm.sampler import SamplerSettings
from dipod.lm.sft import SFTConfig, encode_demonstrations, train_sft
from dipod.lm.tasks import get_task
from dipod.lm.tasks.sudoku4 import all_grids
from dipod.lm.train_config import TrainConfig

SMALL = dict(task="sudoku4", tiny_hidden_size=32, tiny_layers=1, tiny_heads=2, tiny_intermediate_size=64,
             gen_length=16, block_length=16, steps=4, batch_size=16, learning_rate=3e-3, warmup_steps=0,
             train_examples=64, eval_examples=8, progress_bar=False, tensorboard=False)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------ plausible wrong answers

def test_sudoku_wrong_fill_keeps_clues_and_valid_rows_and_is_rarely_a_solution():
    task = get_task("sudoku4")
    examples = task.load("test", limit=500)
    fills = [task.plausible_wrong_demonstration(ex) for ex in examples]
    for fill, ex in zip(fills, examples):
        assert all(p in ("0", f) for p, f in zip(ex["puzzle"], fill))  # clues untouched
        assert all(sorted(fill[4 * r:4 * r + 4]) == list("1234") for r in range(4))  # every row valid
    assert task.plausible_wrong_demonstration({"puzzle": "0000" * 4, "solution": ""}) == "1234" * 4
    solved = sum(task.is_correct(f, ex) for f, ex in zip(fills, examples)) / len(examples)
    assert solved == sum(f in set(all_grids()) for f in fills) / len(fills)  # correct <=> a valid grid (unique)
    assert solved < 0.05  # measured 0.022: a heuristic, not a solver
    assert 0.3 < sum(task.reward(f, ex) for f, ex in zip(fills, examples)) / len(examples) < 0.7  # partly right


def test_countdown_wrong_answer_uses_every_number_once_and_rarely_hits_the_target():
    task = get_task("countdown")
    examples = task.load("test", limit=300)
    rewards = [task.reward(task.plausible_wrong_demonstration(ex), ex) for ex in examples]
    assert task.plausible_wrong_demonstration({"numbers": [56, 31, 81], "target": 2}) == "56+31+81"
    assert set(rewards) <= {0.1, 1.0}  # always well formed with the right numbers (0.1), right only by chance
    hits = [ex for ex, r in zip(examples, rewards) if r == 1.0]
    assert all(sum(ex["numbers"]) == ex["target"] for ex in hits) and len(hits) / len(examples) < 0.05


def test_a_task_without_a_wrong_answer_says_so():
    with pytest.raises(ValueError, match="no plausible wrong demonstration"):
        get_task("gsm8k").plausible_wrong_demonstration({"question": "q", "answer": "1"})


# ------------------------------------------------------------------ SFT on mixed demonstrations

def _targets_seen(monkeypatch, cfg: SFTConfig) -> list[torch.Tensor]:
    from dipod.lm import sft

    seen, real_loss = [], sft.sft_loss

    def recording_loss(logits_fn, prompt_ids, prompt_attn, completion_ids, *rest):
        seen.append(completion_ids.clone())
        return real_loss(logits_fn, prompt_ids, prompt_attn, completion_ids, *rest)

    monkeypatch.setattr(sft, "sft_loss", recording_loss)
    train_sft(cfg)
    return seen


def test_wrong_demonstrations_replace_rows_at_the_asked_rate_seeded_by_step(tmp_path, monkeypatch):
    cfg = dict(SMALL, max_steps=8, eval_examples=0, save_every=0, wrong_demonstration_rate=0.5)
    seen = _targets_seen(monkeypatch, SFTConfig(**cfg, output_dir=str(tmp_path / "a")))
    again = _targets_seen(monkeypatch, SFTConfig(**cfg, output_dir=str(tmp_path / "b")))
    assert all(torch.equal(x, y) for x, y in zip(seen, again))  # same seed, same rows
    task = get_task("sudoku4")
    lm = load_masked_lm(tmp_path / "a" / "model")
    examples = task.load("train", limit=64)
    _, _, right = encode_demonstrations(lm, task, examples, "compact", 256, 16)
    _, _, wrong = encode_demonstrations(lm, task, examples, "compact", 256, 16, task.plausible_wrong_demonstration)
    right_rows, wrong_rows = {tuple(r) for r in right.tolist()}, {tuple(r) for r in wrong.tolist()} - {
        tuple(r) for r in right.tolist()}
    rows = [tuple(r) for step in seen for r in step.tolist()]
    assert all(r in right_rows or r in wrong_rows for r in rows)
    share = sum(r in wrong_rows for r in rows) / len(rows)
    assert 0.35 < share < 0.65  # 128 rows at p = 0.5 (the few wrong fills that solve the grid count as right)
    plain = _targets_seen(monkeypatch, SFTConfig(**{**cfg, "wrong_demonstration_rate": 0.0},
                                                 output_dir=str(tmp_path / "c")))
    assert not any(tuple(r) in wrong_rows for step in plain for r in step.tolist())


def test_wrong_demonstration_rate_is_validated():
    with pytest.raises(Exception, match="wrong_demonstration_rate"):
        SFTConfig(wrong_demonstration_rate=1.0)


# ------------------------------------------------------------------ staged recipe, shipped weights

def test_reference_stages_chain_and_are_cached_by_their_settings(tmp_path, monkeypatch):
    overrides = {k: v for k, v in SMALL.items() if k not in ("progress_bar", "tensorboard")}
    overrides.update(max_steps=2, eval_every=0, eval_examples=0)
    trained: list[SFTConfig] = []
    real_train = reference.train_sft

    def recording_train(cfg):
        trained.append(cfg)
        return real_train(cfg)

    monkeypatch.setattr(reference, "train_sft", recording_train)
    final = reference.ensure_reference_policy("sudoku4", tmp_path, overrides, progress_bar=False)
    assert len(trained) == len(reference.RECIPES["sudoku4"]) == 2
    assert trained[0].model == "tiny" and Path(trained[1].model) == Path(trained[0].output_dir) / "model"
    assert trained[1].wrong_demonstration_rate == 0.6 and Path(trained[1].output_dir) / "model" == final
    assert load_masked_lm(final).mask_id is not None
    trained.clear()
    assert reference.ensure_reference_policy("sudoku4", tmp_path, overrides) == final and not trained
    # a change to the first stage changes both keys: the second stage is retrained from the new first
    changed = {**overrides, "learning_rate": 1e-4}
    assert reference.recipe_key("sudoku4", changed) != reference.recipe_key("sudoku4", overrides)
    assert reference.ensure_reference_policy("sudoku4", tmp_path, changed) != final and len(trained) == 2
    with pytest.raises(ValueError, match="no reference-policy recipe"):
        reference.ensure_reference_policy("gsm8k", tmp_path)


@pytest.mark.parametrize("task", ["sudoku4", "countdown"])
def test_the_shipped_reference_is_the_current_recipe(task):
    """The packaged weights were built from today's recipe (rebuild: python -m dipod.lm.reference TASK)."""
    shipped = reference.SHIPPED_DIR / task
    assert (shipped / reference.KEY_FILE).read_text().strip() == reference.recipe_key(task)
    assert reference.ensure_reference_policy(task, cache_dir="/nonexistent") == shipped
    assert load_masked_lm(shipped).mask_id is not None



@pytest.mark.parametrize("task,greedy", [("sudoku4", 0.260), ("countdown", 0.178)])
def test_the_shipped_reference_decodes_as_measured_under_this_transformers(task, greedy):
    """docs/lm_sft.md's greedy accuracy on 500 held-out items, on whatever transformers this install
    has. ModernBERT's layer pattern must be stated for 4.x (``global_attn_every_n_layers``) and 5.x
    (``layer_types``) alike: shipped with only 4.x's, 5.24 computed another model (sudoku4 0.005)."""
    from dipod.lm.evaluate import evaluate_policy
    from dipod.lm.model import modernbert_layer_types

    shipped = reference.SHIPPED_DIR / task
    config = json.loads((shipped / "config.json").read_text())
    assert config["layer_types"] == modernbert_layer_types(config["num_hidden_layers"],
                                                           config["global_attn_every_n_layers"])
    torch.set_num_threads(1)
    examples = get_task(task).load("test", limit=500)
    report = evaluate_policy(load_masked_lm(shipped), get_task(task), examples,
                             reference.reference_config(task).sampler_settings(), batch_size=250)
    assert report["accuracy"] == pytest.approx(greedy, abs=0.02)


def test_the_countdown_recipe_adds_a_practise_stage_without_mislead():
    """The countdown room comes from skill, not a heuristic: converge, then a second cosine cycle at half the
    rate from the converged model (docs/lm_sft.md; a mislead stage took greedy below 0.15)."""
    converge, practise = reference.reference_stages("countdown")
    assert (converge.model, converge.max_steps, converge.learning_rate) == ("tiny", 2000, 1e-3)
    assert (practise.max_steps, practise.learning_rate, practise.lr_schedule) == (1000, 5e-4, "cosine")
    assert converge.wrong_demonstration_rate == practise.wrong_demonstration_rate == 0.0


@pytest.mark.slow
def test_the_shipped_countdown_reference_has_room():
    """docs/lm_sft.md: 8 samples at T = 1 solve 0.328 of the 500 held-out items, 0.15 more than greedy (0.178);
    same seed and batch as `dipod lm eval --model reference:countdown --samples 8 --temperature 1`."""
    shipped = reference.SHIPPED_DIR / "countdown"
    examples = get_task("countdown").load("test", limit=500)
    settings = reference.reference_config("countdown").sampler_settings()
    sampled = pass_at_k(load_masked_lm(shipped), get_task("countdown"), examples,
                        dataclasses.replace(settings, temperature=1.0), 8, batch_size=64, seed=1)
    assert sampled["pass@8"] == pytest.approx(0.328, abs=0.02)


# ------------------------------------------------------------------ pass@k and the placebo

def test_pass_at_k_counts_an_example_solved_by_any_sample(monkeypatch):
    from dipod.lm import evaluate

    verdicts = iter([True, False, False, False, False, True])  # example 1: 1 of 3, example 2: 1 of 3

    def fake_evaluate(lm, task, examples, settings, **kwargs):
        rows = [{"correct": next(verdicts)} for _ in examples]
        return {"results": rows, "mean_reward": 0.5}

    monkeypatch.setattr(evaluate, "evaluate_policy", fake_evaluate)
    report = pass_at_k(None, None, [{"a": 1}, {"a": 2}], SamplerSettings(gen_length=4, block_length=4, steps=4), 3)
    assert report == {"pass@1": pytest.approx(2 / 6), "pass@3": 1.0, "sample_reward": 0.5}


def _totals_behind(adv_n: torch.Tensor, group: int) -> list[int]:
    """The rewards behind group-relative advantages when every reward is a distinct power of two:
    within a group, r_i - r_min = a_i - a_min, and the lowest set bit of 2^a - 2^b is 2^b."""
    totals = []
    for adv_g in adv_n.reshape(-1, group):
        diffs = [int(d) for d in (adv_g - adv_g.min()).tolist()]
        smallest = next(d & -d for d in diffs if d)
        totals += [d + smallest for d in diffs]
    return totals


def test_placebo_advantages_come_from_the_steps_rewards_shuffled(tmp_path):
    from dipod.lm.model import build_tiny_model
    from dipod.lm.trainer import Trainer

    model = build_tiny_model(tmp_path / "m", hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                             max_positions=64)
    common = dict(model=str(model), task="sudoku4", prompt_style="compact", lora_r=0, dtype="float32",
                  prompts_per_step=4, num_generations=4, gradient_accumulation_steps=1, gen_length=16, block_length=16,
                  diffusion_steps=4, eval_examples=2, reward_weights=[1.0, 0.5], tensorboard=False,
                  progress_bar=False, output_dir=str(tmp_path / "run"))
    powers = [2 ** k for k in range(16)]
    rewards_nf = torch.tensor([[float(p), 0.0] for p in powers])  # totals 1, 2, 4, ..., 2^15
    real = Trainer(TrainConfig(**common))
    adv, logged = real.advantages(rewards_nf, step=1)
    assert torch.equal(adv, group_relative_advantages(rewards_nf[:, 0], 4)) and torch.equal(logged, rewards_nf)
    assert _totals_behind(adv, 4) == powers
    placebo = Trainer(TrainConfig(**common, placebo_rewards=True))
    adv1, logged1 = placebo.advantages(rewards_nf, step=1)
    assert torch.equal(logged1, rewards_nf)  # the logged rewards stay the true ones
    behind1 = _totals_behind(adv1, 4)
    assert sorted(behind1) == powers and behind1 != powers  # the same rewards, shuffled across the step
    assert torch.equal(placebo.advantages(rewards_nf, step=1)[0], adv1)  # a function of (seed, step)
    assert _totals_behind(placebo.advantages(rewards_nf, step=2)[0], 4) != behind1
    # two processes (each gathers the whole step) draw the same permutation: their halves make up adv1
    halves = []
    for rank in (0, 1):
        placebo.rank, placebo.n_local = rank, 8
        halves.append(placebo.advantages(rewards_nf, step=1)[0])
    assert torch.equal(torch.cat(halves), adv1)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["sudoku4"])
def test_rebuilding_the_shipped_reference_reproduces_it(task, tmp_path):
    """About 10 minutes on one core: the recipe trained from scratch gives the shipped policy. Same
    torch build and CPU: identical weights (measured); elsewhere float summation order may differ,
    so the check is held-out greedy accuracy within 0.03 (15 of 500 puzzles)."""
    from safetensors.torch import load_file

    from dipod.lm.evaluate import evaluate_policy

    rebuilt = reference.train_reference_stages(task, tmp_path, progress_bar=False)
    shipped = reference.SHIPPED_DIR / task
    cfg = reference.reference_config(task)
    examples = get_task(task).load("test", limit=500)

    def accuracy(model_dir: Path) -> float:
        return evaluate_policy(load_masked_lm(model_dir), get_task(task), examples, cfg.sampler_settings(),
                               batch_size=128)["accuracy"]

    assert accuracy(rebuilt) == pytest.approx(accuracy(shipped), abs=0.03)
    new, old = load_file(rebuilt / "model.safetensors"), load_file(shipped / "model.safetensors")
    assert new.keys() == old.keys()


def test_a_change_to_the_first_stage_alone_changes_the_key_of_the_later_stage(monkeypatch):
    """settings_key chains each stage's hash with the stage before's: a later stage trained from another
    earlier model is another policy, so its key (its cache folder) changes even when its own settings do not."""
    original = reference.RECIPES["sudoku4"]
    key_before, stages_before = reference.recipe_key("sudoku4"), reference.reference_stages("sudoku4")
    monkeypatch.setitem(reference.RECIPES, "sudoku4",
                        [{**original[0], "learning_rate": original[0]["learning_rate"] / 2}, *original[1:]])
    stages = reference.reference_stages("sudoku4")
    assert stages[1] == stages_before[1] and stages[0] != stages_before[0]  # only the first stage changed
    assert reference.settings_key(stages[1]) == reference.settings_key(stages_before[1])
    assert reference.recipe_key("sudoku4") != key_before
