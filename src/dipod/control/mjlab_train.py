"""Train an mjlab task through rsl-rl from Python (stock PPO or ``FPOPlusPlus``), recording every iteration.

What ``mjlab``'s ``train`` script does for one process (registry task -> ``ManagerBasedRlEnv`` ->
``RslRlVecEnvWrapper`` -> the task's runner class -> ``learn``), without its command line, W&B or
timestamped directories, so that the smoke test (tests/test_control_mjlab.py) and the benchmark
(benchmarks/control_mjlab.py) run the same code. The device is the caller's: ``"cpu"`` works,
through MuJoCo Warp's CPU backend. Needs ``pip install -e ".[mjlab]"`` (docs/control_mjlab.md).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
import yaml

from dipod.control.rsl_rl_config import CLASS_NAME

REPO_CONFIGS = Path(__file__).resolve().parents[3] / "configs" / "control"


@dataclasses.dataclass
class IterationRecord:
    """One runner iteration. ``episode_return`` / ``episode_length``: mean over the runner's last 100 finished
    episodes (rsl-rl's ``Train/mean_reward`` / ``Train/mean_episode_length``; NaN before any episode ends);
    ``step_reward``: mean reward per environment step of this iteration's rollout (always defined)."""

    iteration: int
    step_reward: float
    episode_return: float
    episode_length: float
    collect_s: float
    learn_s: float
    losses: dict[str, float]


def released_fpo_agent_cfg(task_agent_cfg: dict[str, Any], released_yaml: str | Path, **overrides: Any) -> dict[str, Any]:
    """The task's rsl-rl runner config with its PPO swapped for ``FPOPlusPlus`` and a released FPO++ family's values
    (configs/control/rsl_rl_*.yaml: algorithm, rollout length, network widths); ``overrides`` go into the algorithm."""
    released = yaml.safe_load(Path(released_yaml).read_text())
    cfg = copy.deepcopy(task_agent_cfg)
    cfg["num_steps_per_env"] = released["num_steps_per_env"]
    cfg["algorithm"] = {**released["algorithm"], **overrides, "class_name": CLASS_NAME}
    for name in ("actor", "critic"):  # widths, activation, normalisation; the flow has no output distribution
        cfg[name] = {**cfg[name], **released[name], "distribution_cfg": None}
    return cfg


def task_agent_cfg(task: str) -> dict[str, Any]:
    """The registered rsl-rl runner config of an mjlab task, as the dict the runner receives."""
    import mjlab.tasks  # noqa: F401  (registers the stock tasks)
    from mjlab.tasks.registry import load_rl_cfg

    return dataclasses.asdict(load_rl_cfg(task))


def make_env(task: str, num_envs: int, seed: int, device: str = "cpu", motion_file: str | Path | None = None):
    """The task's environment, wrapped for rsl-rl (one env can serve several runners one after another)."""
    import mjlab.tasks  # noqa: F401  (registers the stock tasks)
    from mjlab.envs import ManagerBasedRlEnv
    from mjlab.rl import RslRlVecEnvWrapper
    from mjlab.tasks.registry import load_env_cfg

    env_cfg = load_env_cfg(task)
    env_cfg.scene.num_envs, env_cfg.seed = num_envs, seed
    if "motion" in env_cfg.commands:
        if motion_file is None or not Path(motion_file).is_file():
            raise FileNotFoundError(f"{task} needs a motion .npz (got {motion_file!r}); the synthetic one is "
                                    "tests/fixtures/g1_synthetic_motion.npz (docs/control_mjlab.md)")
        env_cfg.commands["motion"].motion_file = str(motion_file)
    torch.manual_seed(seed)
    return RslRlVecEnvWrapper(ManagerBasedRlEnv(cfg=env_cfg, device=device))


def make_runner(env, task: str, agent_cfg: dict[str, Any], seed: int, log_dir: str | Path | None, device: str = "cpu"):
    """The task's runner class on ``env``, as mjlab's ``train`` builds it (tensorboard instead of W&B, no upload)."""
    from mjlab.rl import MjlabOnPolicyRunner
    from mjlab.tasks.registry import load_runner_cls

    cfg = copy.deepcopy(agent_cfg)
    cfg.update(seed=seed, logger="tensorboard", upload_model=False)
    torch.manual_seed(seed)
    runner_cls = load_runner_cls(task) or MjlabOnPolicyRunner
    kwargs = {"registry_name": None} if "motion" in env.unwrapped.cfg.commands else {}
    return runner_cls(env, cfg, None if log_dir is None else str(log_dir), device, **kwargs)


def learn_recorded(runner, iterations: int) -> list[IterationRecord]:
    """``runner.learn(iterations, init_at_random_ep_len=True)`` (as mjlab's ``train``), keeping one record per
    iteration from the runner's own logger calls."""
    logger, records = runner.logger, []
    step_sum, step_count = [0.0], [0]
    process_env_step, log = logger.process_env_step, logger.log

    def counted_step(rewards, dones, extras, *args, **kwargs):
        step_sum[0] += float(rewards.float().sum())
        step_count[0] += rewards.numel()
        return process_env_step(rewards, dones, extras, *args, **kwargs)

    def recorded_log(*args, **kwargs):
        def mean(buffer) -> float:
            return sum(buffer) / len(buffer) if len(buffer) else math.nan

        records.append(IterationRecord(
            iteration=int(kwargs["it"]), step_reward=step_sum[0] / max(step_count[0], 1),
            episode_return=mean(logger.rewbuffer), episode_length=mean(logger.lenbuffer),
            collect_s=float(kwargs["collect_time"]), learn_s=float(kwargs["learn_time"]),
            losses={k: float(v) for k, v in kwargs["loss_dict"].items()}))
        step_sum[0], step_count[0] = 0.0, 0
        return log(*args, **kwargs)

    logger.process_env_step, logger.log = counted_step, recorded_log
    try:
        runner.learn(num_learning_iterations=iterations, init_at_random_ep_len=True)
    finally:
        logger.process_env_step, logger.log = process_env_step, log
    return records
