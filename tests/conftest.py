import pytest
import torch


@pytest.fixture
def one_torch_thread():
    """Compute with one intra-op thread for the test. Tiny models on a small shared machine: thread synchronisation
    costs far more than the work, and subprocess workers (torchrun, cluster jobs) run with OMP_NUM_THREADS=1, so an
    in-process reference run must too for identical float reductions."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
