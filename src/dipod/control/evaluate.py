"""``dipod control eval``: roll a trained checkpoint out for whole episodes and report returns."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dipod.checkpoint import latest_intact_checkpoint, load_checkpoint
from dipod.config import ConfigError, parse_config
from dipod.control.envs import GymVecEnv
from dipod.control.runner import build_actor, config_from_checkpoint
from dipod.runlog import atomic_write_json


@dataclass
class EvalConfig:
    checkpoint: str = field(default="", metadata={"help": "checkpoint-STEP folder, or a run folder (its latest checkpoint)"})
    episodes: int = field(default=10, metadata={"help": "episodes to run"})
    num_envs: int = field(default=5, metadata={"help": "parallel environments"})
    deterministic: bool = field(default=True, metadata={
        "help": "flow: start the sampler from zero noise (FPO++ zero-sampling); gaussian: the mean action"})
    use_ema: bool = field(default=True, metadata={
        "help": "evaluate the actor EMA (what FPO++ saves) when the checkpoint holds an active one"})
    seed: int = field(default=12345, metadata={"help": "seed of the evaluation environments and noise"})
    output: str | None = field(default=None, metadata={"help": "JSON file for the results (default CHECKPOINT/eval.json)"})

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise ConfigError("checkpoint is required: --checkpoint RUN_DIR/checkpoint-STEP (or RUN_DIR)")
        if self.episodes < 1 or self.num_envs < 1:
            raise ConfigError(f"episodes={self.episodes} and num_envs={self.num_envs} must be >= 1")


def resolve_checkpoint(path: str) -> Path:
    folder = Path(path)
    if (folder / "meta.json").is_file():
        return folder
    found = latest_intact_checkpoint(folder)  # a corrupt newest one is named in the log and skipped
    if found is None:
        raise FileNotFoundError(f"no checkpoint at {folder} (pass a checkpoint-STEP folder or a run folder holding one)")
    return found[0]


@torch.no_grad()
def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    path = resolve_checkpoint(cfg.checkpoint)
    weights, state, meta = load_checkpoint(path)
    if "num_obs" not in meta:
        raise ValueError(f"checkpoint {path} is not a control checkpoint (its meta.json has no num_obs: an `lm` "
                         "run?); evaluate language-model runs with `dipod lm eval --model FOLDER`")
    train_cfg = config_from_checkpoint(meta)
    env = GymVecEnv(train_cfg.env, cfg.num_envs)
    try:
        actor = build_actor(train_cfg, meta["num_obs"], meta["num_actions"], meta["action_low"], meta["action_high"])
        prefix = "ema_actor." if cfg.use_ema and state.get("ema_active") else "actor."
        actor.load_state_dict({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)})
        generator = torch.Generator().manual_seed(cfg.seed)
        obs = env.reset(seed=cfg.seed)
        returns: list[float] = []
        lengths: list[int] = []
        while len(returns) < cfg.episodes:
            noise = torch.zeros(cfg.num_envs, env.num_actions) if cfg.deterministic else None
            action = actor.sample(obs, generator, noise_na=noise)
            obs, _, _, extras = env.step(actor.to_env_action(action))
            returns += extras["episode_returns"].tolist()
            lengths += extras["episode_lengths"].tolist()
    finally:
        env.close()
    returns, lengths = returns[: cfg.episodes], lengths[: cfg.episodes]
    mean = sum(returns) / len(returns)
    std = (sum((r - mean) ** 2 for r in returns) / len(returns)) ** 0.5
    result = {"checkpoint": str(path), "env": train_cfg.env, "policy": train_cfg.policy, "step": meta["step"],
              "deterministic": cfg.deterministic,
              "weights": prefix.rstrip("."), "episodes": len(returns), "return_mean": mean, "return_std": std,
              "length_mean": sum(lengths) / len(lengths), "returns": returns}
    atomic_write_json(Path(cfg.output) if cfg.output else path / "eval.json", result)
    return result


def main(argv: list[str], prog: str = "dipod control eval") -> int:
    result = evaluate(parse_config(EvalConfig, argv, prog, description=__doc__))
    print(json.dumps({k: v for k, v in result.items() if k != "returns"}))
    return 0
