"""GPU timing (prepared for a lent GPU, under 8 minutes): G1 tracking in mjlab with 4096 environments.

Seconds per runner iteration of FPO++ with the released tracking config (configs/control/
rsl_rl_g1_tracking.yaml: 48 steps per environment, 16 epochs x 6 minibatches, 16 draws, 64 Euler
steps) on the synthetic motion (tests/fixtures/g1_synthetic_motion.npz), and seconds per
Algorithm 3 (initial self-distillation) iteration: 8 teacher steps + one student step on 16384
pairs, as published. The paper reports 15 s per iteration and 0.96 s per distillation iteration
on an L40S (with its own motion clips).

    python benchmarks/control_mjlab_gpu.py --out gpu_timing.json      # needs a CUDA GPU and .[mjlab]

Iteration 0 includes CUDA warm-up and is reported apart; the median of the others is the figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from dipod.control.mjlab_train import (REPO_CONFIGS, learn_recorded, make_env, make_runner, released_fpo_agent_cfg,
                                       task_agent_cfg)

TASK = "Mjlab-Tracking-Flat-Unitree-G1"
MOTION = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "g1_synthetic_motion.npz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_envs", type=int, default=4096)
    parser.add_argument("--iterations", type=int, default=6, help="runner iterations per variant")
    parser.add_argument("--distill_iterations", type=int, default=20, help="Algorithm 3 iterations to time")
    parser.add_argument("--motion_file", default=str(MOTION))
    parser.add_argument("--out", default="gpu_timing.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this script times the GPU path (the CPU path is benchmarks/control_mjlab.py)")
    device, results = "cuda:0", {"device": torch.cuda.get_device_name(0), "num_envs": args.num_envs}
    env = make_env(TASK, args.num_envs, seed=0, device=device, motion_file=args.motion_file)
    for name, overrides in (("fpo", {}), ("fpo_alg3", {"distill_initial_iterations": args.distill_iterations})):
        cfg = released_fpo_agent_cfg(task_agent_cfg(TASK), REPO_CONFIGS / "rsl_rl_g1_tracking.yaml", **overrides)
        runner = make_runner(env, TASK, cfg, seed=0, log_dir=None, device=device)
        start = time.perf_counter()
        records = learn_recorded(runner, args.iterations)
        torch.cuda.synchronize()
        per_iteration = [r.collect_s + r.learn_s for r in records]
        row = {"wall_s": time.perf_counter() - start, "first_iteration_s": per_iteration[0],
               "median_iteration_s": statistics.median(per_iteration[1:]), "iteration_s": per_iteration,
               "collect_s": [r.collect_s for r in records], "learn_s": [r.learn_s for r in records]}
        if overrides:  # the stage runs inside the first act, so its time is in iteration 0's collect time
            stage_s = records[0].losses["distill_time_s"]
            row.update(distill_stage_s=stage_s, distill_iteration_s=stage_s / args.distill_iterations)
        results[name] = row
        print(name, json.dumps({k: v for k, v in row.items() if not isinstance(v, list)}), flush=True)
    env.close()
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
