"""Smoke test: our FPOPlusPlus and stock PPO inside mjlab (MuJoCo Warp on the CPU), as mjlab's ``train`` runs them.

G1 velocity: FPO++ with the DiPOD term, Algorithm 3 and interleaved self-distillation for 2
iterations, then resumed from its checkpoint for one more; stock PPO for 2 iterations on the same
environment. G1 tracking on the synthetic motion (tests/fixtures/g1_synthetic_motion.npz). Each
run must build (rsl-rl-lib 5.4.2 raised ``KeyError: 'rnd_cfg'`` for our class), give finite
losses, save checkpoints and export the ONNX policy with mjlab's metadata (mjlab 1.6 on rsl-rl-lib
5.5 fails there: ``'Logger' object has no attribute 'logger_type'``).

    CUDA_VISIBLE_DEVICES= pytest -m slow tests/test_control_mjlab.py      # needs pip install -e ".[mjlab]"

Skipped when mjlab is not installed (the default install does not have it).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mjlab", reason="mjlab is not installed: pip install -e '.[mjlab]' (docs/control_mjlab.md)")
os.environ["CUDA_VISIBLE_DEVICES"] = ""  # MuJoCo Warp's CPU device; set before warp initialises

import torch  # noqa: E402

from dipod.control.mjlab_train import (  # noqa: E402
    REPO_CONFIGS,
    learn_recorded,
    make_env,
    make_runner,
    released_fpo_agent_cfg,
    task_agent_cfg,
)
from dipod.control.rsl_rl import FPOPlusPlus  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]
VELOCITY, TRACKING = "Mjlab-Velocity-Flat-Unitree-G1", "Mjlab-Tracking-Flat-Unitree-G1"
MOTION = Path(__file__).parent / "fixtures" / "g1_synthetic_motion.npz"
# The released values, cut down so that an update takes about a second on one CPU thread.
SMALL = {"num_learning_epochs": 2, "num_draws": 4, "sampling_steps": 8, "distill_rollout_steps": 2}


@pytest.fixture(scope="module")
def velocity_env():
    torch.set_num_threads(1)
    env = make_env(VELOCITY, num_envs=4, seed=0)
    yield env
    env.close()


def assert_finite(records, iterations: int) -> None:
    assert len(records) == iterations
    for record in records:
        assert math.isfinite(record.step_reward)
        assert all(math.isfinite(v) for v in record.losses.values()), record.losses


def assert_exported(log_dirs: list[Path], iteration: int, capsys) -> None:
    """mjlab's velocity runner exports ``<run>.onnx`` with metadata at every save and only prints a warning if that
    fails (checked last, so that on rsl-rl-lib 5.5 everything before it has been shown to work)."""
    out = capsys.readouterr().out
    assert "ONNX export failed" not in out, out[out.find("ONNX export failed"):][:300]
    onnx = pytest.importorskip("onnx")
    for log_dir in log_dirs:
        assert (log_dir / f"model_{iteration}.pt").is_file()
        model = onnx.load(str(log_dir / f"{log_dir.name}.onnx"))
        assert {p.key for p in model.metadata_props} >= {"joint_names", "action_scale"}


def test_fpo_plus_plus_with_dipod_and_distillation_trains_and_resumes(velocity_env, tmp_path, capsys):
    cfg = released_fpo_agent_cfg(task_agent_cfg(VELOCITY), REPO_CONFIGS / "rsl_rl_locomotion.yaml", **SMALL,
                                 dipod_beta=0.1, distill_initial_iterations=2, distill_every=1, distill_iterations=1)
    log_dir = tmp_path / "fpo"
    runner = make_runner(velocity_env, VELOCITY, cfg, seed=0, log_dir=log_dir)
    assert isinstance(runner.alg, FPOPlusPlus)
    assert runner.cfg["algorithm"]["rnd_cfg"] is None and runner.cfg["algorithm"]["symmetry_cfg"] is None
    records = learn_recorded(runner, 2)
    assert_finite(records, 2)
    first, second = records[0].losses, records[1].losses
    assert first["distill_initial_done"] == 1.0 and first["distill_env_steps"] == 2 * 2 * 4  # iterations x steps x envs
    assert second["distill_interleaved_done"] == 1.0  # distill_every=1: a stage before the second rollout
    assert first["dipod_loss"] != 0.0 and math.isfinite(first["cfm_loss_before"])

    resumed = make_runner(velocity_env, VELOCITY, cfg, seed=0, log_dir=tmp_path / "fpo_resumed")
    resumed.load(str(log_dir / "model_1.pt"))  # what mjlab's train does with --agent.resume True
    assert resumed.current_learning_iteration == 1 and resumed.alg.rl_updates == 2
    assert resumed.alg.pending_stage == "interleaved"  # saved after update 2 with distill_every=1; Algorithm 3 is done
    for name, value in runner.alg.actor.state_dict().items():
        torch.testing.assert_close(resumed.alg.actor.state_dict()[name], value)
    more = learn_recorded(resumed, 1)
    assert_finite(more, 1)
    assert "distill_initial_done" not in more[0].losses and more[0].losses["distill_interleaved_done"] == 1.0
    assert resumed.alg.rl_updates == 3
    assert_exported([log_dir, tmp_path / "fpo_resumed"], 1, capsys)


def test_stock_ppo_beside_it(velocity_env, tmp_path, capsys):
    runner = make_runner(velocity_env, VELOCITY, task_agent_cfg(VELOCITY), seed=0, log_dir=tmp_path / "ppo")
    assert type(runner.alg).__name__ == "PPO"
    assert_finite(learn_recorded(runner, 2), 2)
    assert_exported([tmp_path / "ppo"], 1, capsys)


def test_tracking_runs_on_the_synthetic_motion(tmp_path):
    motion = np.load(MOTION)
    assert motion["joint_pos"].shape == (200, 29) and motion["body_pos_w"].shape == (200, 30, 3)
    env = make_env(TRACKING, num_envs=4, seed=0, motion_file=MOTION)
    try:
        cfg = released_fpo_agent_cfg(task_agent_cfg(TRACKING), REPO_CONFIGS / "rsl_rl_g1_tracking.yaml",
                                     **{**SMALL, "num_draws": 6},  # the k-NN entropy (k = 5) needs more draws than k
                                     distill_initial_iterations=1)
        runner = make_runner(env, TRACKING, cfg, seed=0, log_dir=tmp_path / "tracking")
        records = learn_recorded(runner, 2)
    finally:
        env.close()
    assert_finite(records, 2)
    assert records[0].losses["distill_initial_done"] == 1.0
    assert (tmp_path / "tracking" / "model_1.pt").is_file()


def test_the_committed_motion_is_what_the_generator_writes():
    """The fixture is reproducible: its first 0.2 s regenerated through mjlab's G1 model match to float32 precision."""
    from dipod.control.mjlab_motion import synthetic_g1_motion

    fixture, fresh = np.load(MOTION), synthetic_g1_motion(seconds=0.2, fps=50)
    assert int(fixture["fps"][0]) == 50
    for key, value in fresh.items():
        if key != "fps":
            np.testing.assert_allclose(fixture[key][: value.shape[0]], value, atol=1e-5, err_msg=key)
