"""Shared test settings."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny models run fastest on one thread, and a shared 2-core machine stays responsive."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` (pyproject: markers) need a CUDA GPU: skipped where there is none, so
    `pytest -m cuda` on a GPU machine runs them all and elsewhere reports them skipped."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
