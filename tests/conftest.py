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


# memoised functions of the graders: name -> functions whose cache a test must not inherit
_MEMOISED = {"dipod.lm.tasks.math500": ("equivalent",), "dipod.lm.tasks.countdown": ("solve",),
             "dipod.lm.tasks.sudoku4": ("all_grids", "_grid_array", "paper_train_grids")}


@pytest.fixture(autouse=True)
def fresh_grader_caches():
    """Each test computes the graders' memoised results itself (math500 verdicts, countdown's solver
    tables, sudoku4's grid list): a test that read what an earlier test, or the collection of a test
    file, cached would never run the code behind them, and mutmut, which maps each function to the
    tests that call it and forks every mutant from a process that collected the tests, would never
    run that code's mutants."""
    for module, names in _MEMOISED.items():
        if module in sys.modules:
            for name in names:
                getattr(sys.modules[module], name).cache_clear()
    yield


@pytest.fixture(scope="session")
def hub_models(tmp_path_factory):
    """{"llada": folder, "dream": folder}: tiny hub-layout checkpoints the suite builds itself, once per
    session (tests/hub_layout.py), so every family is tested without ../shared beside the checkout."""
    from hub_layout import build_hub_layout

    root = tmp_path_factory.mktemp("hub_models")
    return {family: build_hub_layout(family, root / f"tiny-{family}") for family in ("llada", "dream")}
