"""On-policy training loop for continuous control: FPO++ (+ DiPOD, + self-distillation) or Gaussian PPO.

One iteration, top to bottom (``Runner.train``):
1. (every ``distill_every`` iterations) interleaved self-distillation (Algorithm 1);
2. rollout of ``rollout_steps`` vector steps: running obs normalisation, reward scaling, flow
   actions plus ``action_noise_std`` Gaussian noise (stored and executed, FPO++), time-out
   bootstrapping (``r += gamma * V(final_obs)`` where an episode hit its time limit);
3. GAE(gamma, lambda) from ``dipod.advantages``;
4. flow: fixed Monte-Carlo draws and their ELBOs under the rollout policy; Gaussian: log-probs;
5. the update (``dipod.control.update``), with the on-policy CFM loss of the fresh rollout
   logged before and after it (``cfm_loss_before`` / ``cfm_loss_after``), then the actor EMA step;
   non-finite weights stop the run before anything is saved;
6. metrics.jsonl / TensorBoard row keyed by RL environment steps; atomic checkpoint every
   ``save_every`` iterations and at the end (live weights, plus ``ema_actor.*`` once the EMA is on).
Initial self-distillation (Algorithm 3) runs once before the first iteration. As in the released
code, distillation's environment steps are not counted in ``total_steps`` (they are logged as
``distill/env_steps``); afterwards the RL optimizer is re-created and the EMA reset.
"""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from dipod.advantages import generalized_advantage_estimation
from dipod.checkpoint import (capture_rng_state, latest_checkpoint, load_checkpoint, restore_rng_state,
                              resume_checkpoint, save_checkpoint)
from dipod.config import config_to_dict, save_config
from dipod.control.config import ControlConfig, config_from_checkpoint
from dipod.control.distill import SelfDistillation
from dipod.control.ema import ActorEMA
from dipod.control.envs import GymVecEnv, RewardScaler, VecEnv
from dipod.control.flow import Critic, FlowActor
from dipod.control.gaussian import GaussianActor
from dipod.control.update import RolloutBatch, fpo_plus_plus_update, gaussian_ppo_update, mean_cfm_loss, rollout_proxies

__all__ = ["ControlConfig", "Runner", "build_actor", "config_from_checkpoint", "train"]
from dipod.run_folder import prepare_run_folder
from dipod.runlog import MetricsLogger, TrainingDiverged

def build_actor(cfg: ControlConfig, num_obs: int, num_actions: int, low: Any, high: Any) -> nn.Module:
    if cfg.policy == "flow":
        return FlowActor(num_obs, num_actions, low, high, hidden=cfg.actor_hidden, time_embed_dim=cfg.time_embed_dim,
                         sampling_steps=cfg.sampling_steps, time_skew_b=cfg.time_skew_b, activation=cfg.activation,
                         cfm_reduction=cfg.cfm_reduction)
    return GaussianActor(num_obs, num_actions, low, high, hidden=cfg.actor_hidden, init_log_std=cfg.init_log_std)


