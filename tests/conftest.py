import sys

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Every test model is tiny: its matrices gain nothing from threads, and on a shared 2-core
    machine torch's intra-op thread pool makes them 10x (sometimes 100x) slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def fresh_math_verdicts():
    """math500's `equivalent` memoises verdicts for the process: without a fresh cache a test would
    read a verdict an earlier test computed and never run the guards that decide it (mutmut, which
    maps each function to the tests that call it, then never runs those tests on its mutants)."""
    math500 = sys.modules.get("dipod.lm.tasks.math500")
    if math500 is not None:
        math500.equivalent.cache_clear()
    yield


@pytest.fixture(scope="session")
def hub_models(tmp_path_factory):
    """{"llada": folder, "dream": folder}: tiny hub-layout checkpoints the suite builds itself, once per
    session (tests/hub_layout.py), so every family is tested without ../shared beside the checkout."""
    from hub_layout import build_hub_layout

    root = tmp_path_factory.mktemp("hub_models")
    return {family: build_hub_layout(family, root / f"tiny-{family}") for family in ("llada", "dream")}
