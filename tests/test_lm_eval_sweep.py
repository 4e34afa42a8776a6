"""`dipod lm eval-sweep`: every checkpoint of a tiny run decoded at each length on validation and
test, results equal to a direct evaluation of that checkpoint, the choice made on validation only,
protocol recorded per result, bad input refused before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dipod.config import ConfigError

SWEEP_FLAGS = ["--lengths", "8,16", "--block_length", "8", "--steps_per_token", "0.5", "--limit", "3", "--val_limit", "3", "--batch_size", "2"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A two-step RL run of the tiny model on sudoku4 with a checkpoint after each step."""
    from dipod.lm.model import build_tiny_model
    from dipod.lm.train_config import TrainConfig
    from dipod.lm.trainer import train

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("sweep")
    model = build_tiny_model(root / "model", hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                             max_positions=128)
    cfg = TrainConfig(model=str(model), task="sudoku4", prompt_style="compact", lora_r=0, dtype="float32",
                      prompts_per_step=2, num_generations=2, gradient_accumulation_steps=1, gen_length=16,
                      block_length=16, diffusion_steps=4, num_iterations=1, learning_rate=5e-3, max_steps=2,
                      save_steps=1, keep_checkpoints=5, eval_steps=0, gap_monitor_steps=0, num_draws=1,
                      masking="random", dipod_unscored_eos=True, tensorboard=False, progress_bar=False, save_final_model=False,
                      output_dir=str(root / "run"))
    train(cfg)
    return root / "run"


def test_sweep_evaluates_every_checkpoint_and_chooses_on_validation(tiny_run, tmp_path):
    from dipod.lm import train_engine
    from dipod.lm.eval_sweep import load_weights, read_run_config
    from dipod.lm.evaluate import evaluate_policy
    from dipod.lm.sampler import SamplerSettings, family_sampler_defaults
    from dipod.lm.tasks import get_task

    from dipod.cli import main as dipod

    out = tmp_path / "sweep"
    flags = [*SWEEP_FLAGS, "--test_split", "test", "--val_split", "train", "--output_dir", str(out)]
    assert dipod(["lm", "eval-sweep", str(tiny_run), *flags]) == 0
    summary = json.loads((out / "results.json").read_text())
    assert (out / "table.md").is_file() and (out / "accuracy.png").stat().st_size > 0
    records = summary["records"]
    steps = sorted({r["step"] for r in records})
    assert steps == [0, 1, 2] and len(records) == 3 * 2 * 2  # base + 2 checkpoints, 2 lengths, 2 roles
    for r in records:
        p = r["protocol"]
        assert p["gen_length"] == r["length"] and p["steps"] == r["length"] // 2 and p["block_length"] == 8
        assert p["temperature"] == 0.0 and p["prompt_style"] == "compact" and p["dtype"] == "float32"
        assert p["batch_size"] == 2 and p["device"] == "cpu" and r["num_examples"] == 3

    # the choice: best mean validation accuracy over lengths among trained checkpoints, earliest on ties
    val = {s: [r["paper_accuracy"] for r in records if r["step"] == s and r["split_role"] == "validation"]
           for s in (1, 2)}
    best = min((1, 2), key=lambda s: (-sum(val[s]) / 2, s))
    assert summary["selected"]["step"] == best
    assert summary["selected_test_accuracy"] == {str(r["length"]): r["paper_accuracy"] for r in records
                                                 if r["step"] == best and r["split_role"] == "test"}

    # parity: a record equals a direct evaluation of that checkpoint with the same settings
    run_cfg = read_run_config(tiny_run)
    lm = train_engine.load_policy(run_cfg, device="cpu")
    load_weights(lm, tiny_run / "checkpoint-2")
    task = get_task("sudoku4")
    settings = SamplerSettings(gen_length=16, block_length=8, steps=8, temperature=0.0,
                               **run_cfg.decoding_options()).resolved(family_sampler_defaults(lm))
    direct = evaluate_policy(lm, task, task.load("test", limit=3), settings, batch_size=2)
    (record,) = [r for r in records if r["step"] == 2 and r["length"] == 16 and r["split_role"] == "test"]
    assert record["mean_reward"] == pytest.approx(direct["mean_reward"]) and record["accuracy"] == direct["accuracy"]
    # sudoku's paper accuracy: filled blanks over all blanks (these puzzles all have 8, so the mean reward)
    assert record["paper_accuracy"] == pytest.approx(direct["mean_reward"])


