"""A synthetic reference motion for mjlab's G1 tracking task, so it runs without LAFAN clips.

mjlab's ``MotionCommand`` reads an ``.npz`` with ``fps``, ``joint_pos`` / ``joint_vel`` ``[T, J]``
(the robot's joints in its own order) and ``body_pos_w`` / ``body_quat_w`` (wxyz) /
``body_lin_vel_w`` / ``body_ang_vel_w`` ``[T, B, 3 or 4]`` (every body of the robot). mjlab makes
these from retargeted clips by replaying them through its simulator (``csv_to_npz``); this module
does the same for a motion written down in closed form, so the bodies come from MuJoCo's own
kinematics of mjlab's G1 and the file is consistent with the model by construction.

The motion (``python -m dipod.control.mjlab_motion OUT.npz``, docs/control_mjlab.md): the G1
stands at its default pose and root height, root fixed; both arms swing in antiphase at the
shoulder pitch (amplitude ``ARM_SWING`` rad) with the elbows following (``ELBOW_SWING``), and the
waist turns (``WAIST_YAW``), all with period ``PERIOD_S``. Joint velocities are the analytic
derivatives. Standing still while moving the arms is within what the robot can track.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch

PERIOD_S = 2.0
ARM_SWING, ELBOW_SWING, WAIST_YAW = 0.4, 0.3, 0.2
# joint -> (amplitude in rad, phase in rad): the arms in antiphase
SWINGS = {
    "left_shoulder_pitch_joint": (ARM_SWING, 0.0), "right_shoulder_pitch_joint": (ARM_SWING, math.pi),
    "left_elbow_joint": (ELBOW_SWING, 0.0), "right_elbow_joint": (ELBOW_SWING, math.pi),
    "waist_yaw_joint": (WAIST_YAW, 0.0),
}
KEYS = ("joint_pos", "joint_vel", "body_pos_w", "body_quat_w", "body_lin_vel_w", "body_ang_vel_w")


def synthetic_g1_motion(seconds: float = 4.0, fps: int = 50) -> dict[str, np.ndarray]:
    """The arrays of the motion file (float32), computed through mjlab's G1 model on the CPU."""
    from mjlab.scene import Scene
    from mjlab.sim.sim import Simulation, SimulationCfg
    from mjlab.tasks.tracking.config.g1.env_cfgs import unitree_g1_flat_tracking_env_cfg

    scene_cfg = unitree_g1_flat_tracking_env_cfg().scene
    scene_cfg.num_envs = 1
    scene = Scene(scene_cfg, device="cpu")
    sim_cfg = SimulationCfg()
    sim_cfg.mujoco.timestep = 1.0 / fps
    sim = Simulation(num_envs=1, cfg=sim_cfg, model=scene.compile(), device="cpu")
    scene.initialize(sim.mj_model, sim.model, sim.data)
    robot = scene["robot"]
    names = list(robot.joint_names)
    missing = sorted(set(SWINGS) - set(names))
    if missing:
        raise ValueError(f"mjlab's G1 has no joints {missing}; its joints are {names}")
    amplitude = torch.tensor([SWINGS.get(n, (0.0, 0.0))[0] for n in names])
    phase = torch.tensor([SWINGS.get(n, (0.0, 0.0))[1] for n in names])
    omega = 2 * math.pi / PERIOD_S
    root = robot.data.default_root_state.clone()  # standing height, upright, at rest
    frames: dict[str, list[np.ndarray]] = {key: [] for key in KEYS}
    scene.reset()
    for i in range(int(round(seconds * fps))):
        t = i / fps
        joint_pos = robot.data.default_joint_pos.clone() + amplitude * torch.sin(omega * t + phase)
        joint_vel = (amplitude * omega * torch.cos(omega * t + phase))[None]
        robot.write_root_state_to_sim(root)
        robot.write_joint_state_to_sim(joint_pos, joint_vel)
        sim.forward()
        scene.update(sim_cfg.mujoco.timestep)
        data = robot.data
        for key, value in zip(KEYS, (data.joint_pos, data.joint_vel, data.body_link_pos_w, data.body_link_quat_w,
                                     data.body_link_lin_vel_w, data.body_link_ang_vel_w)):
            frames[key].append(value[0].cpu().numpy().astype(np.float32))
    return {"fps": np.array([fps]), **{key: np.stack(value) for key, value in frames.items()}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="the .npz to write")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--fps", type=int, default=50)
    args = parser.parse_args(argv)
    motion = synthetic_g1_motion(args.seconds, args.fps)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **motion)
    print(f"wrote {args.out}: {motion['joint_pos'].shape[0]} frames at {args.fps} fps, "
          f"{motion['joint_pos'].shape[1]} joints, {motion['body_pos_w'].shape[1]} bodies")


if __name__ == "__main__":
    main()
