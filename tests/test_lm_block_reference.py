"""The block-causal reference policy (a tiny SDAR on sudoku4) and what it takes to build and run it.

Pins: SFT on a block-causal model scores each completion block against the clean earlier blocks (the
context it decodes with), equal to a separate forward per block; `--model tiny-sdar` trains and saves a
tiny SDAR that loads as one; the shipped ``sudoku4_block`` reference is today's recipe and decodes as
measured (docs/lm_sft.md); its RL recipe is the yaml file; `dipod demo --family block` hands the block
reference and recipe to its runs.
"""

from __future__ import annotations

import json

import pytest
import torch
from block_models import sdar_snapshot  # noqa: F401

from dipod.lm import reference
from dipod.lm.model import load_masked_lm
from dipod.lm.processes.registry import process_of
from dipod.lm.tasks import get_task

BLOCK = 4
GREEDY_200 = 0.21  # the shipped block reference's greedy accuracy on the first 200 test puzzles (measured)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_the_sft_denoiser_of_a_block_model_sees_the_clean_earlier_blocks(sdar_snapshot):  # noqa: F811
    """Block b of the completion, noised, seen after the clean blocks before it and nothing after: the same
    logits as a forward over exactly that sequence (which is how decoding sees block b)."""
    lm = load_masked_lm(sdar_snapshot)
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(4, 90, (3, 2 * BLOCK), generator=generator)
    clean = torch.randint(4, 90, (3, 3 * BLOCK), generator=generator)
    noisy = clean.masked_fill(torch.rand(clean.shape, generator=generator) < 0.5, lm.mask_id)
    ids = torch.cat([prompt, noisy], dim=1)
    with torch.no_grad():
        ours = process_of(lm).denoising_logits(lm, ids, torch.ones_like(ids), prompt.shape[1], clean)
        for b in range(3):
            alone = torch.cat([prompt, clean[:, :b * BLOCK], noisy[:, b * BLOCK:(b + 1) * BLOCK]], dim=1)
            expected = lm.logits(alone, torch.ones_like(alone), alone.shape[1] - BLOCK)
            torch.testing.assert_close(ours[:, b * BLOCK:(b + 1) * BLOCK], expected, atol=1e-5, rtol=1e-5)
        # the full-sequence forward instead would let block 1 see block 0 noised: a different quantity
        assert not torch.allclose(ours[:, BLOCK:], lm.logits(ids, torch.ones_like(ids), prompt.shape[1])[:, BLOCK:])


def test_sft_of_a_fresh_tiny_sdar_saves_a_block_model_with_its_decoding(tmp_path):
    from dipod.lm.recipe import read_recipe
    from dipod.lm.sft import SFTConfig, train_sft

    cfg = SFTConfig(model="tiny-sdar", task="sudoku4", tiny_hidden_size=32, tiny_layers=1, tiny_heads=2,
                    tiny_intermediate_size=48, gen_length=16, block_length=BLOCK, steps=16, max_steps=2, batch_size=4,
                    train_examples=8, eval_examples=0, progress_bar=False, output_dir=str(tmp_path))
    result = train_sft(cfg)
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert (config["model_type"], config["hidden_size"], config["num_hidden_layers"], config["head_dim"],
            config["intermediate_size"]) == ("sdar", 32, 1, 16, 48)
    lm = load_masked_lm(result["model_dir"])
    assert lm.family.name == "sdar" and process_of(lm).name == "block_causal"
    recipe = read_recipe(result["model_dir"])
    assert (recipe.block_length, recipe.gen_length, recipe.steps) == (BLOCK, 16, 16)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_tiny_block_model_sizes_are_checked(tmp_path):
    from dipod.lm.networks.tiny_block import build_tiny_block_model

    with pytest.raises(ValueError, match="unknown sizes"):
        build_tiny_block_model(tmp_path, "sdar", sizes={"width": 8})
    with pytest.raises(ValueError, match="multiple of num_heads"):
        build_tiny_block_model(tmp_path, "sdar", sizes={"hidden_size": 30, "num_heads": 4})
    with pytest.raises(ValueError, match="sdar only"):
        build_tiny_block_model(tmp_path, "llada2_moe", sizes={"hidden_size": 32})


# ------------------------------------------------------------------ the shipped block reference

def test_the_shipped_block_reference_is_the_current_recipe():
    shipped = reference.SHIPPED_DIR / "sudoku4_block"
    assert (shipped / reference.KEY_FILE).read_text().strip() == reference.recipe_key("sudoku4_block")
    assert reference.ensure_reference_policy("sudoku4_block", cache_dir="/nonexistent") == shipped
    assert reference.resolve_model_name("reference:sudoku4_block") == str(shipped)
    lm = load_masked_lm(shipped)
    assert lm.family.name == "sdar" and reference.reference_config("sudoku4_block").block_length == BLOCK


