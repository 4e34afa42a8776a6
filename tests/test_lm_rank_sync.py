"""dipod.lm.processes.rank_sync: ranks that decode a different number of steps still run every sharded
forward together. Two gloo processes; each "forward" is itself a collective (as a ZeRO-3 / FSDP gather
is); rank 0 decodes 3 steps, rank 1 decodes 5 (slow: spawning two processes)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dipod.lm.processes.rank_sync import RankSynced

STEPS = {0: 3, 1: 5}


class GatheringForward:
    """Stands in for a sharded model: every call (real or idle) joins one all_gather of the rank's id."""

    def __init__(self):
        self.real, self.idle, self.seen = 0, 0, []

    def _gather(self, tag: float) -> None:
        out = [torch.zeros(1) for _ in range(dist.get_world_size())]
        dist.all_gather(out, torch.tensor([tag]))
        self.seen.append([float(t) for t in out])

    def __call__(self, x):
        self.real += 1
        self._gather(1.0)
        return x

    def idle_step(self, device):
        self.idle += 1
        self._gather(0.0)


def _worker(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    forward = GatheringForward()
    synced = RankSynced(forward, torch.nn.Identity(), torch.device("cpu"))
    for step in range(STEPS[rank]):
        synced(step)
    synced.finish()
    results[rank] = (forward.real, forward.idle, forward.seen)
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: 70 s on the loaded 2-core machine
def test_a_rank_that_finishes_first_idles_in_step_with_the_others():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(port, results), nprocs=2, join=True)
    assert results[0][:2] == (3, 2) and results[1][:2] == (5, 0)
    # every gather paired a real or idle call of rank 0 with a real one of rank 1, in order
    assert results[0][2] == results[1][2] == [[1.0, 1.0]] * 3 + [[0.0, 1.0]] * 2
