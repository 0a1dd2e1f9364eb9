"""Probes: measurements taken inside training (gradients, activations, the loss along a step).

P3, P4 and P5 are about what happens during training, not only accuracy. A probe is one
registered function `fn(ctx) -> rows`, like a norm is one registry entry; the loop calls every
due probe through one hook (`ProbeRunner.at`) and the rows go to `probes.parquet` in the run
directory, loaded by `bnlib.load_runs` as `runs.probes`. Long format, one row per number:

    step      optimizer updates done when measured (0 = initialization)
    epoch     step / steps per epoch (0.0 = init, 1.0 = end of the first epoch)
    probe     registry name
    layer     module name ("" when the number is about the whole net)
    depth     conv index (bnlib.models.conv_layers), block index or -1
    quantity  what the number is (each probe's doc lists its quantities)
    x         abscissa where one is needed (step size, histogram bin centre), else NaN
    value     the number

Contract (tests/test_probes.py checks it for every registered probe):
- Training is bit-identical with and without probes. A probe works on a deep copy of the model
  (its parameters, BN running statistics and counters; no .grad), so it may run forward and
  backward passes or move the weights freely; every RNG (python, numpy, torch CPU and CUDA, the
  loop's data generator) is saved before and restored after. The optimizer is passed for reading
  (learning rates, state); a probe never steps it. On CUDA this holds as far as the run is
  reproducible at all: with cuDNN autotuning on (deterministic=False) a probe's forward pass
  can be the first to autotune a shape, and autotuning may pick another kernel than a run
  without probes would; two runs without probes can differ the same way.
- Probes compute in fp32: autocast is off inside them, whatever the run's precision.

Cadence (the runner's parameters in bnlib.config, section "probes"): every requested probe runs at
initialization and at the end of every epoch; also every k steps (`name@k` in `probes`, else
`probe_every`, else the probe's registry default) and at the chosen `probe_steps`. Cost per
call on the bench model: `make bench`.

Layout: bnlib.probes.registry (ProbeSpec, the registry, parameters and their checks, the
runner), then one module per paper: p4 (Bjorck et al. 2018), p3 (Santurkar et al. 2018, as
Awais et al. 2021 measure), p2 (Davis & Frank 2022), p5 (De & Smith 2020). A probe's own
parameters are declared in its `register_probe(..., params=...)` entry; `probe_params()` gives
them all, for bnlib.config's RunConfig.
"""
from __future__ import annotations

from ..rng import preserved as preserved_rng
from .registry import (COLUMNS, PROBES, ProbeContext, ProbeRunner, ProbeSpec, check_probe_params, parse_probes,
                       probe_names, probe_params, register_probe)
# the built-in probes register on import, in this order (check_probe_params's error order)
from .p4 import HIST_BINS, channel_moments, final_layer_grad, layer_grads, step_size_loss  # noqa: F401
from .p3 import _upstream, ics, landscape  # noqa: F401  (_upstream: tests/test_p3.py)
from .p2 import max_normalized  # noqa: F401
from .p5 import signal_propagation  # noqa: F401

__all__ = ["ProbeContext", "ProbeSpec", "PROBES", "register_probe", "probe_names", "probe_params", "parse_probes",
           "check_probe_params", "ProbeRunner", "preserved_rng", "COLUMNS"]
