"""bnlib: reproduce, side by side, five papers on why Batch Normalization works.

Flat public API: norms and models (bnlib.norms, bnlib.models), data on the device
(bnlib.data), the run config and its validation (bnlib.config), the training loop
(bnlib.train), the measurements it can take inside training (bnlib.probes) and the run
records (bnlib.records).
"""
from .version import __version__  # noqa: E402
from .errors import ConfigError, RecordError, RunLocked  # noqa: E402
from .config import RunConfig, validate  # noqa: E402
from .data import check_data, load_data, make_synthetic  # noqa: E402
from .models import ResNet, create_model  # noqa: E402
from .norms import NORMS, get_norm, register_norm  # noqa: E402
from .probes import PROBES, probe_names, register_probe  # noqa: E402
from .records import Runs, load_runs, run_id  # noqa: E402
from .train import run, train  # noqa: E402

__all__ = ["__version__", "ConfigError", "RecordError", "RunLocked", "RunConfig", "validate", "check_data", "load_data", "make_synthetic",
           "ResNet", "create_model", "NORMS", "get_norm", "register_norm", "PROBES", "probe_names",
           "register_probe", "Runs", "load_runs", "run_id",
           "run", "train"]
