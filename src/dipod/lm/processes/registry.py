"""The table of diffusion processes, and the lookup every public entry point goes through."""

from __future__ import annotations

from dipod.lm.processes.base import DiffusionProcess
from dipod.lm.processes.masked import MaskedProcess
from dipod.lm.processes.uniform import UniformProcess

DIFFUSION_PROCESSES: dict[str, DiffusionProcess] = {p.name: p for p in (MaskedProcess(), UniformProcess())}


def get_process(name: str) -> DiffusionProcess:
    if name not in DIFFUSION_PROCESSES:
        raise ValueError(f"diffusion process {name!r} is unknown; choose one of {sorted(DIFFUSION_PROCESSES)}")
    return DIFFUSION_PROCESSES[name]


def process_of(lm) -> DiffusionProcess:
    """The process of ``lm``'s family (``masked`` for a model without a family, e.g. a test double)."""
    return get_process(getattr(getattr(lm, "family", None), "process", "masked"))
