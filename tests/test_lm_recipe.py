"""Commands agree with the model in hand: a model folder written by dipod records its decoding recipe
(``dipod_recipe.json``) and `dipod lm eval`, `lm generate`, `eval-sweep` and the Python entry points
take it as their default; flags win and are echoed. The shipped references and an RL run's
final_model evaluate, with no flags, to what their runs reported."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from dipod.cli import main as dipod
from dipod.config import ConfigError, parse_config
from dipod.lm.recipe import RECIPE_FILE, DecodingRecipe, model_sampler_settings, read_recipe
from dipod.lm.reference import SHIPPED_DIR, reference_config
from dipod.lm.sampler import SamplerSettings
from dipod.lm.sft import sft_recipe
from dipod.runlog import read_metrics

ROOT = Path(__file__).resolve().parents[1]
RECIPE_FLAGS = ["--gen_length", "16", "--block_length", "16", "--steps", "16", "--prompt_style", "compact"]


def _eval_json(tmp_path: Path, name: str, *flags: str) -> dict:
    out = tmp_path / f"{name}.json"
    assert dipod(["lm", "eval", *flags, "--json", str(out)]) == 0
    return json.loads(out.read_text())


# ----------------------------------------------------------------------------------- the file

def test_a_recipe_file_is_validated_and_names_its_fix(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    recipe = DecodingRecipe(task="sudoku4", prompt_style="compact", gen_length=16, block_length=8, steps=4,
                            remasking="random")
    (folder / RECIPE_FILE).write_text(recipe.to_json())
    assert read_recipe(folder) == recipe and recipe.sampler_settings() == SamplerSettings(
        gen_length=16, block_length=8, steps=4, remasking="random")
    assert read_recipe(tmp_path) is None and read_recipe("org/hub-id") is None  # nothing recorded: no defaults
    for content, message in [({**json.loads(recipe.to_json()), "gen_lenght": 16}, "unknown config key.*gen_lenght"),
                             ({"gen_length": 16, "block_length": 16}, r"lacks \['steps', 'prompt_style'\]"),
                             ({**json.loads(recipe.to_json()), "block_length": 5}, "not a multiple of block_length=5"),
                             ({**json.loads(recipe.to_json()), "prompt_style": "fancy"}, "prompt_style='fancy'")]:
        (folder / RECIPE_FILE).write_text(json.dumps(content))
        with pytest.raises(ConfigError, match=message):
            read_recipe(folder)
    (folder / RECIPE_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_recipe(folder)


@pytest.mark.parametrize("task", ["sudoku4", "countdown"])
def test_the_shipped_references_carry_the_decoding_of_their_sft_recipe(task):
    recipe = read_recipe(SHIPPED_DIR / task)
    assert recipe == sft_recipe(reference_config(task)) == read_recipe(f"reference:{task}")
    assert (recipe.task, recipe.prompt_style, recipe.gen_length, recipe.block_length, recipe.steps) == (
        task, "compact", 16, 16, 16)


# ----------------------------------------------------------------------------------- the commands

@pytest.mark.parametrize("task", ["sudoku4", "countdown"])
def test_a_shipped_reference_evaluates_with_no_flags_as_with_its_recipe_flags(task, tmp_path, capsys):
    bare = _eval_json(tmp_path, "bare", "--model", f"reference:{task}", "--limit", "24")
    echo = capsys.readouterr().err
    assert "decoding: task=" + task in echo and "gen_length=16 block_length=16 steps=16" in echo
    flagged = _eval_json(tmp_path, "flags", "--model", str(SHIPPED_DIR / task), "--task", task, "--limit", "24",
                         *RECIPE_FLAGS)
    assert "from flags/config: block_length, gen_length, prompt_style, steps, task" in capsys.readouterr().err
    assert bare["results"] == flagged["results"] and bare["accuracy"] == flagged["accuracy"]
    assert bare["sampler"] == flagged["sampler"] and bare["prompt_style"] == "compact"
    assert bare["num_examples"] == 24 and bare["task"] == task
    # an explicit flag wins over the recipe
    fewer = _eval_json(tmp_path, "fewer", "--model", f"reference:{task}", "--limit", "4", "--steps", "8")
    assert (fewer["sampler"]["steps"], fewer["sampler"]["gen_length"]) == (8, 16)
    assert "steps=8" in capsys.readouterr().err


def test_the_python_entry_points_decode_with_the_model_recipe():
    from dipod.lm.evaluate import evaluate_policy
    from dipod.lm.model import build_tiny_model, load_masked_lm
    from dipod.lm.sampler import decode
    from dipod.lm.tasks import get_task
    from dipod.lm.train_engine import encode_prompts

    lm = load_masked_lm("reference:sudoku4")
    task = get_task("sudoku4")
    examples = task.load("test", limit=8)
    recipe = read_recipe(SHIPPED_DIR / "sudoku4").sampler_settings()
    assert model_sampler_settings(lm) == recipe and model_sampler_settings(lm, steps=8).steps == 8
    ids, attn = encode_prompts(lm, [task.prompt(ex, "compact") for ex in examples], 64, chat=False)
    assert torch.equal(decode(lm, ids, attn).completion_bg, decode(lm, ids, attn, recipe).completion_bg)
    implicit = evaluate_policy(lm, task, examples)
    assert implicit == evaluate_policy(lm, task, examples, recipe, prompt_style="compact", max_prompt_length=256)
    # a model without a recipe (a hub id) keeps the built-in d1 LLaDA settings
    bare = dataclasses.replace(lm, source="org/hub-model")
    assert model_sampler_settings(bare) == SamplerSettings()


def test_an_rl_final_model_evaluates_with_no_flags_to_what_its_run_reported(tmp_path, capsys):
    """A one-step run of the tiny sudoku4 recipe (configs/lm/tiny_sudoku4.yaml) from the command line;
    its last held-out evaluation equals `dipod lm eval --model RUN/final_model` with no decoding flags."""
    out = tmp_path / "run"
    assert dipod(["lm", "train", "--config", str(ROOT / "configs/lm/tiny_sudoku4.yaml"), "--output_dir", str(out),
                  "--max_steps", "1", "--prompts_per_step", "2", "--num_generations", "2", "--eval_examples", "24",
                  "--gap_monitor_steps", "0", "--gap_monitor_sequences", "1", "--log_completions", "0",
                  "--tensorboard", "false", "--progress_bar", "false"]) == 0
    reported = read_metrics(out / "metrics.jsonl")[-1]
    recipe = read_recipe(out / "final_model")
    assert (recipe.task, recipe.gen_length, recipe.block_length, recipe.steps, recipe.temperature,
            recipe.max_prompt_length) == ("sudoku4", 16, 16, 16, 0.0, 64)
    capsys.readouterr()
    report = _eval_json(tmp_path, "final", "--model", str(out / "final_model"), "--limit", "24")
    assert report["accuracy"] == reported["eval/accuracy"]
    assert report["mean_reward"] == pytest.approx(reported["eval/reward"], abs=1e-12)
    assert f"model recipe {out / 'final_model' / RECIPE_FILE}" in capsys.readouterr().err


def test_an_sft_model_records_the_decoding_it_was_evaluated_with(tmp_path):
    from dipod.lm.sft import SFTConfig, train_sft

    cfg = SFTConfig(task="countdown", tiny_hidden_size=32, tiny_layers=1, tiny_heads=2, tiny_intermediate_size=32,
                    gen_length=24, block_length=8, steps=12, max_prompt_length=48, max_steps=2, batch_size=4, train_examples=8,
                    eval_examples=0, progress_bar=False, confidence_threshold=0.9, output_dir=str(tmp_path))
    result = train_sft(cfg)
    recipe = read_recipe(result["model_dir"])
    assert recipe == sft_recipe(cfg) and recipe.sampler_settings() == cfg.sampler_settings()
    assert (recipe.task, recipe.max_prompt_length, recipe.confidence_threshold) == ("countdown", 48, 0.9)


def test_a_model_without_a_chat_template_names_the_compact_prompt_style(tmp_path, capsys):
    assert dipod(["lm", "eval", "--model", "reference:sudoku4", "--prompt_style", "chat", "--limit", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("dipod lm eval: error:") and "--prompt_style compact" in err[-1]
    assert dipod(["lm", "train", "--config", str(ROOT / "configs/lm/tiny_sudoku4.yaml"), "--prompt_style", "chat",
                  "--output_dir", str(tmp_path / "run"), "--progress_bar", "false", "--tensorboard", "false"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("dipod lm train: error:") and "--prompt_style compact" in err[-1]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # failed before any rollout


# ----------------------------------------------------------------------------------- the tiny RL configs

@pytest.mark.parametrize("task", ["sudoku4", "countdown"])
def test_the_tiny_yaml_configs_are_the_demo_recipe(task):
    from dipod.demo import TINY_CONFIGS, TINY_RL_RECIPE, tiny_rl_config
    from dipod.lm.train_config import TrainConfig

    path = ROOT / "configs" / "lm" / f"tiny_{task}.yaml"
    assert path.samefile(TINY_CONFIGS / f"tiny_{task}.yaml")  # one file, packaged, linked from configs/lm
    from_yaml = parse_config(TrainConfig, ["--config", str(path)], "t")
    assert from_yaml == tiny_rl_config(f"reference:{task}", f"runs/tiny_{task}", task=task)
    assert (from_yaml.gen_length, from_yaml.diffusion_steps, from_yaml.prompt_style) == (16, 16, "compact")
    if task == "sudoku4":
        assert all(getattr(from_yaml, k) == v for k, v in TINY_RL_RECIPE.items() if k not in ("model", "output_dir"))
