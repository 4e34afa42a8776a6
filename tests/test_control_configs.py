"""configs/control/: the released FPO++ task families, checked against the values of the released code
(Astro-Eric/DiPOD-release fpo-control: isaaclab_fpo/rl_cfg.py defaults + task_cfgs.py overrides)."""

from pathlib import Path

import pytest
import yaml

from dipod.config import parse_config
from dipod.control.config import ControlConfig
from dipod.control.distill import DistillSettings

pytest.importorskip("rsl_rl")
from dipod.control.rsl_rl import FPOPlusPlusConfig, parse_algorithm_config  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "control"

# Released values, written out by hand from the released configs (ours -> value).
TRACKING = dict(num_learning_epochs=16, num_mini_batches=6, clip_param=0.01, learning_rate=1e-4, schedule="adaptive",
                desired_kl=1e-4, value_loss_coef=1.0, use_clipped_value_loss=False, max_grad_norm=1.0,
                weight_decay=1e-4, adam_betas=[0.9, 0.95], num_draws=16, sampling_steps=64, time_embed_dim=8,
                cfm_reduction="mean", action_noise_std=0.02, log_ratio_max=3.0, cfm_clamp=0.0, cfm_clamp_negative=20.0,
                knn_entropy_coef=1e-5, knn_entropy_k=5, advantage_clip=100.0, ema_decay=0.95, ema_warmup_updates=500)
LOCOMOTION = dict(num_learning_epochs=32, num_mini_batches=4, clip_param=0.05, learning_rate=1e-4, schedule="fixed",
                  value_loss_coef=1.0, use_clipped_value_loss=False, max_grad_norm=1.0, weight_decay=1e-4,
                  adam_betas=[0.9, 0.999], num_draws=32, sampling_steps=64, time_embed_dim=8, cfm_reduction="sqrt",
                  action_noise_std=0.02, log_ratio_max=10.0, cfm_clamp=20.0, cfm_clamp_negative=20.0,
                  knn_entropy_coef=0.0, advantage_clip=100.0, ema_decay=0.95, ema_warmup_updates=500)
# rsl-rl names -> `dipod control train` names where they differ.
CLI_NAMES = {"num_learning_epochs": "epochs", "num_mini_batches": "minibatches", "clip_param": "clip_eps",
             "value_loss_coef": "value_coef", "schedule": "lr_schedule"}


@pytest.mark.parametrize("name, released, steps, actor, critic", [
    ("g1_tracking", TRACKING, 48, [1024, 512, 256], [1024, 512, 256]),
    ("locomotion", LOCOMOTION, 24, [256, 256, 256], [768, 768, 768]),
])
def test_released_task_families(name, released, steps, actor, critic):
    cfg = yaml.safe_load((CONFIGS / f"rsl_rl_{name}.yaml").read_text())
    alg = parse_algorithm_config(cfg["algorithm"])
    for key, value in released.items():
        assert getattr(alg, key) == pytest.approx(value), key
    assert cfg["num_steps_per_env"] == steps
    assert (cfg["actor"]["hidden_dims"], cfg["critic"]["hidden_dims"]) == (actor, critic)
    assert cfg["actor"]["activation"] == cfg["critic"]["activation"] == "elu"
    # Algorithm 3 as published: 100 x (8 rollout steps, one step on min(16384, buffer)), lr 3e-4, wd 1e-4
    stage = alg.distill_settings(100)
    assert stage == DistillSettings(iterations=100, rollout_steps=8, updates_per_iteration=1, minibatch_size=16384,
                                    num_draws=alg.num_draws, lr=3e-4, weight_decay=1e-4, max_grad_norm=1.0)

    cli = parse_config(ControlConfig, ["--config", str(CONFIGS / f"{name}.yaml"), "--total_steps", "100000"], "test")
    for key, value in released.items():
        if key == "use_clipped_value_loss":  # the CLI's form is value_clip = 0, checked below
            continue
        cli_key = CLI_NAMES.get(key, key)
        expected = {"adaptive": "kl"}.get(value, value) if key == "schedule" else value
        assert getattr(cli, cli_key) == pytest.approx(expected), key
    assert cli.value_clip == 0.0 and (cli.actor_hidden, cli.critic_hidden, cli.rollout_steps) == (actor, critic, steps)


def test_rsl_rl_defaults_are_the_released_base_values():
    base = FPOPlusPlusConfig()
    assert (base.num_learning_epochs, base.num_mini_batches, base.clip_param, base.adam_betas, base.cfm_clamp,
            base.cfm_reduction, base.num_draws, base.ema_warmup_updates) == (16, 4, 0.05, [0.9, 0.999], 20.0, "sqrt", 16, 500)


def test_released_family_merged_into_an_mjlab_runner_config():
    """dipod.control.mjlab_train.released_fpo_agent_cfg: a task's PPO runner dict (as mjlab passes it) gets the family's
    algorithm, rollout length and widths, keeps everything else, and parses to the released values plus overrides."""
    from dipod.control.mjlab_train import REPO_CONFIGS, released_fpo_agent_cfg

    gaussian = {"class_name": "GaussianDistribution", "init_std": 1.0, "std_type": "scalar"}
    task = {"seed": 42, "num_steps_per_env": 24, "obs_groups": {"actor": ("actor",), "critic": ("critic",)},
            "save_interval": 50, "actor": {"hidden_dims": (512, 256, 128), "activation": "elu", "obs_normalization": True,
                                           "distribution_cfg": gaussian, "class_name": "MLPModel"},
            "critic": {"hidden_dims": (512, 256, 128), "activation": "elu", "obs_normalization": True,
                       "distribution_cfg": None, "class_name": "MLPModel"},
            "algorithm": {"class_name": "PPO", "entropy_coef": 0.01, "clip_param": 0.2}}
    assert REPO_CONFIGS == CONFIGS
    cfg = released_fpo_agent_cfg(task, CONFIGS / "rsl_rl_g1_tracking.yaml", dipod_beta=0.1)
    assert task["algorithm"]["class_name"] == "PPO" and task["actor"]["distribution_cfg"] is gaussian  # not mutated
    assert cfg["algorithm"]["class_name"] == "dipod.control.rsl_rl:FPOPlusPlus" and "entropy_coef" not in cfg["algorithm"]
    assert (cfg["num_steps_per_env"], cfg["save_interval"], cfg["obs_groups"]) == (48, 50, task["obs_groups"])
    assert cfg["actor"]["hidden_dims"] == [1024, 512, 256] and cfg["actor"]["distribution_cfg"] is None
    assert cfg["actor"]["class_name"] == "MLPModel"
    settings = parse_algorithm_config(cfg["algorithm"])
    assert settings.dipod_beta == 0.1
    for key, value in TRACKING.items():
        assert getattr(settings, key) == value, key