def resolve_resume(cfg: ControlConfig) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run (``--resume`` with no checkpoint yet: fresh too)."""
    found = resume_checkpoint(Path(cfg.output_dir), cfg.resume)
    return None if found is None else found[0]


class Runner:
    """Owns environments, networks, optimizer and logging of one training run."""

    def __init__(self, cfg: ControlConfig, env: VecEnv | None = None):
        self.cfg = cfg
        prepare_run_folder(cfg.output_dir, resuming=cfg.resume is not None, overwrite=cfg.overwrite,
                           resume_flag="--resume")
        self.resume_from = resolve_resume(cfg)
        self.env = env if env is not None else GymVecEnv(cfg.env, cfg.num_envs)
        torch.set_num_threads(cfg.num_threads)
        torch.manual_seed(cfg.seed)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        dims = (self.env.num_obs, self.env.num_actions, self.env.action_low.tolist(), self.env.action_high.tolist())
        self.actor = build_actor(cfg, *dims)
        self.critic = Critic(self.env.num_obs, hidden=cfg.critic_hidden, activation=cfg.activation)
        self.optimizer = self._new_optimizer(cfg.learning_rate)
        use_ema = cfg.policy == "flow" and cfg.ema_decay > 0
        self.ema = ActorEMA(self.actor, cfg.ema_decay, cfg.ema_warmup_updates) if use_ema else None
        self.reward_scaler = RewardScaler(cfg.num_envs, cfg.gamma)
        self.settings = cfg.update_settings()
        self.global_step = 0
        self.iteration = 0
        self.initial_distill_done = cfg.distill_initial_iterations == 0
        self.distill_env_steps = 0
        self.recent_returns: deque[float] = deque(maxlen=20)
        if self.resume_from is not None:
            self._load(self.resume_from)

    def _new_optimizer(self, lr: float) -> torch.optim.Optimizer:
        params = list(self.actor.parameters()) + list(self.critic.parameters())
        return torch.optim.AdamW(params, lr=lr, betas=tuple(self.cfg.adam_betas), eps=self.cfg.adam_eps,
                                 weight_decay=self.cfg.weight_decay)

    # ---- checkpoints -------------------------------------------------------------------------
    def weights(self) -> dict[str, Tensor]:
        out = {**{f"actor.{k}": v for k, v in self.actor.state_dict().items()},
               **{f"critic.{k}": v for k, v in self.critic.state_dict().items()}}
        if self.ema is not None:
            out.update({f"ema_actor.{k}": v for k, v in self.ema.shadow.state_dict().items()})
        return out

    def save(self) -> Path:
        bad = [k for k, v in self.weights().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:  # never write a diverged checkpoint; the earlier ones stay as they are
            raise TrainingDiverged(f"the policy diverged: non-finite weights {bad[:4]} at step {self.global_step} "
                                   f"(not checkpointed). {self._divergence_advice()}")
        state = {"optimizer": self.optimizer.state_dict(), "reward_scaler": self.reward_scaler.state_dict(),
                 "ema_updates": None if self.ema is None else self.ema.updates,
                 "ema_active": self.ema is not None and self.ema.active,
                 "rng": capture_rng_state({"train": self.generator}), "iteration": self.iteration,
                 "initial_distill_done": self.initial_distill_done, "recent_returns": list(self.recent_returns),
                 "distill_env_steps": self.distill_env_steps}
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
        if self.ema is not None and state.get("ema_updates") is not None:
            self.ema.load_state_dict({"updates": state["ema_updates"],
                                      "shadow": {k[10:]: v for k, v in weights.items() if k.startswith("ema_actor.")}})
        self.optimizer.load_state_dict(state["optimizer"])
        self.reward_scaler.load_state_dict(state["reward_scaler"])
        restore_rng_state(state["rng"], {"train": self.generator})
        self.global_step, self.iteration = int(meta["step"]), int(state["iteration"])
        self.initial_distill_done = bool(state["initial_distill_done"])
        self.distill_env_steps = int(state.get("distill_env_steps", 0))
        self.recent_returns.extend(state["recent_returns"])

    def _divergence_advice(self) -> str:
        latest = latest_checkpoint(Path(self.cfg.output_dir))
        where = (f"{latest.name} is intact: continue from it with --resume" if latest is not None
                 else "no checkpoint was written yet, so start again")
        return f"Lower --learning_rate (now {self.cfg.learning_rate:g}) or --max_grad_norm; {where}"

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
            if not bool(torch.isfinite(action).all()):  # the policy, not the environment, went wrong
                raise TrainingDiverged(f"the policy diverged: its actions are non-finite at step "
                                       f"{self.global_step + step * n} (before they reached the environment). "
                                       f"{self._divergence_advice()}")
            if cfg.policy == "gaussian":
                logp_t[step] = self.actor.log_prob(obs, action)
            elif cfg.action_noise_std > 0:  # FPO++: a little extra exploration, part of the stored action
                action = action + cfg.action_noise_std * torch.randn(action.shape, generator=self.generator)
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
            batch.elbo_old, batch.noise_pred_old = rollout_proxies(self.actor, batch.obs, batch.actions, batch.eps, batch.t)
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
        if self.ema is not None:
            self.ema.step()
        return info

    def distill(self, obs: Tensor, iterations: int, logger: MetricsLogger, kind: str) -> Tensor:
        """One self-distillation stage in the live environments (not counted in ``total_steps``)."""
        stage = SelfDistillation(self.actor, self.cfg.distill_settings(iterations), self.env.num_envs, self.generator)
        returns: list[float] = []

        def step(action_na: Tensor) -> Tensor:
            next_obs, reward, done, extras = self.env.step(self.actor.to_env_action(action_na))
            if self.cfg.normalize_rewards:  # keep the return statistics moving as the environments do
                self.reward_scaler(reward, done)
            self.critic.obs_norm.update(next_obs)  # the critic reads the same observations (FPO++: one normaliser)
            returns.extend(extras["episode_returns"].tolist())
            return next_obs

        obs = stage.run(obs, step)
        info = stage.finish()
        # Fresh RL optimizer at the current rate (Adam moments belong to the pre-distillation weights), EMA reset.
        self.optimizer = self._new_optimizer(self.optimizer.param_groups[0]["lr"])
        if self.ema is not None:
            self.ema.reset()
        self.distill_env_steps += int(info["env_steps"])
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
        bar = tqdm(total=cfg.total_steps, initial=self.global_step, disable=not cfg.progress_bar, unit="step",
                   desc=f"{cfg.policy} {cfg.env}", dynamic_ncols=True)
        try:
            if not self.initial_distill_done:
                obs = self.distill(obs, cfg.distill_initial_iterations, logger, "initial")
                self.initial_distill_done = True
            while self.global_step < cfg.total_steps:
                start, step_at_start = time.perf_counter(), self.global_step
                distill_s = 0.0
                if cfg.distill_every and self.iteration > 0 and self.iteration % cfg.distill_every == 0:
                    obs = self.distill(obs, cfg.distill_iterations, logger, "interleaved")
                    distill_s = time.perf_counter() - start
                t_rollout = time.perf_counter()
                obs, batch, stats = self.collect(obs)
                t_update = time.perf_counter()
                info = self.update(batch)
                now = time.perf_counter()
                self.global_step += len(batch)
                self.iteration += 1
                last = {"iteration": self.iteration, **stats, **info, "rollout_s": t_update - t_rollout,
                        "update_s": now - t_update, "distill_s": distill_s, "distill_env_steps": self.distill_env_steps,
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
