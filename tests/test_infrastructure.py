"""Config parsing, atomic run outputs, checkpoints and advantage estimators."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from dipod.advantages import generalized_advantage_estimation, group_relative_advantages
from dipod.checkpoint import (
    NonFiniteCheckpointError,
    capture_rng_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from dipod.config import ConfigError, parse_config
from dipod.runlog import MetricsLogger, read_metrics


@dataclasses.dataclass
class _Cfg:
    lr: float = 1e-3
    steps: int = 10
    name: str = "x"
    use_thing: bool = False
    seed: int | None = None
    modules: list[str] = dataclasses.field(default_factory=lambda: ["q", "v"])

    def __post_init__(self):
        if self.steps <= 0:
            raise ConfigError(f"steps={self.steps} must be > 0")


def test_config_precedence_defaults_yaml_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.5\nsteps: 3\nmodules: [a, b, c]\n")
    cfg = parse_config(_Cfg, ["--config", str(path), "--steps", "7", "--use-thing", "true", "--seed", "none"], prog="t")
    assert cfg == _Cfg(lr=0.5, steps=7, use_thing=True, seed=None, modules=["a", "b", "c"])
    assert parse_config(_Cfg, ["--modules", "k,o"], prog="t").modules == ["k", "o"]


def test_config_rejects_unknown_keys_and_bad_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.5\nstepz: 3\n")
    with pytest.raises(ConfigError, match=r"stepz.*valid keys.*steps"):
        parse_config(_Cfg, ["--config", str(path)], prog="t")
    with pytest.raises(ConfigError, match="steps"):
        parse_config(_Cfg, ["--steps", "2.5"], prog="t")
    with pytest.raises(ConfigError, match="must be > 0"):
        parse_config(_Cfg, ["--steps", "0"], prog="t")
    with pytest.raises(ConfigError, match="not found"):
        parse_config(_Cfg, ["--config", str(tmp_path / "missing.yaml")], prog="t")


def test_metrics_logger_resume_drops_rows_after_checkpoint(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        for step in range(5):
            log.log(step, {"reward": step * 0.5, "bad": float("nan")})
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 5, "rew')  # a torn line from a killed run
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3, 4]
    with MetricsLogger(tmp_path, tensorboard=False, resume_from_step=3) as log:
        log.log(3, {"reward": 9.0})
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert rows[-1]["reward"] == 9.0 and rows[0]["bad"] == "nan"


def test_checkpoint_round_trip_prune_and_refuse_nan(tmp_path):
    gen = torch.Generator().manual_seed(3)
    weights = {"w": torch.randn(3, 2, generator=gen)}
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, weights, {"opt": {"lr": 0.1 * step}}, {"config": {"a": 1}}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    loaded, state, meta = load_checkpoint(latest_checkpoint(tmp_path))
    assert torch.equal(loaded["w"], weights["w"]) and state["opt"]["lr"] == pytest.approx(0.3)
    assert meta == {"step": 3, "config": {"a": 1}}
    with pytest.raises(NonFiniteCheckpointError):
        save_checkpoint(tmp_path, 4, {"w": torch.tensor([1.0, float("nan")])}, {}, {})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    assert not any(p.name.startswith(".checkpoint") for p in tmp_path.iterdir())


def test_rng_state_round_trip():
    gen = torch.Generator().manual_seed(0)
    state = capture_rng_state({"g": gen})
    first = (torch.rand(3), torch.rand(3, generator=gen))
    restore_rng_state(state, {"g": gen})
    second = (torch.rand(3), torch.rand(3, generator=gen))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_group_relative_advantages_closed_form():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 0.0])
    adv = group_relative_advantages(rewards, group_size=2)
    assert torch.allclose(adv, torch.tensor([0.5, -0.5, 0.0, 0.0, 1.0, -1.0]))
    scaled = group_relative_advantages(rewards, group_size=2, scale_by_std=True, eps=0.0)
    # each non-degenerate group of two has unbiased std |r1 - r2| / sqrt(2)
    assert torch.allclose(scaled[:2], torch.tensor([0.5, -0.5]) / (2 ** -0.5))
    # the documented default eps = 1e-4 under std scaling
    default_eps = group_relative_advantages(rewards, group_size=2, scale_by_std=True)
    assert torch.allclose(default_eps[:2], torch.tensor([0.5, -0.5]) / (2 ** -0.5 + 1e-4))
    # rewards that do not split into whole groups, or no group size, are refused by name (a remainder
    # of 1, of 2, a size of 0 or below) rather than reshaped into something else
    for count, size in ((6, 4), (5, 4), (6, 0), (6, -2)):
        with pytest.raises(ValueError, match=rf"^group_relative_advantages: {count} rewards do not split into groups "
                                             rf"of {size}$"):
            group_relative_advantages(torch.zeros(count), group_size=size)


def test_gae_matches_hand_computation():
    gamma, lam = 0.9, 0.8
    rewards = torch.tensor([[1.0], [0.0], [2.0]])
    values = torch.tensor([[0.5], [0.2], [0.1]])
    dones = torch.tensor([[0.0], [1.0], [0.0]])
    last = torch.tensor([0.4])
    adv, ret = generalized_advantage_estimation(rewards, values, dones, last, gamma, lam)
    d2 = 2.0 + gamma * 0.4 - 0.1
    d1 = 0.0 - 0.2  # episode ends after step 1: no bootstrap, no carry-over
    d0 = 1.0 + gamma * 0.2 - 0.5
    expected = torch.tensor([[d0 + gamma * lam * d1], [d1], [d2]])
    assert torch.allclose(adv, expected) and torch.allclose(ret, expected + values)


def test_gae_defaults_and_integer_rewards():
    """gamma 0.99 and lambda 0.95 when none are given; integer rewards and dones (an environment's
    counts) give the float advantages of the same numbers, not truncated ones."""
    rewards = torch.tensor([[1], [0], [2]])
    values, last = torch.tensor([[0.5], [0.2], [0.1]]), torch.tensor([0.4])
    dones = torch.tensor([[0], [1], [0]])
    adv, ret = generalized_advantage_estimation(rewards, values, dones, last)
    adv_f, ret_f = generalized_advantage_estimation(rewards.float(), values, dones.float(), last, 0.99, 0.95)
    assert adv.dtype == torch.float32 and torch.equal(adv, adv_f) and torch.equal(ret, ret_f)
    assert adv[1, 0].item() == pytest.approx(-0.2)  # 0 - 0.2, not truncated to 0


def test_metrics_json_is_valid_json(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(0, {"x": torch.tensor(1.5)})
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 0, "x": 1.5}
