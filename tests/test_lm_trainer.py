"""`dipod lm train`: configs, one real step per paper config (tiny stand-in model), exact resume,
NaN skipping, bad input, and the DiPOD term's gradient on real proxies."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from dipod.checkpoint import list_checkpoints, load_checkpoint
from dipod.config import ConfigError, parse_config
from dipod.lm import train_engine
from dipod.lm.train_config import TrainConfig
from dipod.lm.trainer import TIMING_KEYS, Trainer, TrainingDiverged, estimator_loss, main, rl_loss, train
from dipod.runlog import read_metrics

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs" / "lm").glob("llada_*.yaml"))  # the paper's LLaDA-8B-Instruct runs
FIXTURES = ROOT / "tests" / "fixtures"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny model's matrices are too small to gain from threads, and on a shared box torch's
    thread pool can make them 100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    from dipod.lm.model import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", hidden_size=32, num_layers=2, num_heads=2,
                                intermediate_size=64, max_positions=128))


def small(tiny_model: str, out: Path, **changes) -> TrainConfig:
    """A seconds-long run of the tiny model on sudoku4."""
    values = dict(model=tiny_model, task="sudoku4", prompt_style="compact", lora_r=0, dtype="float32",
                  prompts_per_step=2, num_generations=3, gradient_accumulation_steps=2, gen_length=24, block_length=24,
                  diffusion_steps=4, num_iterations=2, learning_rate=1e-3, max_steps=3, save_steps=1, eval_steps=2,
                  eval_examples=2, gap_monitor_steps=2, gap_monitor_sequences=1, gap_monitor_orders=2, num_draws=2,
                  masking="random", dipod_unscored_eos=True,  # the release's FPO process, DiPOD on (opt-in)
                  tensorboard=False, progress_bar=False, save_final_model=False, output_dir=str(out))
    values.update(changes)
    return TrainConfig(**values)


def params_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


# ----------------------------------------------------------------------------------- configs

@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_paper_configs_parse_with_the_published_settings(path):
    cfg = parse_config(TrainConfig, ["--config", str(path)], "t")
    assert (cfg.gen_length, cfg.block_length, cfg.diffusion_steps, cfg.num_generations) == (256, 32, 128, 6)
    assert (cfg.learning_rate, cfg.lora_r, cfg.lora_alpha, cfg.dipod_beta) == (3e-6, 128, 64.0, 0.05)
    assert (cfg.estimator, cfg.option_value("spg_negative_proxy"), cfg.option_value("spg_mix_weight")) == ("spg", "mix", 0.5)
    assert cfg.eubo_beta_value() == (1.0 if cfg.task == "sudoku4" else 1.5)
    assert cfg.few_shot == (3 if "3shot" in path.name else 0)
    assert cfg.model == "GSAI-ML/LLaDA-8B-Instruct" and not cfg.trust_remote_code and cfg.mask_token_id is None


def test_there_is_a_config_per_paper_task_and_an_accelerate_config():
    tasks = {parse_config(TrainConfig, ["--config", str(p)], "t").task for p in CONFIGS}
    assert tasks == {"gsm8k", "math500", "countdown", "sudoku4"} and len(CONFIGS) == 5
    assert (ROOT / "configs" / "accelerate" / "deepspeed_zero2.yaml").is_file()


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_paper_config_runs_one_step_with_a_tiny_stand_in(path, tiny_model, tmp_path):
    """Every setting of the file except model size, lengths and data scale, for one real step."""
    data = {"gsm8k": FIXTURES / "gsm8k_tiny.jsonl", "math500": FIXTURES / "math500_tiny.jsonl"}
    task = parse_config(TrainConfig, ["--config", str(path)], "t").task
    flags = ["--config", str(path), "--model", tiny_model, "--trust_remote_code", "false", "--mask_token_id", "none",
             "--prompt_style", "compact", "--lora_r", "4", "--dtype", "float32", "--gradient_checkpointing", "false",
             "--prompts_per_step", "2", "--num_generations", "2", "--gradient_accumulation_steps", "2",
             "--generation_batch_size", "2", "--gen_length", "16", "--block_length", "8", "--diffusion_steps", "4",
             "--num_iterations", "2", "--max_prompt_length", "96", "--max_steps", "1", "--eval_examples", "1",
             "--gap_monitor_steps", "1", "--gap_monitor_sequences", "1", "--gap_monitor_orders", "2",
             "--tensorboard", "false", "--progress_bar", "false", "--output_dir", str(tmp_path)]
    if task in data:
        flags += ["--train_data", str(data[task]), "--eval_data", str(data[task])]
    assert main(flags) == 0
    rows = read_metrics(tmp_path / "metrics.jsonl")
    last = rows[-1]
    assert last["step"] == 1 and last["skipped_updates"] == 0.0
    for key in ("reward", "accuracy", "completion_length", "elbo", "eubo", "gap_lower_bound", "grad_norm",
                "learning_rate", "step_time", "tokens_per_s", "eval/accuracy", "dipod_loss"):
        assert isinstance(last[key], float) and math.isfinite(last[key]), key
    assert (tmp_path / "checkpoint-1" / "model.safetensors").is_file()
    assert (tmp_path / "final_model" / "config.json").is_file()  # LoRA merged, loadable like a hub checkpoint


# ----------------------------------------------------------------------------------- DiPOD term

@pytest.fixture(scope="module")
def batch(tiny_model):
    lm = train_engine.load_policy(TrainConfig(model=tiny_model, lora_r=0, dtype="float32"), device="cpu")
    g = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(4, 40, (4, 6), generator=g)
    prompt_attn = torch.ones_like(prompt_ids)
    prompt_attn[0, :2] = 0  # one left-padded prompt
    completion_ids = torch.randint(4, 40, (4, 10), generator=g)
    completion_ids[1, 6:] = lm.eos_id  # one short completion
    adv_n = torch.tensor([1.0, -0.5, 0.25, -0.75])
    return lm, prompt_ids, prompt_attn, completion_ids, adv_n


ESTIMATOR_SETTINGS = [dict(estimator="d1"), dict(estimator="fpo"), dict(estimator="fpo++"),
                      dict(estimator="spg", spg_negative_proxy="mix"), dict(estimator="spg", spg_negative_proxy="eubo")]


def _grads(lm, cfg, batch_, old, seed=7):
    _, prompt_ids, prompt_attn, completion_ids, adv_n = batch_
    lm.model.zero_grad()
    new = train_engine.compute_proxies(lm, prompt_ids, prompt_attn, completion_ids, train_engine.proxy_settings(cfg),
                                       seed, meanfield=cfg.estimator == "d1")
    loss, _ = rl_loss(cfg, new, old, adv_n, None)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in lm.model.named_parameters()}


@pytest.mark.parametrize("settings", ESTIMATOR_SETTINGS, ids=lambda s: "-".join(map(str, s.values())))
def test_dipod_gradient_is_beta_times_grad_of_the_mean_elbo(settings, batch, tiny_model):
    lm, prompt_ids, prompt_attn, completion_ids, adv_n = batch
    cfg0 = TrainConfig(model=tiny_model, dipod_beta=0.0, **settings)
    cfg = dataclasses.replace(cfg0, dipod_beta=0.2)
    with torch.no_grad():  # "old" proxies of a slightly different policy, so ratios differ from 1
        old = train_engine.compute_proxies(lm, prompt_ids, prompt_attn, completion_ids,
                                           train_engine.proxy_settings(cfg), 7, meanfield=True)
        old = dataclasses.replace(old, elbo_nk=old.elbo_nk + 0.05, meanfield_logp_nl=old.meanfield_logp_nl - 0.03)
    loss0, grad0 = _grads(lm, cfg0, batch, old)
    loss1, grad1 = _grads(lm, cfg, batch, old)
    # beta = 0 is the pure estimator, bit for bit
    new = train_engine.compute_proxies(lm, prompt_ids, prompt_attn, completion_ids, train_engine.proxy_settings(cfg),
                                       7, meanfield=cfg.estimator == "d1")
    assert torch.equal(loss0, estimator_loss(cfg0, new, old, adv_n, None)[0].detach())
    # the update direction (minus the loss gradient) gains exactly beta * grad of the mean ELBO of the
    # same forward: length-weighted, sum_n ELBO_n / sum_n |o_n| (per_token, SPG's release), or the
    # plain mean over sequences (per_sequence, the d1 fork's FPO)
    lm.model.zero_grad()
    per_token = cfg.option_value("dipod_normalisation") == "per_token"
    mean_elbo = new.elbo_n.sum() / (new.lengths_n.sum() if per_token else len(new.elbo_n))
    mean_elbo.backward()
    for name, p in lm.model.named_parameters():
        torch.testing.assert_close(-(grad1[name] - grad0[name]), 0.2 * p.grad, rtol=1e-4, atol=1e-6)
    assert float(loss1 - loss0) == pytest.approx(float(-0.2 * mean_elbo.detach()), rel=1e-5)


# ----------------------------------------------------------------------------------- resume

class _Killed(Exception):
    pass


def test_resume_after_a_kill_matches_an_uninterrupted_run(tiny_model, tmp_path, monkeypatch):
    cfg = small(tiny_model, tmp_path / "a", estimator="fpo", lr_scheduler="cosine", warmup_steps=2, max_steps=3)
    straight = train(cfg)

    killed = dataclasses.replace(cfg, output_dir=str(tmp_path / "b"))
    original = Trainer.step

    def dies_at_step_3(self, step):
        if step == 3:
            raise _Killed
        return original(self, step)

    monkeypatch.setattr(Trainer, "step", dies_at_step_3)
    with pytest.raises(_Killed):
        train(killed)
    monkeypatch.setattr(Trainer, "step", original)
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["checkpoint-1", "checkpoint-2"]
    resumed = train(dataclasses.replace(killed, resume="latest"))

    a, b = params_of(straight.model), params_of(resumed.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def strip(rows):
        return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]

    rows_a, rows_b = read_metrics(tmp_path / "a" / "metrics.jsonl"), read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in rows_b] == [0, 1, 2, 3]
    assert strip(rows_a) == strip(rows_b)
    assert rows_a[2]["learning_rate"] != rows_a[3]["learning_rate"]  # the schedule really moved


def test_d1_with_kl_to_the_reference_logs_a_nonnegative_kl(tiny_model, tmp_path):
    train(small(tiny_model, tmp_path, estimator="d1", kl_beta=0.04, max_steps=1, gap_monitor_steps=0))
    row = read_metrics(tmp_path / "metrics.jsonl")[1]
    assert row["kl"] >= 0.0 and math.isfinite(row["kl"]) and 0.0 <= row["clip_ratio"] <= 1.0




# ----------------------------------------------------------------------------------- NaN / inf

def _poison(monkeypatch, calls_to_poison):
    """Make the chosen gradient-carrying proxy calls return a NaN ELBO."""
    real = train_engine.compute_proxies
    counter = {"n": 0}

    def poisoned(lm, *args, **kwargs):
        out = real(lm, *args, **kwargs)
        if torch.is_grad_enabled():
            counter["n"] += 1
            if counter["n"] in calls_to_poison:
                return dataclasses.replace(out, elbo_nk=out.elbo_nk * float("nan"), elbo_n=out.elbo_n * float("nan"))
        return out

    monkeypatch.setattr(train_engine, "compute_proxies", poisoned)


def test_a_nan_proxy_skips_that_update_and_training_goes_on(tiny_model, tmp_path, monkeypatch):
    _poison(monkeypatch, calls_to_poison={1})  # first micro-batch of the first update
    result = train(small(tiny_model, tmp_path, estimator="spg", max_steps=2))
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows[1]["skipped_updates"] == 1.0 and rows[2]["skipped_updates"] == 0.0
    assert all(math.isfinite(r["loss"]) for r in rows[1:])
    weights, _, _ = load_checkpoint(tmp_path / "checkpoint-2")
    assert all(bool(torch.isfinite(w).all()) for w in weights.values())
    assert all(bool(torch.isfinite(p).all()) for p in result.model.parameters())


def test_nan_in_a_row_stops_the_run_without_a_checkpoint(tiny_model, tmp_path, monkeypatch, capsys):
    from dipod.lm.model import load_masked_lm

    _poison(monkeypatch, calls_to_poison=set(range(1, 100)))
    cfg = small(tiny_model, tmp_path, estimator="fpo", max_steps=3, max_nonfinite_updates=2)
    with pytest.raises(TrainingDiverged, match="2 non-finite updates in a row"):
        train(cfg)
    assert list_checkpoints(tmp_path) == []
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows[-1]["step"] == 1 and rows[-1]["skipped_updates"] == 2.0
    # the CLI turns it into a message and exit code 1
    flags = ["--model", tiny_model, "--task", "sudoku4", "--prompt_style", "compact", "--lora_r", "0", "--dtype",
             "float32", "--prompts_per_step", "2", "--num_generations", "2", "--gen_length", "24", "--block_length",
             "24", "--diffusion_steps", "4", "--eval_examples", "1", "--max_nonfinite_updates", "1",
             "--tensorboard", "false", "--progress_bar", "false", "--output_dir", str(tmp_path / "cli")]
    assert main(flags) == 1
    assert "non-finite updates in a row" in capsys.readouterr().err
    assert list_checkpoints(tmp_path / "cli") == []
    assert load_masked_lm(tiny_model) is not None  # the model files were never touched


# ----------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("flags, message", [
    (["--lernrate", "1"], "unrecognized arguments"),
    (["--gen_length", "100", "--block_length", "32"], "not a multiple of block_length"),
    (["--num_generations", "1"], "num_generations=1"),
    (["--estimator", "fpo", "--spg_mix_weight", "0.3"], "spg_mix_weight"),
    (["--estimator", "spg", "--clip_eps", "0.2"], "clip_eps"),
    (["--estimator", "d1", "--log_ratio_max", "2"], "log_ratio_max"),
    (["--estimator", "ppo"], "choose one of"),
])
def test_bad_flags_fail_before_any_compute(flags, message, capsys):
    with pytest.raises((ConfigError, SystemExit)) as info:
        parse_config(TrainConfig, flags, "dipod lm train")
    text = str(info.value) + capsys.readouterr().err
    assert message in text


def test_unknown_yaml_key_lists_the_valid_ones(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("estimator: spg\nbeta_dipod: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['beta_dipod'\].*dipod_beta"):
        parse_config(TrainConfig, ["--config", str(path)], "t")


def test_missing_model_and_data_paths_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        TrainConfig(model=str(tmp_path / "no_such_model"))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        TrainConfig(model="org/name", train_data=str(tmp_path / "missing.jsonl"))


def test_uneven_batches_fail_before_the_model_loads(tmp_path):
    with pytest.raises(ConfigError, match="split evenly"):
        Trainer(TrainConfig(model=str(tmp_path), task="sudoku4", prompts_per_step=1, num_generations=3,
                            gradient_accumulation_steps=2))


def test_out_of_memory_in_generation_suggests_a_smaller_generation_batch(tiny_model, tmp_path, monkeypatch):
    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(train_engine, "generate", no_memory)
    with pytest.raises(RuntimeError, match="--generation_batch_size 3"):
        train(small(tiny_model, tmp_path, generation_batch_size=6, gradient_accumulation_steps=1))


def test_cli_reports_bad_input_in_one_line(capsys):
    from dipod.cli import main as cli_main

    assert cli_main(["lm", "train", "--num_generations", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dipod lm train: error:") and "num_generations" in err[0]


# ----------------------------------------------------------------------------------- prompts, eval, metrics

def _bare_trainer(cfg: TrainConfig, **attributes) -> Trainer:
    """A Trainer without model, accelerator or data loading: only the attributes a method reads."""
    trainer = Trainer.__new__(Trainer)
    trainer.cfg = cfg
    for name, value in attributes.items():
        setattr(trainer, name, value)
    return trainer


def test_each_epoch_of_prompts_is_a_permutation_of_the_training_set_and_groups_are_consecutive():
    """step_examples: prompts walk through a fresh seeded permutation of the training set each epoch
    (every example once per epoch, even when a step straddles two epochs), each prompt repeated
    num_generations times in a row, the processes' slices tiling the step, and the same (seed, step)
    giving the same prompts."""
    n, per_step, group, world = 12, 5, 2, 2
    cfg = TrainConfig(model="org/m", prompts_per_step=per_step, num_generations=group, seed=3)
    examples = [{"id": i} for i in range(n)]
    steps = n  # 60 prompt positions: 5 whole epochs, most steps straddle one
    chosen = []
    for step in range(1, steps + 1):
        slices = [_bare_trainer(cfg, train_examples=examples, rank=rank, n_local=per_step * group // world)
                  .step_examples(step) for rank in range(world)]
        rows = [ex["id"] for part in slices for ex in part]
        assert len(rows) == per_step * group
        prompts = rows[::group]
        assert rows == [p for p in prompts for _ in range(group)]  # consecutive groups of G
        chosen.extend(prompts)
        again = _bare_trainer(cfg, train_examples=examples, rank=0, n_local=per_step * group // world)
        assert [ex["id"] for ex in again.step_examples(step)] == [ex["id"] for ex in slices[0]]
    epochs = [chosen[e * n:(e + 1) * n] for e in range(steps * per_step // n)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(n)), epoch  # every training example exactly once per epoch
    assert len({tuple(e) for e in epochs}) > 1  # a fresh permutation per epoch


def test_held_out_evaluation_decodes_greedily_whatever_the_rollout_temperature(tiny_model, tmp_path, monkeypatch):
    """evaluate(): eval/accuracy and eval/reward are greedy numbers (temperature 0, the run's other
    decoding settings), not samples at the rollout temperature."""
    cfg = small(tiny_model, tmp_path, temperature=1.5, eval_examples=3, gap_monitor_sequences=1)
    trainer = Trainer(cfg)
    seen = []
    real = train_engine.generate

    def spy(lm, prompt_ids, prompt_attn, settings, generator):
        seen.append(settings)
        return real(lm, prompt_ids, prompt_attn, settings, generator)

    monkeypatch.setattr(train_engine, "generate", spy)
    found = trainer.evaluate(0)
    assert seen and all(s == cfg.sampler_settings(0.0) for s in seen)
    assert seen[0].temperature == 0.0
    assert set(found) == {"eval/reward", "eval/accuracy", "eval/gap_lower_bound"}


def test_logged_elbo_per_token_is_total_elbo_over_total_completion_tokens():
    """_proxy_stats: `elbo_per_token` is token-weighted, sum_n ELBO_n / sum_n |o_n| over the step's
    rollouts (the quantity the per_token DiPOD term tightens: dipod_term = -beta * elbo_per_token),
    not the mean of the per-sequence ratios; `elbo` and `completion_length` are plain means."""
    from types import SimpleNamespace

    from dipod.objectives import dipod_term

    cfg = TrainConfig(model="org/m", estimator="spg")
    micro = [SimpleNamespace(lengths_n=torch.tensor([2, 8]), elbo_n=torch.tensor([-1.0, -12.0]),
                             eubo_n=torch.tensor([-0.5, -10.0])),
             SimpleNamespace(lengths_n=torch.tensor([4, 1]), elbo_n=torch.tensor([-6.0, -3.0]),
                             eubo_n=torch.tensor([-5.0, -2.0]))]
    stats = _bare_trainer(cfg)._proxy_stats(micro)
    assert stats["completion_length"] == pytest.approx(15 / 4)
    assert stats["elbo"] == pytest.approx(-22 / 4)
    assert stats["elbo_per_token"] == pytest.approx(-22 / 15)  # mean of ratios would be (-0.5-1.5-1.5-3)/4
    assert stats["eubo"] == pytest.approx(-17.5 / 4)
    elbo, lengths = torch.cat([m.elbo_n for m in micro]), torch.cat([m.lengths_n for m in micro])
    assert float(dipod_term(elbo, 0.1, lengths_n=lengths)) == pytest.approx(-0.1 * stats["elbo_per_token"])


# ----------------------------------------------------------------------------------- demo

def test_demo_recipe_switches_estimators_cleanly():
    from dipod.demo import tiny_rl_config

    spg = tiny_rl_config("org/model", "out")
    assert (spg.estimator, spg.spg_negative_proxy, spg.eubo_beta, spg.dipod_beta) == ("spg", "mix", 1.0, 0.05)
    fpo = tiny_rl_config("org/model", "out", estimator="fpo", dipod_beta=0.0)
    assert fpo.spg_mix_weight is None and fpo.eubo_beta is None and fpo.option_value("clip_eps") == 0.2


def test_demo_recipe_rewards_kept_clues_and_drops_the_weights_off_sudoku():
    """d1's sudoku reward ignores clue cells; the demo recipe adds clues_kept at weight 1."""
    from dipod.demo import tiny_rl_config
    from dipod.lm.tasks import get_task

    cfg = tiny_rl_config("org/model", "out")
    names, fns, weights = train_engine.reward_table(get_task("sudoku4"), cfg.reward_weights)
    example = {"puzzle": "1004001203012003", "solution": "1234341243212143"}  # 8 clues, 8 blanks
    rewritten_clue = "2234341243212143"  # every blank right, the first clue (1) changed
    scores = torch.tensor([fn(rewritten_clue, example) for fn in fns])
    assert names == ["correctness", "clues_kept"] and scores.tolist() == [1.0, 7 / 8]
    assert float(scores @ weights) == 1.0 + 7 / 8 < float(torch.tensor([fn(example["solution"], example)
                                                                       for fn in fns]) @ weights) == 2.0
    assert tiny_rl_config("org/model", "out", task="countdown").reward_weights is None


