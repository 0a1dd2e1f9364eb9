"""Shared test settings."""
import os

import pytest
import torch

from bnlib.device import AUTO_DEVICE_ENV


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny models run fastest on one thread, and a shared 2-core machine stays responsive."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_configure(config):
    """On a machine with a GPU, `make test` would run every test with device 'auto' on it: the
    exactness tests would compare cuDNN's arithmetic with the CPU's, and xdist's processes would
    share one GPU. Device 'auto' is cpu for the whole session (BNLIB_AUTO_DEVICE, which the
    kernels, Dask workers and CLI processes the tests start inherit, module-scoped fixtures'
    included), so precision 'auto' also resolves as on a CPU-only machine; tests marked `cuda`
    get the machine's own choice back (_cpu_unless_cuda). A test that names a device or a
    precision gets what it names."""
    os.environ[AUTO_DEVICE_ENV] = "cpu"


@pytest.fixture(autouse=True)
def _cpu_unless_cuda(request, monkeypatch):
    if request.node.get_closest_marker("cuda") is None:
        monkeypatch.setenv(AUTO_DEVICE_ENV, "cpu")  # also where a test before this one changed it
    else:
        monkeypatch.delenv(AUTO_DEVICE_ENV, raising=False)
    yield


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` (pyproject: markers) need a CUDA GPU: skipped where there is none, so
    `pytest -m cuda` on a GPU machine runs them all and elsewhere reports them skipped."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