def test_lm_eval_of_the_block_reference_needs_no_flags(capsys):
    from dipod.cli import main as dipod
    from dipod.lm.recipe import read_recipe
    from dipod.lm.sft import sft_recipe

    recipe = read_recipe("reference:sudoku4_block")
    assert recipe == sft_recipe(reference.reference_config("sudoku4_block"))
    assert (recipe.task, recipe.gen_length, recipe.block_length, recipe.steps) == ("sudoku4", 16, BLOCK, 16)
    assert dipod(["lm", "eval", "--model", "reference:sudoku4_block", "--limit", "4"]) == 0
    captured = capsys.readouterr()
    assert "decoding: task=sudoku4 prompt_style=compact gen_length=16 block_length=4 steps=16" in captured.err
    assert "sudoku4 (split test, 4 examples): accuracy" in captured.out


def test_the_shipped_block_reference_decodes_as_measured():
    """docs/lm_sft.md's greedy accuracy of the block reference on the first 200 held-out puzzles."""
    from dipod.lm.evaluate import evaluate_policy

    examples = get_task("sudoku4").load("test", limit=200)
    report = evaluate_policy(load_masked_lm(reference.SHIPPED_DIR / "sudoku4_block"), get_task("sudoku4"), examples,
                             reference.reference_config("sudoku4_block").sampler_settings(), batch_size=200)
    assert report["accuracy"] == pytest.approx(GREEDY_200, abs=0.02)


# ------------------------------------------------------------------ its RL recipe and the demo

def test_the_block_yaml_config_is_the_demo_recipe():
    from pathlib import Path

    from dipod.config import parse_config
    from dipod.demo import TINY_CONFIGS, tiny_rl_config
    from dipod.lm.train_config import TrainConfig

    path = Path(__file__).resolve().parents[1] / "configs" / "lm" / "tiny_sudoku4_block.yaml"
    assert path.samefile(TINY_CONFIGS / "tiny_sudoku4_block.yaml")
    from_yaml = parse_config(TrainConfig, ["--config", str(path)], "t")
    assert from_yaml == tiny_rl_config("reference:sudoku4_block", "runs/tiny_sudoku4_block", "sudoku4_block")
    assert (from_yaml.task, from_yaml.block_length, from_yaml.diffusion_steps, from_yaml.kv_cache) == \
        ("sudoku4", BLOCK, 16, "prefix")


def test_demo_family_block_runs_the_block_reference_with_its_recipe(tmp_path, monkeypatch, capsys):
    """The wiring only: the runs the demo hands to its worker processes (recorded, not trained)."""
    import multiprocessing

    from dipod import demo, plot
    from dipod.demo import tiny_rl_config

    handed = []

    class RecordingPool:
        def __init__(self, workers):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def map(self, fn, jobs):
            handed.extend(jobs)
            evals = {"eval/accuracy": 0.25, "eval/reward": 0.5}
            return [{"before": evals, "after": evals, "peak_accuracy": 0.25} for _ in jobs]

    class Context:
        Pool = RecordingPool

    monkeypatch.setattr(multiprocessing, "get_context", lambda method: Context)
    monkeypatch.setattr(plot, "plot_runs", lambda runs, out, **kw: out)
    assert demo.main(["--family", "block", "--max_steps", "1", "--output_dir", str(tmp_path)]) == 0
    assert "block-causal" in capsys.readouterr().out
    assert [job["output_dir"] for job in handed] == [str(tmp_path / "main"), str(tmp_path / "plain")]
    configs = [tiny_rl_config(job["model_dir"], job["output_dir"], job["recipe"], **job["changes"]) for job in handed]
    assert {job["model_dir"] for job in handed} == {str(reference.SHIPPED_DIR / "sudoku4_block")}
    assert [(c.block_length, c.max_steps, c.dipod_beta) for c in configs] == [(BLOCK, 1, 0.05), (BLOCK, 1, 0.0)]
    handed.clear()
    assert demo.main(["--max_steps", "1", "--no_baseline", "--output_dir", str(tmp_path)]) == 0  # the default
    assert handed[0]["model_dir"] == str(reference.SHIPPED_DIR / "sudoku4") and handed[0]["recipe"] == "sudoku4"


@pytest.mark.slow
def test_demo_family_block_end_to_end(tmp_path, capsys):
    """A minute or two: one RL step of the block demo, evaluated before and after on the held-out and paper sets."""
    from dipod.cli import main as cli_main
    from dipod.runlog import read_metrics

    assert cli_main(["demo", "--family", "block", "--max_steps", "1", "--no_baseline", "--output_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    before = next(line for line in out.splitlines() if line.startswith("held-out accuracy (greedy)")).split()[-2]
    assert "block-causal" in out and before == "0.206"  # the shipped block reference, as measured
    assert (tmp_path / "demo.png").is_file() and read_metrics(tmp_path / "main" / "metrics.jsonl")[-1]["step"] == 1
