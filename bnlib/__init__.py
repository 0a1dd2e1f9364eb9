"""bnlib: reproduce, side by side, five papers on why Batch Normalization works.

Flat public API: norms and models (bnlib.norms, bnlib.models), data on the device
(bnlib.data), the run config and its validation (bnlib.config), the training loop
(bnlib.train), the measurements it can take inside training (bnlib.probes) and the run
records (bnlib.records).
"""
from .version import __version__  # noqa: E402
from .errors import ConfigError, RecordError, RunLocked  # noqa: E402
from .config import load_plugins, validate  # noqa: E402
from .data import check_data, load_data, make_synthetic  # noqa: E402
from .models import ResNet, create_model  # noqa: E402
from .norms import NORMS, get_norm, register_norm  # noqa: E402
from .probes import PROBES, probe_names, register_probe  # noqa: E402
from .records import Runs, load_runs, run_id  # noqa: E402
from .train import run, train  # noqa: E402

__all__ = ["__version__", "ConfigError", "RecordError", "RunLocked", "RunConfig", "validate", "check_data", "load_data", "make_synthetic",
           "ResNet", "create_model", "NORMS", "get_norm", "register_norm", "PROBES", "probe_names",
           "register_probe", "Runs", "load_runs", "run_id",
           "run", "train", "register_study", "Study", "Preset", "load_plugins", "run_study"]


def __getattr__(name):
    # RunConfig is rebuilt when a plugin adds parameters (bnlib.config.refresh_run_config): the
    # current one, never a copy bound at import. The study registry loads on first use (it
    # imports every study, which `import bnlib` alone does not need).
    if name == "RunConfig":
        from . import config

        return config.RunConfig
    if name in ("register_study", "Study", "Preset"):
        from . import studies

        return getattr(studies, name)
    if name == "run_study":
        from .grid import run_study

        return run_study
    raise AttributeError(f"module 'bnlib' has no attribute {name!r}")