def test_the_test_set_never_chooses(tiny_run, tmp_path):
    from dipod.lm.eval_sweep import SweepConfig, sweep

    cfg = dict(run_dir=str(tiny_run), lengths=[8], block_length=8, limit=2, val_limit=2, batch_size=2,
               include_base=False)
    with pytest.raises(ConfigError, match="is the test set"):
        sweep(SweepConfig(**cfg, test_split="test", val_split="test", output_dir=str(tmp_path / "a")))
    # the same data under another name: the guard compares what is read, not the names
    from dipod.lm.tasks import get_task

    copy = tmp_path / "held_out_copy.csv"
    copy.write_text("Puzzle,Solution\n" + "".join(f"{ex['puzzle']},{ex['solution']}\n"
                                                  for ex in get_task("sudoku4").load("test", limit=2)))
    with pytest.raises(ConfigError, match="every example of the validation set .*held_out_copy.csv.* is in the test"):
        sweep(SweepConfig(**cfg, test_split="test", val_data=str(copy), output_dir=str(tmp_path / "c")))
    summary = sweep(SweepConfig(**cfg, test_split="test", val_split="none", output_dir=str(tmp_path / "b")))
    assert summary["selected"] is None and {r["split_role"] for r in summary["records"]} == {"test"}
    assert "validation none" in (tmp_path / "b" / "table.md").read_text()


def test_defaults_are_the_papers_test_split_and_our_held_out_validation(tiny_run, tmp_path):
    from dipod.lm.eval_sweep import SweepConfig, sweep

    summary = sweep(SweepConfig(run_dir=str(tiny_run), lengths=[8], block_length=8, limit=2, val_limit=2,
                                batch_size=2, include_base=False, output_dir=str(tmp_path)))
    assert summary["test"] == "spg_test" and summary["validation"] == "test"



def test_unset_lengths_blocks_and_steps_come_from_the_run(tiny_run):
    """The tiny run decodes 16 tokens in one block in 4 steps: that is its sweep; a run decoding as the
    paper's (256 tokens, blocks of 32, 128 steps) gets the paper's three lengths."""
    from dipod.lm.eval_sweep import SweepConfig, read_run_config, run_protocol

    run_cfg = read_run_config(tiny_run)
    tiny = run_protocol(run_cfg, SweepConfig(run_dir=str(tiny_run)))
    assert (tiny.lengths, tiny.block_length, tiny.steps_per_token) == ([16], 16, 0.25)
    paper = run_protocol(run_cfg.with_changes(gen_length=256, block_length=32, diffusion_steps=128),
                         SweepConfig(run_dir=str(tiny_run)))
    assert (paper.lengths, paper.block_length, paper.steps_per_token) == ([128, 256, 512], 32, 0.5)
    flagged = run_protocol(run_cfg, SweepConfig(run_dir=str(tiny_run), lengths=[8], steps_per_token=1.0))
    assert (flagged.lengths, flagged.block_length, flagged.steps_per_token) == ([8], 16, 1.0)


def test_bad_input_fails_before_the_model_loads(tiny_run, tmp_path, monkeypatch):
    from dipod.lm import train_engine
    from dipod.lm.eval_sweep import SweepConfig, sweep

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(train_engine, "load_policy", no_model)
    with pytest.raises(ConfigError, match="config.yaml not found"):
        SweepConfig(run_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="RUN_DIR is required"):
        SweepConfig()
    with pytest.raises(ConfigError, match="steps_per_token"):
        SweepConfig(run_dir=str(tiny_run), steps_per_token=2.0)
    with pytest.raises(ConfigError, match="length 12"):
        sweep(SweepConfig(run_dir=str(tiny_run), lengths=[12], block_length=8))
    with pytest.raises(ValueError, match="unknown sudoku4 split 'nope'"):
        sweep(SweepConfig(run_dir=str(tiny_run), lengths=[8], test_split="nope"))
