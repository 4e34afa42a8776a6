"""Decoding with sharded weights (DeepSpeed ZeRO-3, FSDP2): every rank runs the same passes.

A sharded engine gathers each module's weights inside its forward, a collective every rank must join.
Threshold decoding, finished rows and prompt lengths make the number of model calls differ from rank
to rank, so a rank that finished early would leave the others waiting in a gather (or, on gloo, read
the wrong message). ``RankSynced`` wraps a forward whose every call runs the same module sequence (the
block-causal prefix cache with ``uniform_passes``): before each call the ranks agree that someone is
still decoding, and a rank that is done calls ``idle_step`` (the same modules on one token) until all
are. FSDP2 also needs its root module called once before its submodules are (it sets up the shards
there) and the root's own weights gathered while the submodules are called directly: ``start`` and
``finish`` do that.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def ranks_must_sync(model: nn.Module) -> bool:
    """Weights sharded over more than one process: each forward is a collective."""
    from torch.distributed.tensor import DTensor

    sharded = any(hasattr(p, "ds_id") or isinstance(p, DTensor) for p in model.parameters())
    return sharded and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class RankSynced:
    """``forward`` called in lockstep with the other ranks (module docstring); attributes pass through."""

    def __init__(self, forward, root: nn.Module, device: torch.device):
        self.forward, self.root, self.device = forward, root, device

    def __getattr__(self, name: str):
        return getattr(self.forward, name)

    def start(self) -> None:
        """FSDP2: one root call sets the shards up; the root's own weights (those of no wrapped submodule)
        stay gathered while decoding calls the submodules directly."""
        from torch.distributed.fsdp import FSDPModule

        with torch.no_grad():
            self.root(torch.zeros((1, 1), dtype=torch.long, device=self.device))
        if isinstance(self.root, FSDPModule):
            self.root.unshard()

    def _anyone_decoding(self, me: bool) -> bool:
        flag = torch.tensor([1.0 if me else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def __call__(self, *args, **kwargs):
        self._anyone_decoding(True)
        return self.forward(*args, **kwargs)

    def finish(self) -> None:
        """Idle steps until every rank is done."""
        from torch.distributed.fsdp import FSDPModule

        while self._anyone_decoding(False):
            self.forward.idle_step(self.device)
        if isinstance(self.root, FSDPModule):
            self.root.reshard()
