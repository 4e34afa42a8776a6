"""``dipod control train``: FPO++ (+ DiPOD, + self-distillation) or Gaussian PPO on a gymnasium task."""

from __future__ import annotations

import json

from dipod.config import parse_config
from dipod.control.runner import ControlConfig, train


def main(argv: list[str], prog: str = "dipod control train") -> int:
    cfg = parse_config(ControlConfig, argv, prog, description=__doc__)
    last = train(cfg)
    print(json.dumps({"output_dir": cfg.output_dir, **{k: last[k] for k in ("iteration", "episode_return") if k in last}}))
    return 0
