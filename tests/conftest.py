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


@pytest.fixture
def isolated_registry():
    """Methods registered during the test (plugins) are gone after it: the registry and the plugin sources are
    restored, so the rest of the session sees the built-in methods only."""
    from promptclip.methods import base, plugins
    from promptclip.methods.registry import load_builtin_methods

    load_builtin_methods()
    registry, sources = dict(base._REGISTRY), dict(plugins._SOURCES)
    yield
    base._REGISTRY.clear()
    base._REGISTRY.update(registry)
    plugins._SOURCES.clear()
    plugins._SOURCES.update(sources)


@pytest.fixture(autouse=True)
def isolated_promptclip_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own promptclip cache directory (weights, frozen image features): nothing is read from or
    written to the user's ~/.cache, and no test sees another test's cached features."""
    monkeypatch.setenv("PROMPTCLIP_CACHE", str(tmp_path_factory.mktemp("promptclip-cache")))
