"""FPO++ (+ DiPOD, + self-distillation) as an rsl-rl-lib algorithm class, for GPU simulators.

mjlab and IsaacLab train through rsl-rl-lib's ``OnPolicyRunner``, which builds its algorithm from
``cfg["algorithm"]["class_name"]`` through the class's ``construct_algorithm(obs, env, cfg,
device)``. Naming ``"dipod.control.rsl_rl:FPOPlusPlus"`` there swaps rsl-rl's Gaussian PPO for a
flow-matching policy trained with FPO++; everything else (environment, runner, logging, save /
load, ONNX export) stays the user's. Recipe and the released task-family configs:
docs/control_rsl_rl.md, configs/control/.

Nothing here re-implements the method: the actor, critic and CFM proxy come from
``dipod.control.flow``, the FPO++ update (+ DiPOD term) from ``dipod.control.update``, the
self-distillation stage from ``dipod.control.distill`` (the same object ``dipod control train``
uses), the EMA from ``dipod.control.ema``, GAE from ``dipod.advantages``. This module only maps
rsl-rl's calls onto them:

- ``act`` samples from the flow, adds ``action_noise_std`` Gaussian noise (FPO++) and stores the
  *normalised, unclipped* action in rsl-rl's ``RolloutStorage`` (the CFM proxy must score what was
  sampled); the environment gets ``action_bound * clip(a, -1, 1)``.
- ``process_env_step`` bootstraps time-outs (``r += gamma * V(s)``, as rsl-rl's PPO does).
- ``update`` draws the Monte-Carlo (eps, t) pairs once, scores them under the rollout policy,
  runs ``fpo_plus_plus_update``, logs the on-policy CFM loss before and after it and steps the
  actor EMA; observation statistics are updated afterwards, so the ratio starts at 1.
- Self-distillation runs inside ``act`` as one whole stage with its own rollout length
  (``distill_rollout_steps``, published 8, apart from ``num_steps_per_env``), stepping the
  environment it was constructed with: Algorithm 3 at the first ``act`` of a fresh run
  (``distill_initial_iterations``), Algorithm 1 at the first ``act`` after every ``distill_every``
  RL updates. Its environment steps are not runner iterations (the RL budget is unchanged); the RL
  optimizer and the EMA are re-created afterwards, and the stage's metrics arrive with the next
  ``update``'s loss dict (``distill_*``). The runner's episode statistics do not see those steps.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Any

import torch
from rsl_rl.env import VecEnv
from rsl_rl.storage import RolloutStorage
from rsl_rl.utils import resolve_obs_groups
from tensordict import TensorDict
from torch import Tensor, nn

from dipod.advantages import generalized_advantage_estimation
from dipod.config import ConfigError
from dipod.control.distill import SelfDistillation
from dipod.control.ema import ActorEMA
from dipod.control.flow import Critic, FlowActor
from dipod.control.rsl_rl_config import (CLASS_NAME, UNSUPPORTED_EXTENSIONS, FPOPlusPlusConfig, model_settings,
                                        parse_algorithm_config)
from dipod.control.update import RolloutBatch, fpo_plus_plus_update, mean_cfm_loss, rollout_proxies

__all__ = ["CLASS_NAME", "FPOPlusPlus", "FPOPlusPlusConfig", "FlowPolicy", "parse_algorithm_config"]

def _select(obs: TensorDict, groups: list[str]) -> Tensor:
    return torch.cat([obs[group] for group in groups], dim=-1).float()


class _DeterministicFlowPolicy(nn.Module):
    """Export form: observation tensor ``[N, D]`` -> environment action, from zero noise (FPO++'s zero-sampling)."""

    def __init__(self, actor: FlowActor):
        super().__init__()
        self.actor = copy.deepcopy(actor)
        self.input_size = actor.obs_dim
        self.input_names, self.output_names = ["obs"], ["actions"]

    def forward(self, obs: Tensor) -> Tensor:
        noise = torch.zeros(obs.shape[0], self.actor.action_dim, dtype=obs.dtype, device=obs.device)
        return self.actor.to_env_action(self.actor.sample(obs, noise_na=noise))

    def get_dummy_inputs(self) -> tuple[Tensor]:
        return (torch.zeros(1, self.input_size),)


class FlowPolicy(nn.Module):
    """The policy rsl-rl sees (``get_policy`` / ``get_inference_policy``): observations -> environment actions.

    By default deterministic (Euler from zero noise, FPO++'s evaluation); ``stochastic_output=True``
    samples. Once the actor EMA is active, inference and export use the averaged actor (what FPO++
    saves and evaluates). ``output_std`` (logged by rsl-rl as ``Policy/mean_std``) is the per-dimension standard
    deviation, across environments, of the last batch of sampled normalised actions: a flow policy
    has no closed-form std.
    """

    is_recurrent = False

    def __init__(self, actor: FlowActor, obs_groups: list[str], ema: ActorEMA | None = None):
        super().__init__()
        self.actor, self.obs_groups, self.ema = actor, list(obs_groups), ema
        self.output_std = torch.ones(actor.action_dim)

    @property
    def inference_actor(self) -> FlowActor:
        return self.ema.shadow if self.ema is not None and self.ema.active else self.actor

    def forward(self, obs: TensorDict, stochastic_output: bool = False, generator: torch.Generator | None = None) -> Tensor:
        obs_nd, actor = _select(obs, self.obs_groups), self.inference_actor
        noise = None if stochastic_output else torch.zeros(obs_nd.shape[0], actor.action_dim, device=obs_nd.device)
        return actor.to_env_action(actor.sample(obs_nd, generator, noise_na=noise))

    def reset(self, dones: Tensor | None = None, hidden_state: Any = None) -> None:
        """Feed-forward policy: nothing to reset (rsl-rl's play scripts call this)."""

    def as_onnx(self, verbose: bool = False) -> nn.Module:
        return _DeterministicFlowPolicy(self.inference_actor).cpu().eval()

    def as_jit(self) -> nn.Module:
        exported = _DeterministicFlowPolicy(self.inference_actor).cpu().eval()
        return torch.jit.trace(exported, exported.get_dummy_inputs())


class FPOPlusPlus:
    """rsl-rl algorithm: flow-matching actor trained with FPO++ (+ DiPOD term, + self-distillation)."""

    def __init__(self, actor: FlowActor, critic: Critic, storage: RolloutStorage, obs_groups: dict[str, list[str]],
                 settings: FPOPlusPlusConfig, env: VecEnv | None = None, normalize_actor_obs: bool = True,
                 normalize_critic_obs: bool = True, device: str = "cpu", seed: int = 0):
        self.device, self.settings, self.env = device, settings, env
        self.actor, self.critic = actor.to(device), critic.to(device)
        self.ema = ActorEMA(self.actor, settings.ema_decay, settings.ema_warmup_updates) if settings.ema_decay > 0 else None
        self.policy = FlowPolicy(self.actor, obs_groups["actor"], self.ema)
        self.critic_groups = list(obs_groups["critic"])
        self.normalize_actor_obs, self.normalize_critic_obs = normalize_actor_obs, normalize_critic_obs
        self.storage = storage
        self.transition = RolloutStorage.Transition()
        self.update_settings = settings.update_settings()
        self.learning_rate = settings.learning_rate
        self.optimizer = self._new_optimizer()
        # Sampling and Monte-Carlo draws on the device; minibatch shuffling (update.py) on the CPU.
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.shuffle_generator = torch.Generator().manual_seed(seed + 1)
        self.rl_updates = 0
        self.pending_stage = "initial" if settings.distill_initial_iterations else ""
        self.stage_info: dict[str, float] = {}
        self.distill_teacher: FlowActor | None = None  # None: self-distillation; set it to distil another flow policy

    def _new_optimizer(self) -> torch.optim.Optimizer:
        with torch.inference_mode(False):
            return torch.optim.AdamW(list(self.actor.parameters()) + list(self.critic.parameters()),
                                     lr=self.learning_rate, betas=tuple(self.settings.adam_betas),
                                     eps=self.settings.adam_eps, weight_decay=self.settings.weight_decay)

    # ---- construction (the rsl-rl contract) ----------------------------------------------------
    @staticmethod
    def construct_algorithm(obs: TensorDict, env: VecEnv, cfg: dict, device: str) -> FPOPlusPlus:
        if cfg.get("multi_gpu") is not None:
            raise ConfigError("FPOPlusPlus runs on one device; multi-GPU training (WORLD_SIZE > 1) is not supported")
        settings = parse_algorithm_config(cfg["algorithm"])
        # rsl-rl-lib 5.4's runner and logger read these keys unconditionally (``cfg["algorithm"]["rnd_cfg"]``);
        # its PPO fills them in while being constructed, so the replacement must too (None: extension off).
        for key in UNSUPPORTED_EXTENSIONS:
            cfg["algorithm"][key] = None
        cfg["obs_groups"] = resolve_obs_groups(obs, cfg.get("obs_groups", {}), ["actor", "critic"])
        for name in ("actor", "critic"):
            bad = [group for group in cfg["obs_groups"][name] if obs[group].dim() != 2]
            if bad:
                raise ConfigError(f"observation groups {bad} of the {name} are not flat [num_envs, dim] tensors; "
                                  "FPOPlusPlus uses MLPs (flatten them in the environment or leave them out of obs_groups)")
        actor_hidden, actor_activation, normalize_actor = model_settings(cfg, "actor")
        critic_hidden, critic_activation, normalize_critic = model_settings(cfg, "critic")
        bound = settings.action_bound
        actor = FlowActor(_select(obs, cfg["obs_groups"]["actor"]).shape[-1], env.num_actions,
                          [-bound] * env.num_actions, [bound] * env.num_actions, hidden=actor_hidden,
                          time_embed_dim=settings.time_embed_dim, sampling_steps=settings.sampling_steps,
                          time_skew_b=settings.time_skew_b, activation=actor_activation,
                          cfm_reduction=settings.cfm_reduction)
        critic = Critic(_select(obs, cfg["obs_groups"]["critic"]).shape[-1], hidden=critic_hidden,
                        activation=critic_activation)
        storage = RolloutStorage("rl", env.num_envs, cfg["num_steps_per_env"], obs, [env.num_actions], device)
        if env.num_envs * cfg["num_steps_per_env"] < settings.num_mini_batches:
            raise ConfigError(f"num_envs * num_steps_per_env = {env.num_envs * cfg['num_steps_per_env']} samples cannot "
                              f"fill num_mini_batches={settings.num_mini_batches}")
        if cfg.get("torch_compile_mode") is not None:
            warnings.warn("FPOPlusPlus ignores torch_compile_mode", stacklevel=2)
        return FPOPlusPlus(actor, critic, storage, cfg["obs_groups"], settings, env, normalize_actor, normalize_critic,
                           device=device, seed=int(cfg.get("seed", 0)))

    # ---- rollout -----------------------------------------------------------------------------
    def act(self, obs: TensorDict) -> Tensor:
        if self.pending_stage:  # a whole distillation stage first; then act on where the environments are now
            obs = self._run_stage(self.pending_stage)
        obs_nd = _select(obs, self.policy.obs_groups)
        actions_na = self.actor.sample(obs_nd, self.generator)
        if self.settings.action_noise_std > 0:  # FPO++: part of the stored and executed action
            actions_na = actions_na + self.settings.action_noise_std * torch.randn(
                actions_na.shape, generator=self.generator, device=actions_na.device)
        if actions_na.shape[0] > 1:
            self.policy.output_std = actions_na.std(0)
        t = self.transition
        t.observations, t.actions = obs, actions_na
        t.values = self.critic(_select(obs, self.critic_groups))[:, None]
        t.actions_log_prob = torch.zeros(actions_na.shape[0], device=self.device)  # no tractable log-prob; unused
        t.distribution_params = ()
        return self.actor.to_env_action(actions_na)

    def _run_stage(self, kind: str) -> TensorDict:
        """One self-distillation stage in ``self.env`` with its own rollout length; returns the current observations."""
        if self.env is None:
            raise RuntimeError("self-distillation needs the environment: build FPOPlusPlus through construct_algorithm")
        iterations = self.settings.distill_initial_iterations if kind == "initial" else self.settings.distill_iterations
        stage = SelfDistillation(self.actor, self.settings.distill_settings(iterations), self.env.num_envs,
                                 self.generator, teacher=self.distill_teacher, update_norm=self.normalize_actor_obs)
        current = self.env.get_observations().to(self.device)

        def step(action_na: Tensor) -> Tensor:
            nonlocal current
            current, _, _, _ = self.env.step(self.actor.to_env_action(action_na).to(self.env.device))
            current = current.to(self.device)
            if self.normalize_critic_obs:  # statistics keep moving with what the environments show
                self.critic.obs_norm.update(_select(current, self.critic_groups))
            return _select(current, self.policy.obs_groups)

        stage.run(_select(current, self.policy.obs_groups), step)
        self.stage_info = {f"distill_{key}": value for key, value in stage.finish().items()}
        self.stage_info[f"distill_{kind}_done"] = 1.0
        self.optimizer = self._new_optimizer()  # Adam moments belong to the pre-distillation weights
        if self.ema is not None:
            self.ema.reset()
        self.pending_stage = ""
        return current

    def process_env_step(self, obs: TensorDict, rewards: Tensor, dones: Tensor, extras: dict) -> None:
        t = self.transition
        t.rewards, t.dones = rewards.float().clone(), dones
        if "time_outs" in extras:  # the episode was cut, not ended: bootstrap the value of the state it stopped in
            t.rewards += self.settings.gamma * t.values[:, 0] * extras["time_outs"].to(self.device).float()
        self.storage.add_transition(t)
        t.clear()

    def compute_returns(self, obs: TensorDict) -> None:
        st = self.storage
        advantages, returns = generalized_advantage_estimation(
            st.rewards[..., 0], st.values[..., 0], st.dones[..., 0], self.critic(_select(obs, self.critic_groups)),
            self.settings.gamma, self.settings.lam)
        st.advantages.copy_(advantages[..., None])
        st.returns.copy_(returns[..., None])

    # ---- updates -----------------------------------------------------------------------------
    def update(self) -> dict[str, float]:
        st = self.storage
        obs = st.observations.flatten(0, 1)
        actor_obs, critic_obs, actions = _select(obs, self.policy.obs_groups), _select(obs, self.critic_groups), \
            st.actions.flatten(0, 1)
        eps, t = self.actor.draw_noise(actions.shape[0], self.settings.num_draws, self.generator, device=self.device)
        elbo_old, noise_pred_old = rollout_proxies(self.actor, actor_obs, actions, eps, t)
        batch = RolloutBatch(obs=actor_obs, critic_obs=critic_obs, actions=actions, advantages=st.advantages.flatten(),
                             returns=st.returns.flatten(), values=st.values.flatten(), eps=eps, t=t, elbo_old=elbo_old,
                             noise_pred_old=noise_pred_old)
        info = {"cfm_loss_before": float(-elbo_old.mean()), **self.stage_info}
        self.stage_info = {}
        info.update(fpo_plus_plus_update(self.actor, self.critic, self.optimizer, batch, self.update_settings,
                                         self.shuffle_generator))
        info["cfm_loss_after"] = mean_cfm_loss(self.actor, actor_obs, actions, eps, t)
        self.learning_rate = self.optimizer.param_groups[0]["lr"]
        if self.normalize_actor_obs:
            self.actor.obs_norm.update(actor_obs)
        if self.normalize_critic_obs:
            self.critic.obs_norm.update(critic_obs)
        if self.ema is not None:
            self.ema.step()
        self.rl_updates += 1
        if self.settings.distill_every and self.rl_updates % self.settings.distill_every == 0:
            self.pending_stage = "interleaved"
        self.storage.clear()
        bad = [name for module in ("actor", "critic") for name, p in getattr(self, module).named_parameters(prefix=module)
               if not bool(torch.isfinite(p).all())]
        if bad:  # stop before the runner saves the diverged weights; its earlier model_*.pt files stay as they are
            raise FloatingPointError(f"FPOPlusPlus: non-finite weights {bad[:4]} after the update "
                                     f"(metrics {info}); lower learning_rate or resume from an earlier checkpoint")
        return info

    # ---- modes, save / load (the rsl-rl contract) -----------------------------------------------
    def train_mode(self) -> None:
        self.actor.train()
        self.critic.train()

    def eval_mode(self) -> None:
        self.actor.eval()
        self.critic.eval()

    def get_policy(self) -> FlowPolicy:
        return self.policy

    def broadcast_parameters(self) -> None:
        raise RuntimeError("FPOPlusPlus runs on one device; multi-GPU training is not supported")

    def save(self) -> dict[str, Any]:
        state = {"rl_updates": self.rl_updates, "pending_stage": self.pending_stage,
                 "generator": self.generator.get_state(), "shuffle_generator": self.shuffle_generator.get_state(),
                 "ema": None if self.ema is None else self.ema.state_dict(),
                 "settings": dataclasses.asdict(self.settings)}
        return {"actor_state_dict": self.actor.state_dict(), "critic_state_dict": self.critic.state_dict(),
                "optimizer_state_dict": self.optimizer.state_dict(), "fpo_plus_plus_state": state}

    def load(self, loaded_dict: dict, load_cfg: dict | None, strict: bool) -> bool:
        """Load what ``load_cfg`` names (default: everything). A fresh run that loads weights (no ``iteration``)
        keeps its own pending initial distillation; a resumed one continues where it stopped."""
        load_cfg = load_cfg if load_cfg is not None else {"actor": True, "critic": True, "optimizer": True, "iteration": True}
        if "actor_state_dict" not in loaded_dict or "fpo_plus_plus_state" not in loaded_dict:
            raise ValueError("this checkpoint was not written by dipod.control.rsl_rl:FPOPlusPlus (no flow actor state); "
                             "load it with the algorithm that wrote it")
        state = loaded_dict["fpo_plus_plus_state"]
        if load_cfg.get("actor"):
            self.actor.load_state_dict(loaded_dict["actor_state_dict"], strict=strict)
            if self.ema is not None and state.get("ema") is not None:
                self.ema.load_state_dict(state["ema"])
        if load_cfg.get("critic"):
            self.critic.load_state_dict(loaded_dict["critic_state_dict"], strict=strict)
        if load_cfg.get("optimizer"):
            self.optimizer.load_state_dict(loaded_dict["optimizer_state_dict"])
            self.learning_rate = self.optimizer.param_groups[0]["lr"]
        if load_cfg.get("iteration"):
            self.rl_updates, self.pending_stage = int(state["rl_updates"]), state["pending_stage"]
            self.generator.set_state(state["generator"])
            self.shuffle_generator.set_state(state["shuffle_generator"])
        return bool(load_cfg.get("iteration", False))
