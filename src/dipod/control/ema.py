"""Exponential moving average of the actor's weights (FPO++: decay 0.95, after a warm-up of 500 updates).

The shadow actor is what FPO++ saves and evaluates; rollouts and updates keep using the live
actor. Counting RL updates: at update ``warmup_updates`` the shadow is reset to the live weights
(so the average never mixes in the random initialisation), after it every update does
``shadow = decay * shadow + (1 - decay) * live``. Buffers (observation statistics) are copied, not
averaged: the shadow must normalise observations as the live actor does.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class ActorEMA:
    def __init__(self, actor: nn.Module, decay: float, warmup_updates: int):
        if not 0 < decay < 1 or warmup_updates < 0:
            raise ValueError(f"ActorEMA: decay={decay} must lie in (0, 1) and warmup_updates={warmup_updates} be >= 0")
        self.decay, self.warmup_updates, self.updates = decay, warmup_updates, 0
        self.live = actor
        with torch.inference_mode(False):
            self.shadow = copy.deepcopy(actor).requires_grad_(False)

    @property
    def active(self) -> bool:
        """True once the shadow holds an average of trained weights (FPO++ saves it from then on)."""
        return self.updates > self.warmup_updates

    @torch.no_grad()
    def reset(self) -> None:
        """Shadow := live weights (after warm-up, and after a self-distillation stage)."""
        self.shadow.load_state_dict(self.live.state_dict())

    @torch.no_grad()
    def step(self) -> None:
        """Call once after every RL update."""
        self.updates += 1
        if self.updates == self.warmup_updates:
            self.reset()
        elif self.updates > self.warmup_updates:
            for avg, cur in zip(self.shadow.parameters(), self.live.parameters()):
                avg.lerp_(cur.detach(), 1.0 - self.decay)
        for avg_b, cur_b in zip(self.shadow.buffers(), self.live.buffers()):
            avg_b.copy_(cur_b)

    def state_dict(self) -> dict:
        return {"updates": self.updates, "shadow": self.shadow.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
        self.shadow.load_state_dict(state["shadow"])
