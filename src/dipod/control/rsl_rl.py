"""FPO++ (+ DiPOD, + self-distillation) as an rsl-rl-lib algorithm class, for GPU simulators.

mjlab and IsaacLab train through rsl-rl-lib's ``OnPolicyRunner``, which builds its algorithm from
``cfg["algorithm"]["class_name"]`` through the class's ``construct_algorithm(obs, env, cfg,
device)``. Naming ``"dipod.control.rsl_rl:FPOPlusPlus"`` there swaps rsl-rl's Gaussian PPO for a
flow-matching policy trained with FPO++; everything else (environment, runner, logging, save /
load, ONNX export) stays the user's. Recipe and config: docs/control_rsl_rl.md.

Nothing here re-implements the method: the actor, critic and CFM proxy come from
``dipod.control.flow``, the FPO++ update (+ DiPOD term) from ``dipod.control.update``, the
distillation steps from ``dipod.control.distill``, GAE from ``dipod.advantages``. This module
only maps rsl-rl's calls onto them:

- ``act`` samples from the flow (or, inside a distillation stage, from the frozen teacher) and
  stores the *normalised, unclipped* action in rsl-rl's ``RolloutStorage`` (the CFM proxy must
  score what was sampled); the environment gets ``action_bound * clip(a, -1, 1)``.
- ``process_env_step`` bootstraps time-outs (``r += gamma * V(s)``, as rsl-rl's PPO does).
- ``update`` draws the Monte-Carlo (eps, t) pairs once, scores them under the rollout policy
  (``ELBO_old``), runs ``fpo_plus_plus_update`` and logs the on-policy CFM loss of the fresh rollout
  before and after it; observation statistics are updated afterwards, so the ratio starts at 1.
- Self-distillation runs as ordinary runner iterations: the teacher acts in the live
  environments, and ``update`` trains only the actor on the CFM loss of the growing buffer of
  teacher (observation, action) pairs (critic and observation statistics untouched). Initial
  distillation (Algorithm 3) takes the first ``distill_initial_iterations`` iterations;
  interleaved distillation (Algorithm 1) takes ``distill_iterations`` iterations after every
  ``distill_every`` RL updates. At the end of a stage the RL optimizer's moments are reset.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from rsl_rl.env import VecEnv
from rsl_rl.storage import RolloutStorage
from rsl_rl.utils import resolve_obs_groups
from tensordict import TensorDict
from torch import Tensor, nn

from dipod.advantages import generalized_advantage_estimation
from dipod.config import ConfigError, config_from_dict, option
from dipod.control.distill import DistillSettings, action_mse, distill_updates
from dipod.control.flow import Critic, FlowActor
from dipod.control.update import RolloutBatch, UpdateSettings, fpo_plus_plus_update, mean_cfm_loss, rollout_elbo

CLASS_NAME = "dipod.control.rsl_rl:FPOPlusPlus"
LR_SCHEDULES = ("fixed", "adaptive")
# Keys of rsl-rl's PPO config (and of mjlab's / IsaacLab's PPO dataclasses) without a meaning for a
# flow policy: accepted so that a PPO config subclass works, ignored with one warning.
PPO_ONLY_KEYS = ("entropy_coef", "desired_kl", "normalize_advantage_per_mini_batch", "optimizer",
                 "use_mixed_precision", "share_cnn_encoders", "grad_reduce_bucket_mb")
UNSUPPORTED_EXTENSIONS = ("rnd_cfg", "symmetry_cfg")
MODEL_IGNORED_KEYS = ("activation", "distribution_cfg", "init_noise_std", "noise_std_type")
MODEL_UNSUPPORTED_KEYS = ("cnn_cfg", "rnn_type")


@dataclass
class FPOPlusPlusConfig:
    """``cfg["algorithm"]`` of ``FPOPlusPlus``. Defaults are FPO++'s published values.

    Keys shared with rsl-rl's PPO config keep PPO's names and meaning. Network widths and whether
    to normalise observations are read from ``cfg["actor"]`` / ``cfg["critic"]``
    (``hidden_dims``, ``obs_normalization``), like rsl-rl's own models.
    """

    num_learning_epochs: int = option("passes over each rollout (FPO++: 16)", default=16)
    num_mini_batches: int = option("minibatches per epoch", default=4)
    clip_param: float = option("per-draw trust region epsilon (FPO++: 0.05)", default=0.05)
    learning_rate: float = option("AdamW learning rate (FPO++: 1e-4)", default=1e-4)
    schedule: str = option(
        "'fixed' or 'adaptive' (flow policies have no KL: the rate follows the fraction of draws outside the trust region)",
        default="fixed",
    )
    target_clip_fraction: float = option("adaptive schedule: target clip fraction", default=0.2)
    gamma: float = option("discount", default=0.99)
    lam: float = option("GAE lambda", default=0.95)
    value_loss_coef: float = option("value-loss weight, as in rsl-rl's PPO", default=1.0)
    use_clipped_value_loss: bool = option("PPO-style clipped value loss", default=True)
    value_clip_param: float = option(
        "value clipping range (rsl-rl's PPO reuses clip_param; FPO++'s 0.05 is a per-draw ratio range, not a value range)",
        default=0.2,
    )
    max_grad_norm: float = option("global gradient-norm clip", default=1.0)
    weight_decay: float = option("AdamW weight decay of the RL optimizer", default=0.0)
    advantage_clip: float = option("clamp batch-normalised advantages to +-this (<= 0: off)", default=5.0)
    num_draws: int = option("Monte-Carlo (eps, t) draws per action (FPO++: 16)", default=16)
    sampling_steps: int = option("Euler steps of the flow sampler (FPO++: 64)", default=64)
    time_skew_b: float = option("b in t = 0.005 + 0.99 (1 - (1 - u)^(1/b)); 1 = uniform", default=1.0)
    time_embed_dim: int = option("sinusoidal flow-time features", default=16)
    action_bound: float = option(
        "environment action = action_bound * clip(a, -1, 1) for the flow's normalised action a",
        default=1.0,
    )
    log_ratio_max: float = option("per-draw log-ratio clamp (from above, straight-through)", default=3.0)
    cfm_clamp_negative: float = option("CFM-loss clamp on negative-advantage draws", default=5.0)
    dipod_beta: float = option("DiPOD per-update ELBO term weight (Algorithm 2); 0 = off", default=0.0)
    distill_initial_iterations: int = option(
        "initial self-distillation (Algorithm 3): the first K runner iterations; 0 = off",
        default=0,
    )
    distill_every: int = option("interleaved self-distillation after every n RL updates; 0 = off", default=0)
    distill_iterations: int = option("runner iterations of each interleaved stage", default=4)
    distill_updates: int = option("student AdamW steps per distillation iteration", default=32)
    distill_minibatch_size: int = option("distillation minibatch (obs, action) pairs", default=4096)
    distill_lr: float = option("distillation AdamW learning rate", default=3e-4)
    distill_weight_decay: float = option("distillation AdamW weight decay", default=1e-4)
    distill_max_grad_norm: float = option("distillation gradient-norm clip", default=1.0)

    def __post_init__(self) -> None:
        if self.schedule not in LR_SCHEDULES:
            raise ConfigError(f"schedule={self.schedule!r}; choose one of {LR_SCHEDULES}")
        for name in ("num_learning_epochs", "num_mini_batches", "num_draws", "sampling_steps", "distill_iterations",
                     "distill_updates", "distill_minibatch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("learning_rate", "time_skew_b", "action_bound", "max_grad_norm", "log_ratio_max",
                     "cfm_clamp_negative", "distill_lr", "distill_max_grad_norm", "value_loss_coef"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be > 0")
        for name in ("dipod_beta", "distill_initial_iterations", "distill_every", "weight_decay", "distill_weight_decay",
                     "value_clip_param"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 0 (0 turns it off)")
        if not 0 < self.clip_param < 1:
            raise ConfigError(f"clip_param={self.clip_param} must lie in (0, 1)")
        if not (0 < self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ConfigError(f"gamma={self.gamma} must lie in (0, 1] and lam={self.lam} in [0, 1]")
        if self.time_embed_dim < 2:
            raise ConfigError(f"time_embed_dim={self.time_embed_dim} must be >= 2")

    def update_settings(self) -> UpdateSettings:
        return UpdateSettings(
            epochs=self.num_learning_epochs, minibatches=self.num_mini_batches, clip_eps=self.clip_param,
            log_ratio_max=self.log_ratio_max, cfm_clamp_negative=self.cfm_clamp_negative, dipod_beta=self.dipod_beta,
            # update.py's value loss is value_coef * 0.5 * (...); rsl-rl's is value_loss_coef * (...).
            value_coef=2.0 * self.value_loss_coef, value_clip=self.value_clip_param if self.use_clipped_value_loss else 0.0,
            max_grad_norm=self.max_grad_norm, normalize_advantages=True, advantage_clip=self.advantage_clip,
            lr_schedule=self.schedule, target_clip_fraction=self.target_clip_fraction)

    def distill_settings(self) -> DistillSettings:
        return DistillSettings(
            iterations=self.distill_iterations, updates_per_iteration=self.distill_updates,
            minibatch_size=self.distill_minibatch_size, num_draws=self.num_draws, lr=self.distill_lr,
            weight_decay=self.distill_weight_decay, max_grad_norm=self.distill_max_grad_norm)


def parse_algorithm_config(alg_cfg: dict[str, Any]) -> FPOPlusPlusConfig:
    """``cfg["algorithm"]`` (minus ``class_name``) -> ``FPOPlusPlusConfig``; PPO-only keys are dropped with a warning."""
    values = {k: v for k, v in alg_cfg.items() if k not in ("class_name", "multi_gpu_cfg")}
    for key in UNSUPPORTED_EXTENSIONS:
        if values.pop(key, None) is not None:
            raise ConfigError(f"cfg['algorithm']['{key}'] is set, but FPOPlusPlus does not implement rsl-rl's "
                              f"{key[:-4]} extension; set it to None")
    ignored = sorted(key for key in PPO_ONLY_KEYS if key in values)
    for key in ignored:
        values.pop(key)
    if ignored:
        warnings.warn(f"FPOPlusPlus ignores the PPO-only keys {ignored} of cfg['algorithm'] "
                      "(a flow policy has no tractable entropy or KL)", stacklevel=3)
    return config_from_dict(FPOPlusPlusConfig, values, source="cfg['algorithm'] of FPOPlusPlus")


def _model_settings(cfg: dict[str, Any], name: str) -> tuple[list[int], bool]:
    """``(hidden_dims, obs_normalization)`` from ``cfg[name]`` (rsl-rl's model config), validated."""
    model_cfg = dict(cfg.get(name) or {})
    for key in MODEL_UNSUPPORTED_KEYS:
        if model_cfg.get(key) is not None:
            raise ConfigError(f"cfg['{name}']['{key}'] is set, but FPOPlusPlus builds MLP flow actors and critics only; "
                              "set it to None")
    ignored = sorted(key for key in MODEL_IGNORED_KEYS if model_cfg.get(key) is not None)
    if ignored:
        warnings.warn(f"FPOPlusPlus ignores cfg['{name}'] keys {ignored} (its MLPs use SiLU; the flow has no "
                      "output distribution)", stacklevel=3)
    hidden = list(model_cfg.get("hidden_dims", (256, 256)))
    if not hidden or min(hidden) < 1:
        raise ConfigError(f"cfg['{name}']['hidden_dims']={hidden} needs at least one positive layer width")
    return hidden, bool(model_cfg.get("obs_normalization", True))


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
    samples. ``output_std`` (logged by rsl-rl as ``Policy/mean_std``) is the per-dimension standard
    deviation, across environments, of the last batch of sampled normalised actions: a flow policy
    has no closed-form std.
    """

    is_recurrent = False

    def __init__(self, actor: FlowActor, obs_groups: list[str]):
        super().__init__()
        self.actor, self.obs_groups = actor, list(obs_groups)
        self.output_std = torch.ones(actor.action_dim)

    def forward(self, obs: TensorDict, stochastic_output: bool = False, generator: torch.Generator | None = None) -> Tensor:
        obs_nd = _select(obs, self.obs_groups)
        noise = None if stochastic_output else torch.zeros(obs_nd.shape[0], self.actor.action_dim, device=obs_nd.device)
        return self.actor.to_env_action(self.actor.sample(obs_nd, generator, noise_na=noise))

    def reset(self, dones: Tensor | None = None, hidden_state: Any = None) -> None:
        """Feed-forward policy: nothing to reset (rsl-rl's play scripts call this)."""

    def as_onnx(self, verbose: bool = False) -> nn.Module:
        return _DeterministicFlowPolicy(self.actor).cpu().eval()

    def as_jit(self) -> nn.Module:
        exported = _DeterministicFlowPolicy(self.actor).cpu().eval()
        return torch.jit.trace(exported, exported.get_dummy_inputs())


class FPOPlusPlus:
    """rsl-rl algorithm: flow-matching actor trained with FPO++ (+ DiPOD term, + self-distillation)."""

    def __init__(self, actor: FlowActor, critic: Critic, storage: RolloutStorage, obs_groups: dict[str, list[str]],
                 settings: FPOPlusPlusConfig, normalize_actor_obs: bool = True, normalize_critic_obs: bool = True,
                 device: str = "cpu", seed: int = 0):
        self.device, self.settings = device, settings
        self.actor, self.critic = actor.to(device), critic.to(device)
        self.policy = FlowPolicy(self.actor, obs_groups["actor"])
        self.critic_groups = list(obs_groups["critic"])
        self.normalize_actor_obs, self.normalize_critic_obs = normalize_actor_obs, normalize_critic_obs
        self.storage = storage
        self.transition = RolloutStorage.Transition()
        self.update_settings, self.distill_cfg = settings.update_settings(), settings.distill_settings()
        self.optimizer = torch.optim.AdamW(list(self.actor.parameters()) + list(self.critic.parameters()),
                                           lr=settings.learning_rate, eps=1e-5, weight_decay=settings.weight_decay)
        self.learning_rate = settings.learning_rate
        # Sampling and Monte-Carlo draws on the device; minibatch shuffling (update.py) on the CPU.
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.shuffle_generator = torch.Generator().manual_seed(seed + 1)
        self.rl_updates = 0
        self.distill_left = settings.distill_initial_iterations
        self.distill_kind = "initial" if self.distill_left else ""
        self.teacher: FlowActor | None = None
        self.distill_optimizer: torch.optim.Optimizer | None = None
        self.buffer_obs: list[Tensor] = []
        self.buffer_actions: list[Tensor] = []

    # ---- construction (the rsl-rl contract) ----------------------------------------------------
    @staticmethod
    def construct_algorithm(obs: TensorDict, env: VecEnv, cfg: dict, device: str) -> FPOPlusPlus:
        if cfg.get("multi_gpu") is not None:
            raise ConfigError("FPOPlusPlus runs on one device; multi-GPU training (WORLD_SIZE > 1) is not supported")
        settings = parse_algorithm_config(cfg["algorithm"])
        cfg["obs_groups"] = resolve_obs_groups(obs, cfg.get("obs_groups", {}), ["actor", "critic"])
        for name in ("actor", "critic"):
            bad = [group for group in cfg["obs_groups"][name] if obs[group].dim() != 2]
            if bad:
                raise ConfigError(f"observation groups {bad} of the {name} are not flat [num_envs, dim] tensors; "
                                  "FPOPlusPlus uses MLPs (flatten them in the environment or leave them out of obs_groups)")
        actor_hidden, normalize_actor = _model_settings(cfg, "actor")
        critic_hidden, normalize_critic = _model_settings(cfg, "critic")
        bound = settings.action_bound
        actor = FlowActor(_select(obs, cfg["obs_groups"]["actor"]).shape[-1], env.num_actions,
                          [-bound] * env.num_actions, [bound] * env.num_actions, hidden=actor_hidden,
                          time_embed_dim=settings.time_embed_dim, sampling_steps=settings.sampling_steps,
                          time_skew_b=settings.time_skew_b)
        critic = Critic(_select(obs, cfg["obs_groups"]["critic"]).shape[-1], hidden=critic_hidden)
        storage = RolloutStorage("rl", env.num_envs, cfg["num_steps_per_env"], obs, [env.num_actions], device)
        if env.num_envs * cfg["num_steps_per_env"] < settings.num_mini_batches:
            raise ConfigError(f"num_envs * num_steps_per_env = {env.num_envs * cfg['num_steps_per_env']} samples cannot "
                              f"fill num_mini_batches={settings.num_mini_batches}")
        if cfg.get("torch_compile_mode") is not None:
            warnings.warn("FPOPlusPlus ignores torch_compile_mode", stacklevel=2)
        return FPOPlusPlus(actor, critic, storage, cfg["obs_groups"], settings, normalize_actor, normalize_critic,
                           device=device, seed=int(cfg.get("seed", 0)))

    # ---- rollout -----------------------------------------------------------------------------
    @property
    def distilling(self) -> bool:
        return self.distill_left > 0

    def act(self, obs: TensorDict) -> Tensor:
        if self.distilling and self.teacher is None:
            with torch.inference_mode(False):  # the runner rolls out under inference mode; the copy must not be
                self.teacher = copy.deepcopy(self.actor).requires_grad_(False)
        sampler = self.teacher if self.distilling else self.actor
        actions_na = sampler.sample(_select(obs, self.policy.obs_groups), self.generator)
        if actions_na.shape[0] > 1:
            self.policy.output_std = actions_na.std(0)
        t = self.transition
        t.observations, t.actions = obs, actions_na
        t.values = self.critic(_select(obs, self.critic_groups))[:, None]
        t.actions_log_prob = torch.zeros(actions_na.shape[0], device=self.device)  # no tractable log-prob; unused
        t.distribution_params = ()
        return sampler.to_env_action(actions_na)

    def process_env_step(self, obs: TensorDict, rewards: Tensor, dones: Tensor, extras: dict) -> None:
        t = self.transition
        t.rewards, t.dones = rewards.float().clone(), dones
        if "time_outs" in extras:  # the episode was cut, not ended: bootstrap the value of the state it stopped in
            t.rewards += self.settings.gamma * t.values[:, 0] * extras["time_outs"].to(self.device).float()
        self.storage.add_transition(t)
        t.clear()

    def compute_returns(self, obs: TensorDict) -> None:
        if self.distilling:  # the critic is untouched during distillation
            return
        st = self.storage
        advantages, returns = generalized_advantage_estimation(
            st.rewards[..., 0], st.values[..., 0], st.dones[..., 0], self.critic(_select(obs, self.critic_groups)),
            self.settings.gamma, self.settings.lam)
        st.advantages.copy_(advantages[..., None])
        st.returns.copy_(returns[..., None])

    # ---- updates -----------------------------------------------------------------------------
    def update(self) -> dict[str, float]:
        stage = "distillation" if self.distilling else "FPO++"
        info = self._distill_iteration() if self.distilling else self._rl_update()
        self.storage.clear()
        bad = [name for module in ("actor", "critic") for name, p in getattr(self, module).named_parameters(prefix=module)
               if not bool(torch.isfinite(p).all())]
        if bad:  # stop before the runner saves the diverged weights; its earlier model_*.pt files stay as they are
            raise FloatingPointError(f"FPOPlusPlus: non-finite weights {bad[:4]} after the {stage} update "
                                     f"(metrics {info}); lower learning_rate / distill_lr or resume from an earlier checkpoint")
        return info

    def _flat_rollout(self) -> tuple[Tensor, Tensor, Tensor]:
        st = self.storage
        obs = st.observations.flatten(0, 1)
        return _select(obs, self.policy.obs_groups), _select(obs, self.critic_groups), st.actions.flatten(0, 1)

    def _rl_update(self) -> dict[str, float]:
        st = self.storage
        actor_obs, critic_obs, actions = self._flat_rollout()
        eps, t = self.actor.draw_noise(actions.shape[0], self.settings.num_draws, self.generator, device=self.device)
        batch = RolloutBatch(obs=actor_obs, critic_obs=critic_obs, actions=actions,
                             advantages=st.advantages.flatten(), returns=st.returns.flatten(), values=st.values.flatten(),
                             eps=eps, t=t, elbo_old=rollout_elbo(self.actor, actor_obs, actions, eps, t))
        info = {"cfm_loss_before": float(-batch.elbo_old.mean())}
        info.update(fpo_plus_plus_update(self.actor, self.critic, self.optimizer, batch, self.update_settings,
                                         self.shuffle_generator))
        info["cfm_loss_after"] = mean_cfm_loss(self.actor, actor_obs, actions, eps, t)
        self.learning_rate = self.optimizer.param_groups[0]["lr"]
        if self.normalize_actor_obs:
            self.actor.obs_norm.update(actor_obs)
        if self.normalize_critic_obs:
            self.critic.obs_norm.update(critic_obs)
        self.rl_updates += 1
        if self.settings.distill_every and self.rl_updates % self.settings.distill_every == 0:
            self.distill_left, self.distill_kind = self.settings.distill_iterations, "interleaved"
        return info

    def _distill_iteration(self) -> dict[str, float]:
        actor_obs, _, actions = self._flat_rollout()
        self.buffer_obs.append(actor_obs.clone())
        self.buffer_actions.append(actions.clone())
        buffer_obs, buffer_actions = torch.cat(self.buffer_obs), torch.cat(self.buffer_actions)
        if self.distill_optimizer is None:
            self.distill_optimizer = torch.optim.AdamW(self.actor.parameters(), lr=self.distill_cfg.lr,
                                                       weight_decay=self.distill_cfg.weight_decay)
        info = {"distill_loss": distill_updates(self.actor, self.distill_optimizer, buffer_obs, buffer_actions,
                                                self.distill_cfg, self.generator),
                "distill_buffer": float(buffer_obs.shape[0])}
        self.distill_left -= 1
        if self.distill_left == 0:
            info.update(self._finish_distillation(buffer_obs, buffer_actions))
        return info

    def _finish_distillation(self, buffer_obs: Tensor, buffer_actions: Tensor) -> dict[str, float]:
        """Tightness before / after on the whole buffer (one fixed set of draws), student-teacher MSE, optimizer reset."""
        eps, t = self.actor.draw_noise(buffer_obs.shape[0], self.settings.num_draws, self.generator, device=self.device)
        info = {"distill_cfm_loss_before": mean_cfm_loss(self.teacher, buffer_obs, buffer_actions, eps, t),
                "distill_cfm_loss_after": mean_cfm_loss(self.actor, buffer_obs, buffer_actions, eps, t),
                "distill_action_mse": action_mse(self.actor, self.teacher, buffer_obs[:4096], self.generator),
                f"distill_{self.distill_kind}_done": 1.0}
        self.optimizer.state.clear()  # Adam moments belong to the pre-distillation parameters
        self.teacher, self.distill_optimizer, self.distill_kind = None, None, ""
        self.buffer_obs, self.buffer_actions = [], []
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
        state = {"rl_updates": self.rl_updates, "distill_left": self.distill_left, "distill_kind": self.distill_kind,
                 "generator": self.generator.get_state(), "shuffle_generator": self.shuffle_generator.get_state(),
                 "teacher_state_dict": None if self.teacher is None else self.teacher.state_dict(),
                 "settings": dataclasses.asdict(self.settings)}
        return {"actor_state_dict": self.actor.state_dict(), "critic_state_dict": self.critic.state_dict(),
                "optimizer_state_dict": self.optimizer.state_dict(), "fpo_plus_plus_state": state}

    def load(self, loaded_dict: dict, load_cfg: dict | None, strict: bool) -> bool:
        """Load what ``load_cfg`` names (default: everything); a checkpoint saved inside a distillation stage
        resumes it with the saved teacher but a fresh buffer and distillation optimizer."""
        load_cfg = load_cfg if load_cfg is not None else {"actor": True, "critic": True, "optimizer": True, "iteration": True}
        if "actor_state_dict" not in loaded_dict or "fpo_plus_plus_state" not in loaded_dict:
            raise ValueError("this checkpoint was not written by dipod.control.rsl_rl:FPOPlusPlus (no flow actor state); "
                             "load it with the algorithm that wrote it")
        if load_cfg.get("actor"):
            self.actor.load_state_dict(loaded_dict["actor_state_dict"], strict=strict)
        if load_cfg.get("critic"):
            self.critic.load_state_dict(loaded_dict["critic_state_dict"], strict=strict)
        if load_cfg.get("optimizer"):
            self.optimizer.load_state_dict(loaded_dict["optimizer_state_dict"])
            self.learning_rate = self.optimizer.param_groups[0]["lr"]
        if load_cfg.get("iteration"):
            state = loaded_dict["fpo_plus_plus_state"]
            self.rl_updates, self.distill_left = int(state["rl_updates"]), int(state["distill_left"])
            self.distill_kind = state["distill_kind"]
            self.generator.set_state(state["generator"])
            self.shuffle_generator.set_state(state["shuffle_generator"])
            self.teacher = None
            if state["teacher_state_dict"] is not None:
                self.teacher = copy.deepcopy(self.actor).requires_grad_(False)
                self.teacher.load_state_dict(state["teacher_state_dict"])
            self.distill_optimizer, self.buffer_obs, self.buffer_actions = None, [], []
        return bool(load_cfg.get("iteration", False))