def test_dipod_with_a_process_that_never_scores_the_eos_needs_an_explicit_opt_in(tmp_path):
    """On countdown the DiPOD term under `random` masking ran answers on to the full completion: the
    EOS is never scored, so nothing holds the length. Refused unless asked for; safe processes pass."""
    with pytest.raises(ConfigError, match="never scores the EOS.*unbiased_random"):
        TrainConfig(model="org/m", masking="random", dipod_beta=0.05)
    assert TrainConfig(model="org/m", masking="random", dipod_beta=0.05, dipod_unscored_eos=True).dipod_beta == 0.05
    assert TrainConfig(model="org/m", masking="random", dipod_beta=0.0).masking == "random"
    for masking in ("block_random", "unbiased_random"):
        assert TrainConfig(model="org/m", masking=masking, dipod_beta=0.05).masking == masking
    from dipod.demo import tiny_rl_config
    from dipod.lm.proxies import PROCESSES

    countdown = tiny_rl_config("org/m", "out", task="countdown")
    assert PROCESSES[countdown.masking].scores_eos and not countdown.dipod_unscored_eos


def test_demo_table_shows_before_and_after():
    from dipod.demo import before_after_table

    table = before_after_table({"eval/accuracy": 0.25, "eval/reward": 0.5, "eval/gap_lower_bound": 1.0},
                               {"eval/accuracy": 0.5, "eval/reward": 0.75, "eval/gap_lower_bound": 0.125})
    assert "0.250      0.500" in table and "1.000      0.125" in table and len(table.splitlines()) == 4


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    """Minutes: trains the sudoku4 reference policy unless $DIPOD_CACHE already holds it."""
    from dipod.cli import main as cli_main

    assert cli_main(["demo", "--max_steps", "2", "--output_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "held-out accuracy (greedy)" in out and (tmp_path / "demo.png").is_file()
    assert read_metrics(tmp_path / "metrics.jsonl")[-1]["step"] == 2
