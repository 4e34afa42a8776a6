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
