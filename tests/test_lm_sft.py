"""`dipod lm sft` / `lm eval` / `lm generate` and the reference-policy cache.

The loss is pinned against a hand computation with a fake model of known logits; a short SFT run
on a very small model must lower the loss and leave a loadable model, metrics and a result file.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from dipod import cli
from dipod.config import ConfigError
from dipod.lm.model import load_masked_lm
from dipod.lm.sft import SFTConfig, draw_sft_masks, lr_factor, sft_loss, train_sft
from dipod.lm.tasks import get_task
from dipod.runlog import read_metrics

MASK = 9
VOCAB = 5

# A very small model and little data, so a run takes seconds on a shared 2-core CPU.
SMALL = dict(task="sudoku4", tiny_hidden_size=32, tiny_layers=1, tiny_heads=2, tiny_intermediate_size=64,
             gen_length=16, block_length=16, steps=4, batch_size=16, learning_rate=3e-3, warmup_steps=0,
             train_examples=64, eval_examples=8, progress_bar=False, tensorboard=False)


class FakeLogits:
    """Logits that ignore the input: row b, position i gets ``table[i]``; records the ids it saw."""

    def __init__(self, table_tv: torch.Tensor, batch: int):
        self.table_btv = table_tv.expand(batch, *table_tv.shape)
        self.seen_ids = None

    def __call__(self, ids, attn, first):
        self.seen_ids = ids.clone()
        return self.table_btv[:, first:].clone()


def test_sft_loss_matches_hand_computation():
    table_tv = torch.tensor([[0.0] * VOCAB, [0.0] * VOCAB,  # two prompt positions (never scored)
                             [2.0, 0.0, 0.0, 0.0, 1.0],
                             [0.0, 1.0, 3.0, 0.0, 0.0],
                             [0.5, 0.5, 0.5, 0.5, -1.0]])
    prompt_ids = torch.tensor([[7, 3], [0, 4]])
    prompt_attn = torch.tensor([[1, 1], [0, 1]])
    completion_ids = torch.tensor([[0, 2, 4], [4, 1, 3]])
    mask_bg = torch.tensor([[True, False, True], [False, True, True]])
    p_mask_b = torch.tensor([0.5, 0.25])
    fake = FakeLogits(table_tv, batch=2)
    loss, stats = sft_loss(fake, prompt_ids, prompt_attn, completion_ids, mask_bg, p_mask_b, MASK)

    def nll(position: int, token: int) -> float:
        row = table_tv[position].tolist()
        return math.log(sum(math.exp(v) for v in row)) - row[token]

    # row 0: positions 0 and 2 masked, weight 1/0.5; row 1: positions 1 and 2, weight 1/0.25; / G = 3
    row0 = (nll(2, 0) + nll(4, 4)) / 0.5 / 3
    row1 = (nll(3, 1) + nll(4, 3)) / 0.25 / 3
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    assert stats["masked_nll"] == pytest.approx((nll(2, 0) + nll(4, 4) + nll(3, 1) + nll(4, 3)) / 4, rel=1e-6)
    # the model saw the prompt untouched and the mask token exactly where mask_bg says
    assert torch.equal(fake.seen_ids[:, :2], prompt_ids)
    assert torch.equal(fake.seen_ids[:, 2:], completion_ids.masked_fill(mask_bg, MASK))


def test_sft_loss_is_unbiased_for_the_mean_token_nll():
    """E over t and the mask of the 1/p-weighted loss = the mean NLL of all completion tokens."""
    gen, batch = 4, 20000
    table_tv = torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 1.0, 0.0],
                             [0.0, 0.0, 0.0, 0.0, 3.0], [1.0, 1.0, 1.0, 0.0, 0.0]])
    completion_ids = torch.tensor([[0, 3, 4, 2]]).expand(batch, gen)
    prompt_ids = torch.zeros(batch, 0, dtype=torch.long)
    mask_bg, p_mask_b = draw_sft_masks(batch, gen, torch.Generator().manual_seed(0), eps=0.05)
    loss, _ = sft_loss(FakeLogits(table_tv, batch), prompt_ids, prompt_ids, completion_ids, mask_bg, p_mask_b, MASK)
    exact = torch.nn.functional.cross_entropy(table_tv, completion_ids[0]).item()
    assert loss.item() == pytest.approx(exact, rel=0.03)


def test_draw_sft_masks_is_seeded_and_masks_at_rate_p():
    a = draw_sft_masks(4000, 64, torch.Generator().manual_seed(3), eps=0.01)
    b = draw_sft_masks(4000, 64, torch.Generator().manual_seed(3), eps=0.01)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    mask_bg, p_mask_b = a
    assert float(p_mask_b.min()) >= 0.01 and float(p_mask_b.max()) <= 1.0
    assert float(p_mask_b.mean()) == pytest.approx(0.505, abs=0.015)  # (1 - eps) / 2 + eps
    # per row the mask fraction tracks p: residuals are binomial noise of sd <= 0.5 / sqrt(64)
    residual_b = mask_bg.float().mean(1) - p_mask_b
    assert abs(float(residual_b.mean())) < 0.005
    assert float(residual_b.abs().max()) < 0.3


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "run"
    cfg = SFTConfig(**SMALL, max_steps=40, eval_every=20, save_every=20, output_dir=str(out))
    return cfg, train_sft(cfg)


def test_short_sft_run_lowers_the_loss_and_writes_outputs(short_run):
    cfg, result = short_run
    out = cfg.output_dir
    rows = read_metrics(f"{out}/metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 41))
    losses = [r["loss"] for r in rows]
    assert sum(losses[-8:]) / 8 < 0.7 * sum(losses[:8]) / 8
    evals = [r for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [20, 40]
    assert result["final_step"] == 40 and result["stopped_because"] == "max_steps"
    assert result["eval_accuracy"] == evals[-1]["eval/accuracy"]
    assert json.loads(open(f"{out}/sft_result.json").read()) == result
    lm = load_masked_lm(result["model_dir"])
    trained = dict(lm.model.named_parameters())
    weights = load_file(f"{out}/checkpoint-40/model.safetensors")
    for name, value in weights.items():
        if name in trained:
            assert torch.equal(trained[name].detach(), value), name


def test_resumed_sft_run_matches_an_uninterrupted_one(short_run, tmp_path):
    cfg, _ = short_run
    out = tmp_path / "resumed"
    # Batches and masks depend only on (seed, step), so steps 1..20 of the 40-step run are the reference.
    train_sft(SFTConfig(**{**SMALL, "eval_examples": 0}, max_steps=10, eval_every=0, output_dir=str(out)))
    train_sft(SFTConfig(**{**SMALL, "eval_examples": 0}, max_steps=20, eval_every=0, output_dir=str(out), resume=True))
    full = read_metrics(f"{cfg.output_dir}/metrics.jsonl")[:20]
    resumed = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, 21))
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in full], rel=1e-5)


def test_eval_cli_writes_results_with_the_documented_schema(short_run, tmp_path, capsys):
    _, result = short_run
    out = tmp_path / "eval.json"
    code = cli.main(["lm", "eval", "--model", result["model_dir"], "--task", "sudoku4", "--limit", "5",
                     "--gen_length", "16", "--block_length", "16", "--steps", "4", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert {"model", "task", "data", "split", "sampler", "accuracy", "mean_reward", "num_examples",
            "results"} <= set(report)
    assert report["num_examples"] == 5 and len(report["results"]) == 5
    task = get_task("sudoku4")
    examples = task.load("test", limit=5)
    for row, example in zip(report["results"], examples):
        assert set(row) == {"prompt", "completion", "reward", "correct"}
        assert row["prompt"] == task.prompt(example)
        assert row["reward"] == task.reward(row["completion"], example)
        assert row["correct"] == task.is_correct(row["completion"], example)
    assert report["accuracy"] == sum(r["correct"] for r in report["results"]) / 5
    assert report["mean_reward"] == pytest.approx(sum(r["reward"] for r in report["results"]) / 5)
    assert f"accuracy {report['accuracy']:.4f}" in capsys.readouterr().out


def test_generate_cli_prints_n_samples(short_run, capsys):
    _, result = short_run
    code = cli.main(["lm", "generate", "--model", result["model_dir"], "--task", "countdown", "--n", "3",
                     "--gen_length", "16", "--block_length", "16", "--steps", "4"])
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.count("--- example") == 3 and printed.count("completion:") == 3


@pytest.mark.parametrize("argv, message", [
    (["lm", "eval", "--model", "MODEL", "--task", "no_such_task"], "unknown task 'no_such_task'"),
    (["lm", "eval", "--model", "/no/such/model_dir", "--task", "sudoku4"], "is not a directory"),
    (["lm", "eval", "--task", "sudoku4"], "--model is required"),
    (["lm", "sft", "--task", "no_such_task", "--max_steps", "1"], "unknown task 'no_such_task'"),
    (["lm", "sft", "--model", "/no/such/model_dir", "--max_steps", "1"], "is not a directory"),
    (["lm", "sft", "--target_accuracy_min", "0.7", "--target_accuracy_max", "0.5"], "target_accuracy_min"),
])
def test_bad_inputs_give_one_clear_error(short_run, argv, message, capsys, tmp_path):
    argv = [short_run[1]["model_dir"] if a == "MODEL" else a for a in argv]
    if argv[1] == "sft":
        argv += ["--output_dir", str(tmp_path / "run")]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_sft_refuses_demonstrations_longer_than_gen_length(tmp_path):
    cfg = SFTConfig(**{**SMALL, "gen_length": 8, "block_length": 8}, max_steps=1, output_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="raise --gen_length"):
        train_sft(cfg)


def test_lr_factor_warms_up_then_decays_by_cosine():
    cosine = lr_factor(SFTConfig(max_steps=110, warmup_steps=10, lr_schedule="cosine"))
    assert [cosine(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert [cosine(s) for s in (10, 60, 110)] == pytest.approx([1.0, 0.5, 0.0], abs=1e-12)
    constant = lr_factor(SFTConfig(max_steps=110, warmup_steps=0))
    assert constant(0) == constant(109) == 1.0
    with pytest.raises(ConfigError, match="lr_schedule"):
        SFTConfig(lr_schedule="linear")
