"""On-policy training loop for continuous control: FPO++ (+ DiPOD, + self-distillation) or Gaussian PPO.

One iteration, top to bottom (``Runner.train``):
1. (every ``distill_every`` iterations) interleaved self-distillation (Algorithm 1);
2. rollout of ``rollout_steps`` vector steps: running obs normalisation, reward scaling,
   time-out bootstrapping (``r += gamma * V(final_obs)`` where an episode hit its time limit);
3. GAE(gamma, lambda) from ``dipod.advantages``;
4. flow: fixed Monte-Carlo draws and their ELBOs under the rollout policy; Gaussian: log-probs;
5. the update (``dipod.control.update``), with the on-policy CFM loss of the fresh rollout
   logged before and after it (``cfm_loss_before`` / ``cfm_loss_after``);
6. metrics.jsonl / TensorBoard row keyed by environment steps; atomic checkpoint every
   ``save_every`` iterations and at the end.
Initial self-distillation (Algorithm 3) runs once before the first iteration. Environment steps
taken by distillation count towards ``total_steps`` (it uses the live environments).
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from dipod.advantages import generalized_advantage_estimation
from dipod.checkpoint import capture_rng_state, latest_checkpoint, load_checkpoint, restore_rng_state, save_checkpoint
from dipod.config import ConfigError, config_to_dict, option, save_config
from dipod.control.distill import DistillSettings, self_distill
from dipod.control.envs import GymVecEnv, RewardScaler, VecEnv
from dipod.control.flow import Critic, FlowActor
from dipod.control.gaussian import GaussianActor
from dipod.control.update import (RolloutBatch, UpdateSettings, fpo_plus_plus_update, gaussian_ppo_update,
                                 mean_cfm_loss, rollout_elbo)
from dipod.runlog import MetricsLogger

POLICIES = ("flow", "gaussian")
LR_SCHEDULES = ("fixed", "adaptive")


@dataclass
class ControlConfig:
    """``dipod control train`` settings. Defaults are CPU-sized for MuJoCo (see docs/control.md);
    ``configs/control_fpo_plus_plus_paper.yaml`` holds FPO++'s published values."""

    env: str = option("gymnasium task id (1-D Box actions)", default="HalfCheetah-v5")
    policy: str = option("'flow' (FPO++) or 'gaussian' (PPO baseline)", default="flow")
    output_dir: str = option("run folder: metrics.jsonl, tb/, checkpoint-STEP/", default="runs/control")
    total_steps: int = option("environment steps (all envs, distillation included)", default=100_000)
    seed: int = option("seed of torch, the generators and the environments", default=0)
    resume: str | None = option(
        "'auto' (latest checkpoint in output_dir if any), 'latest' (must exist) or a checkpoint-STEP folder",
        default=None,
    )
    num_envs: int = option("parallel environments", default=8)
    rollout_steps: int = option("vector steps per iteration (batch = num_envs * rollout_steps)", default=256)
    gamma: float = option("discount", default=0.99)
    gae_lambda: float = option("GAE lambda", default=0.95)
    normalize_rewards: bool = option("divide rewards by the running std of the return", default=True)
    actor_hidden: list[int] = option("actor MLP widths", default_factory=lambda: [256, 256])
    critic_hidden: list[int] = option("critic MLP widths", default_factory=lambda: [256, 256])
    sampling_steps: int = option("Euler steps of the flow sampler (FPO++: 64, FPO: 10)", default=10)
    num_draws: int = option("Monte-Carlo (eps, t) draws per action (FPO++: 16, FPO: 8)", default=8)
    time_skew_b: float = option("b in t = 0.005 + 0.99 (1 - (1 - u)^(1/b)); 1 = uniform", default=1.0)
    init_log_std: float = option("Gaussian policy: initial log std (normalised actions)", default=0.0)
    learning_rate: float = option("AdamW learning rate (FPO++: 1e-4)", default=3e-4)
    weight_decay: float = option("AdamW weight decay of the RL optimizer", default=0.0)
    epochs: int = option("passes over each rollout (FPO++: 16); 5 keeps the CPU update short", default=5)
    minibatches: int = option("minibatches per epoch", default=32)
    # FPO++ published 0.05 for ~100k-sample GPU batches; with 2048-sample CPU batches it held flows back
    # (docs/results/control_dipod.md: 0.2 learned faster on HalfCheetah, Hopper and a bandit).
    clip_eps: float = option("trust region, per draw for flows (FPO++: 0.05, PPO: 0.2)", default=0.2)
    log_ratio_max: float = option("per-draw log-ratio clamp (from above, straight-through)", default=3.0)
    cfm_clamp_negative: float = option("CFM-loss clamp on negative-advantage draws", default=5.0)
    value_coef: float = option("value-loss weight", default=0.5)
    value_clip: float = option("value clipping range (<= 0: unclipped MSE)", default=0.2)
    max_grad_norm: float = option("global gradient-norm clip", default=0.5)
    normalize_advantages: bool = option("normalise advantages over the batch", default=True)
    advantage_clip: float = option("clamp (normalised) advantages to +-this (<= 0: off)", default=5.0)
    lr_schedule: str = option("'fixed' or 'adaptive' (clip-fraction driven, KL-free)", default="fixed")
    target_clip_fraction: float = option("adaptive LR: target fraction outside the trust region", default=0.2)
    dipod_beta: float = option("DiPOD per-update ELBO term weight (Algorithm 2); 0 = off", default=0.0)
    distill_initial_iterations: int = option(
        "initial self-distillation (Algorithm 3): K iterations before RL; 0 = off",
        default=0,
    )
    distill_every: int = option("interleaved self-distillation every n RL iterations; 0 = off", default=0)
    distill_iterations: int = option("iterations of each interleaved distillation stage", default=4)
    distill_rollout_steps: int = option("teacher rollout vector steps per distillation iteration", default=32)
    distill_updates: int = option("student AdamW steps per distillation iteration", default=32)
    distill_minibatch_size: int = option("distillation minibatch (obs, action) pairs", default=256)
    distill_lr: float = option("distillation AdamW learning rate", default=3e-4)
    distill_weight_decay: float = option("distillation AdamW weight decay", default=1e-4)
    distill_max_grad_norm: float = option("distillation gradient-norm clip", default=1.0)
    save_every: int = option("checkpoint every n iterations (and at the end)", default=10)
    keep_checkpoints: int = option("checkpoints kept on disk", default=2)
    tensorboard: bool = option("mirror metrics to TensorBoard (output_dir/tb)", default=True)
    progress: bool = option("show a progress bar", default=True)
    num_threads: int = option(
        "torch CPU threads; small MLPs run fastest on one (more threads oversubscribe a shared CPU)",
        default=1,
    )

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(f"policy={self.policy!r}; choose one of {POLICIES}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"lr_schedule={self.lr_schedule!r}; choose one of {LR_SCHEDULES}")
        positive = ("total_steps", "num_envs", "rollout_steps", "sampling_steps", "num_draws", "epochs", "minibatches",
                    "save_every", "num_threads", "distill_iterations", "distill_rollout_steps", "distill_updates",
                    "distill_minibatch_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("learning_rate", "time_skew_b", "distill_lr", "max_grad_norm", "log_ratio_max", "cfm_clamp_negative"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be > 0")
        for name in ("dipod_beta", "distill_initial_iterations", "distill_every", "weight_decay", "distill_weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 0 (0 turns it off)")
        if not (0 <= self.gamma <= 1 and 0 <= self.gae_lambda <= 1):
            raise ConfigError(f"gamma={self.gamma} and gae_lambda={self.gae_lambda} must lie in [0, 1]")
        if not 0 < self.clip_eps < 1:
            raise ConfigError(f"clip_eps={self.clip_eps} must lie in (0, 1)")
        if not self.actor_hidden or not self.critic_hidden or min(self.actor_hidden + self.critic_hidden) < 1:
            raise ConfigError("actor_hidden / critic_hidden need at least one positive layer width, e.g. --actor_hidden 256,256")
        if self.num_envs * self.rollout_steps < self.minibatches:
            raise ConfigError(f"num_envs * rollout_steps = {self.num_envs * self.rollout_steps} samples cannot fill "
                              f"minibatches={self.minibatches}; lower minibatches or collect more steps")
        if self.policy == "gaussian" and (self.dipod_beta > 0 or self.distill_initial_iterations > 0 or self.distill_every > 0):
            raise ConfigError("dipod_beta and self-distillation act on the ELBO of a flow policy; with policy=gaussian "
                              "set dipod_beta=0, distill_initial_iterations=0 and distill_every=0 (or use policy=flow)")
        if self.total_steps < self.num_envs * self.rollout_steps:
            raise ConfigError(f"total_steps={self.total_steps} is less than one iteration "
                              f"(num_envs * rollout_steps = {self.num_envs * self.rollout_steps})")

    def update_settings(self) -> UpdateSettings:
        return UpdateSettings(
            epochs=self.epochs, minibatches=self.minibatches, clip_eps=self.clip_eps,
            log_ratio_max=self.log_ratio_max, cfm_clamp_negative=self.cfm_clamp_negative, dipod_beta=self.dipod_beta,
            value_coef=self.value_coef, value_clip=self.value_clip, max_grad_norm=self.max_grad_norm,
            normalize_advantages=self.normalize_advantages, advantage_clip=self.advantage_clip,
            lr_schedule=self.lr_schedule, target_clip_fraction=self.target_clip_fraction)

    def distill_settings(self, iterations: int) -> DistillSettings:
        return DistillSettings(
            iterations=iterations, rollout_steps=self.distill_rollout_steps, updates_per_iteration=self.distill_updates,
            minibatch_size=self.distill_minibatch_size, num_draws=self.num_draws, lr=self.distill_lr,
            weight_decay=self.distill_weight_decay, max_grad_norm=self.distill_max_grad_norm)


def build_actor(cfg: ControlConfig, num_obs: int, num_actions: int, low: Any, high: Any) -> nn.Module:
    if cfg.policy == "flow":
        return FlowActor(num_obs, num_actions, low, high, hidden=cfg.actor_hidden, sampling_steps=cfg.sampling_steps,
                         time_skew_b=cfg.time_skew_b)
    return GaussianActor(num_obs, num_actions, low, high, hidden=cfg.actor_hidden, init_log_std=cfg.init_log_std)


def resolve_resume(cfg: ControlConfig) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run (never silently overwriting one)."""
    out = Path(cfg.output_dir)
    latest = latest_checkpoint(out)
    if cfg.resume in (None, ""):
        if latest is not None:
            raise ValueError(f"{out} already holds {latest.name}; pass --resume auto to continue it "
                             "or choose a new --output_dir")
        return None
    if cfg.resume == "auto":
        return latest
    if cfg.resume == "latest":
        if latest is None:
            raise FileNotFoundError(f"--resume latest: no checkpoint-STEP folder in {out}")
        return latest
    path = Path(cfg.resume)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume {path}: not a checkpoint folder (expected OUTPUT_DIR/checkpoint-STEP)")
    return path


class Runner:
    """Owns environments, networks, optimizer and logging of one training run."""

    def __init__(self, cfg: ControlConfig, env: VecEnv | None = None):
        self.cfg = cfg
        self.resume_from = resolve_resume(cfg)
        self.env = env if env is not None else GymVecEnv(cfg.env, cfg.num_envs)
        torch.set_num_threads(cfg.num_threads)
        torch.manual_seed(cfg.seed)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        dims = (self.env.num_obs, self.env.num_actions, self.env.action_low.tolist(), self.env.action_high.tolist())
        self.actor = build_actor(cfg, *dims)
        self.critic = Critic(self.env.num_obs, hidden=cfg.critic_hidden)
        self.optimizer = self._new_optimizer()
        self.reward_scaler = RewardScaler(cfg.num_envs, cfg.gamma)
        self.settings = cfg.update_settings()
        self.global_step = 0
        self.iteration = 0
        self.initial_distill_done = cfg.distill_initial_iterations == 0
        self.recent_returns: deque[float] = deque(maxlen=20)
        if self.resume_from is not None:
            self._load(self.resume_from)

    def _new_optimizer(self) -> torch.optim.Optimizer:
        params = list(self.actor.parameters()) + list(self.critic.parameters())
        return torch.optim.AdamW(params, lr=self.cfg.learning_rate, eps=1e-5, weight_decay=self.cfg.weight_decay)

    # ---- checkpoints -------------------------------------------------------------------------
    def weights(self) -> dict[str, Tensor]:
        return {**{f"actor.{k}": v for k, v in self.actor.state_dict().items()},
                **{f"critic.{k}": v for k, v in self.critic.state_dict().items()}}

    def save(self) -> Path:
        state = {"optimizer": self.optimizer.state_dict(), "reward_scaler": self.reward_scaler.state_dict(),
                 "rng": capture_rng_state({"train": self.generator}), "iteration": self.iteration,
                 "initial_distill_done": self.initial_distill_done, "recent_returns": list(self.recent_returns)}
        meta = {"config": config_to_dict(self.cfg), "num_obs": self.env.num_obs, "num_actions": self.env.num_actions,
                "action_low": self.env.action_low.tolist(), "action_high": self.env.action_high.tolist()}
        return save_checkpoint(Path(self.cfg.output_dir), self.global_step, self.weights(), state, meta,
                               keep_last=self.cfg.keep_checkpoints)

    def _load(self, path: Path) -> None:
        weights, state, meta = load_checkpoint(path)
        saved = meta["config"]
        for key in ("env", "policy", "actor_hidden", "critic_hidden"):
            if saved[key] != getattr(self.cfg, key):
                raise ValueError(f"cannot resume {path}: it was trained with {key}={saved[key]!r}, "
                                 f"not {getattr(self.cfg, key)!r}")
        self.actor.load_state_dict({k[6:]: v for k, v in weights.items() if k.startswith("actor.")})
        self.critic.load_state_dict({k[7:]: v for k, v in weights.items() if k.startswith("critic.")})
        self.optimizer.load_state_dict(state["optimizer"])
        self.reward_scaler.load_state_dict(state["reward_scaler"])
        restore_rng_state(state["rng"], {"train": self.generator})
        self.global_step, self.iteration = int(meta["step"]), int(state["iteration"])
        self.initial_distill_done = bool(state["initial_distill_done"])
        self.recent_returns.extend(state["recent_returns"])

    # ---- one iteration -----------------------------------------------------------------------
    @torch.no_grad()
    def collect(self, obs: Tensor) -> tuple[Tensor, RolloutBatch, dict[str, float]]:
        """Roll the current policy out for ``rollout_steps``; returns next obs, the batch and stats."""
        cfg, env = self.cfg, self.env
        steps, n = cfg.rollout_steps, env.num_envs
        obs_t = torch.zeros(steps, n, env.num_obs)
        actions_t = torch.zeros(steps, n, env.num_actions)
        rewards_t, values_t, dones_t = torch.zeros(steps, n), torch.zeros(steps, n), torch.zeros(steps, n)
        logp_t = torch.zeros(steps, n)
        returns: list[float] = []
        for step in range(steps):
            self.actor.obs_norm.update(obs)
            self.critic.obs_norm.update(obs)
            action = self.actor.sample(obs, self.generator)
            if cfg.policy == "gaussian":
                logp_t[step] = self.actor.log_prob(obs, action)
            obs_t[step], actions_t[step], values_t[step] = obs, action, self.critic(obs)
            obs, reward, done, extras = env.step(self.actor.to_env_action(action))
            if cfg.normalize_rewards:
                reward = self.reward_scaler(reward, done)
            time_outs = extras["time_outs"]
            if time_outs.any():  # the episode did not end: bootstrap the value of the state it stopped in
                reward = reward + cfg.gamma * time_outs.float() * self.critic(extras["final_obs"])
            rewards_t[step], dones_t[step] = reward, done.float()
            returns += extras["episode_returns"].tolist()
        advantages, value_targets = generalized_advantage_estimation(
            rewards_t, values_t, dones_t, self.critic(obs), cfg.gamma, cfg.gae_lambda)
        flat = lambda x: x.reshape(steps * n, *x.shape[2:])  # noqa: E731
        batch = RolloutBatch(obs=flat(obs_t), actions=flat(actions_t), advantages=flat(advantages),
                             returns=flat(value_targets), values=flat(values_t))
        if cfg.policy == "flow":
            batch.eps, batch.t = self.actor.draw_noise(len(batch), cfg.num_draws, self.generator)
            batch.elbo_old = rollout_elbo(self.actor, batch.obs, batch.actions, batch.eps, batch.t)
        else:
            batch.logp_old = flat(logp_t)
        self.recent_returns.extend(returns)
        stats = {"rollout_reward": float(rewards_t.mean())}
        if returns:
            stats["episode_return"] = sum(returns) / len(returns)
            stats["episodes"] = float(len(returns))
        return obs, batch, stats

    def update(self, batch: RolloutBatch) -> dict[str, float]:
        if self.cfg.policy == "gaussian":
            return gaussian_ppo_update(self.actor, self.critic, self.optimizer, batch, self.settings, self.generator)
        info = {"cfm_loss_before": float(-batch.elbo_old.mean())}
        info.update(fpo_plus_plus_update(self.actor, self.critic, self.optimizer, batch, self.settings, self.generator))
        info["cfm_loss_after"] = mean_cfm_loss(self.actor, batch.obs, batch.actions, batch.eps, batch.t)
        return info

    def distill(self, obs: Tensor, iterations: int, logger: MetricsLogger, kind: str) -> Tensor:
        obs, info, returns = self_distill(self.actor, self.env, obs, self.cfg.distill_settings(iterations), self.generator)
        self.optimizer.state.clear()  # Adam moments belong to the pre-distillation parameters
        self.global_step += int(info["env_steps"])
        row = {f"distill/{k}": v for k, v in info.items()}
        row["distill/kind"] = kind
        if returns:
            row["distill/episode_return"] = sum(returns) / len(returns)
        logger.log(self.global_step, row)
        return obs

    def train(self) -> dict[str, Any]:
        """Run until ``total_steps`` environment steps; returns the last metrics row."""
        cfg = self.cfg
        out = Path(cfg.output_dir)
        resumed = self.resume_from is not None
        logger = MetricsLogger(out, tensorboard=cfg.tensorboard, resume_from_step=self.global_step + 1 if resumed else None,
                               run_config=config_to_dict(cfg))
        save_config(cfg, out / "config.yaml")
        # A resumed run cannot restore MuJoCo's internal state; it restarts episodes with a new seed.
        obs = self.env.reset(seed=cfg.seed + 7919 * self.iteration)
        last: dict[str, Any] = {}
        bar = tqdm(total=cfg.total_steps, initial=self.global_step, disable=not cfg.progress, unit="step",
                   desc=f"{cfg.policy} {cfg.env}", dynamic_ncols=True)
        try:
            if not self.initial_distill_done:
                step_before = self.global_step
                obs = self.distill(obs, cfg.distill_initial_iterations, logger, "initial")
                self.initial_distill_done = True
                bar.update(self.global_step - step_before)
            while self.global_step < cfg.total_steps:
                start, step_at_start = time.perf_counter(), self.global_step
                distill_s = 0.0
                if cfg.distill_every and self.iteration > 0 and self.iteration % cfg.distill_every == 0:
                    step_before = self.global_step
                    obs = self.distill(obs, cfg.distill_iterations, logger, "interleaved")
                    distill_s = time.perf_counter() - start
                    bar.update(self.global_step - step_before)
                t_rollout = time.perf_counter()
                obs, batch, stats = self.collect(obs)
                t_update = time.perf_counter()
                info = self.update(batch)
                now = time.perf_counter()
                self.global_step += len(batch)
                self.iteration += 1
                last = {"iteration": self.iteration, **stats, **info, "rollout_s": t_update - t_rollout,
                        "update_s": now - t_update, "distill_s": distill_s,
                        "steps_per_s": (self.global_step - step_at_start) / (now - start)}
                logger.log(self.global_step, last)
                bar.update(len(batch))
                if self.recent_returns:
                    bar.set_postfix(ret=f"{sum(self.recent_returns) / len(self.recent_returns):.1f}")
                if self.iteration % cfg.save_every == 0 or self.global_step >= cfg.total_steps:
                    self.save()
        finally:
            bar.close()
            logger.close()
        return last

    def close(self) -> None:
        self.env.close()


def train(cfg: ControlConfig, env: VecEnv | None = None) -> dict[str, Any]:
    runner = Runner(cfg, env)
    try:
        return runner.train()
    finally:
        runner.close()


def config_from_checkpoint(meta: dict[str, Any]) -> ControlConfig:
    """Rebuild the training config saved in a checkpoint (unknown keys and nulls fall back to defaults)."""
    names = {f.name for f in dataclasses.fields(ControlConfig)}
    return ControlConfig(**{k: v for k, v in meta["config"].items() if k in names and v is not None})
