"""How much memory a run will allocate, estimated before anything is allocated: validation
refuses a run that cannot fit (issue 15) instead of crashing in its first step.

Two estimates: a cheap bound from the architecture's table alone (decides that a run surely
fits, in microseconds, also for a 1000-layer net) and, only when the bound does not settle it,
a count on PyTorch's meta device (shapes only) of the network's parameters and activations.

On a GPU a run's limit is its share of the GPU's memory, less what every run process holds beside
its tensors (its CUDA context, cuDNN's and cuBLAS's workspaces: GPU_RESERVE_BYTES). K runs share
a GPU when a study is given `--runs-per-gpu K` (RUNS_PER_GPU_ENV, set for the run by its Dask
worker); choose_runs_per_gpu picks K for a grid from these estimates.
"""
from __future__ import annotations

import functools
import math
import os

import torch

from .data import data_shape
from .device import resolve_device
from .errors import ConfigError
from .models import arch_spec, meta_model

__all__ = ["estimate_memory", "memory_bound", "memory_limit", "model_size", "PLAIN_NET", "RUNS_PER_GPU_ENV", "GPU_RESERVE_BYTES",
           "MAX_RUNS_PER_GPU", "check_runs_per_gpu", "runs_per_gpu", "gpu_share", "choose_runs_per_gpu"]

RUNS_PER_GPU_ENV = "BNLIB_RUNS_PER_GPU"
# per run process on a GPU, beside its tensors: the CUDA context with cuDNN and cuBLAS loaded
# (0.5-1 GiB, by GPU and library version) and their workspaces (cuDNN's autotuner tries
# algorithms with workspaces of up to a few hundred MiB; cuBLAS's is 32 MiB)
GPU_RESERVE_BYTES = 1.5 * 2**30
# more runs than this on one GPU buy nothing: each run also needs a CPU core to feed it
MAX_RUNS_PER_GPU = 8


# a net with more blocks than this is counted from its shallow relatives (_model_size): the meta
# device's forward costs about 0.5 ms an operation in Python, 7 s for WRN-1000 in every process
# that validates one
DIRECT_BLOCKS = 24


def _count(cfg: dict) -> tuple[int, int]:
    """(parameters, activation values per 32x32 image) of cfg's net, its forward on the meta device."""
    m = meta_model(cfg)
    n_act = [0]
    hooks = [mod.register_forward_hook(lambda _m, _i, o: n_act.__setitem__(0, n_act[0] + o.numel())
                                       if isinstance(o, torch.Tensor) else None)
             for mod in m.modules() if not list(mod.children())]
    try:
        with torch.device("meta"):
            m(torch.empty(1, 3, 32, 32))
    finally:
        for h in hooks:
            h.remove()
    return sum(p.numel() for p in m.parameters()), n_act[0]


# the plain BN net at width 1 (with the run's arch, stem and shortcut): the estimate scales its
# counts by the run's width and batch
PLAIN_NET = {"width": 1.0, "norm": "bn", "gamma0": 1.0, "zero_init_last_gamma": False, "residual_gain": False,
             "alpha0": 0.0, "alpha_learnable": True, "conv_init": "kaiming_fan_in", "input_norm": "dataset",
             "bn_eps": 1e-5, "bn_momentum": 0.1, "zero_bias": False, "dropout": 0.0, "fc_dropout": 0.0,
             "conv_bias": False, "checkpoint_blocks": False}


@functools.lru_cache(maxsize=64)
def _model_size(arch: str, stem: str, shortcut: str) -> tuple[int, int] | None:
    cfg = {**PLAIN_NET, "stem": stem, "shortcut": shortcut}
    try:
        spec = arch_spec(arch)
        if sum(spec.layers) <= DIRECT_BLOCKS:
            return _count({**cfg, "arch": spec})
        # Every block after a stage's first has the same shapes, so both counts are linear in each
        # stage's number of blocks: the net with one block per stage, plus for each stage its
        # blocks − 1 times what a second block there adds (tests/test_memory.py: exact).
        ones = (1,) * len(spec.layers)
        base = _count({**cfg, "arch": spec._replace(layers=ones)})
        total = list(base)
        for i, n in enumerate(spec.layers):
            two = _count({**cfg, "arch": spec._replace(layers=ones[:i] + (2,) + ones[i + 1:])})
            total = [t + (n - 1) * (x - b) for t, x, b in zip(total, two, base)]
        return total[0], total[1]
    except Exception:  # noqa: BLE001 — an estimate: never block a run on a failure to estimate
        return None


def model_size(cfg: dict) -> tuple[int, int] | None:
    """(parameters, activation values per 32x32 image) of the run's architecture at width 1,
    counted on the meta device; None when it cannot be counted."""
    return _model_size(cfg["arch"], cfg["stem"], cfg["shortcut"])


def check_runs_per_gpu(k, name: str = "--runs-per-gpu") -> int:
    """k as the number of runs sharing one GPU; a ConfigError naming `name` unless a whole number >= 1."""
    try:
        ok = not isinstance(k, bool) and int(k) == float(k) and int(k) >= 1
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"{name}={k!r}: the number of runs that share one GPU; valid choices: a whole number "
                          f">= 1 (1: a GPU per run)")
    return int(k)


def runs_per_gpu() -> int:
    """How many runs share this run's GPU: RUNS_PER_GPU_ENV, set by the study's worker (1 when unset)."""
    v = os.environ.get(RUNS_PER_GPU_ENV)
    return 1 if v in (None, "") else check_runs_per_gpu(v, RUNS_PER_GPU_ENV)


def gpu_share(total: float, k: int = 1) -> float:
    """Bytes one of k runs on a GPU of `total` bytes may allocate: its 1/k, less GPU_RESERVE_BYTES."""
    return total / k - GPU_RESERVE_BYTES


def choose_runs_per_gpu(cfgs, total: float, cap: int = MAX_RUNS_PER_GPU) -> int:
    """The most runs of these configs that fit on one GPU of `total` bytes at once (the largest
    run's estimate, plus GPU_RESERVE_BYTES each), between 1 and `cap`."""
    need = max((sum(estimate_memory(cfg).values()) for cfg in cfgs), default=0.0)  # model_size is cached
    return max(1, min(int(cap), int(total // (need + GPU_RESERVE_BYTES))))


def memory_limit(device: str) -> tuple[float, str]:
    """Bytes of memory a run can have at most: its share of the GPU (gpu_share, with
    runs_per_gpu()), else the host's RAM."""
    d = resolve_device(device)
    if d.type == "cuda" and torch.cuda.is_available():
        k = runs_per_gpu()
        share = "" if k == 1 else f"a 1/{k} share of "
        return (gpu_share(float(torch.cuda.get_device_properties(d.index or 0).total_memory), k),
                f"{share}the GPU ({d}) less {GPU_RESERVE_BYTES / 2**30:.3g} GiB for its CUDA context and workspaces")
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")), "this machine's RAM"
    except (ValueError, OSError, AttributeError):
        return math.inf, "memory"


def memory_bound(cfg: dict) -> float:
    """Bytes a run allocates at most, from the architecture's table alone (no model built): every
    conv taken as the widest one, a 7x7 kernel, at the input's full resolution, with six kept
    tensors of that size per conv (conv, norm, activation, sum, dropout, spare), plus the data
    estimate_memory counts. Loose (often 10-100x), so it only decides that a run surely fits."""
    spec = arch_spec(cfg["arch"])
    expand = 4 if spec.block == "bottleneck" else 1
    cmax = max(1, round(max(spec.widths) * expand * float(cfg["width"]))) + 1
    n_conv = 1 + len(spec.layers) + sum(spec.layers) * (3 if spec.block == "bottleneck" else 2)
    pixels, chans, pool, test = data_shape(cfg)
    params = n_conv * 49.0 * cmax * cmax + (cmax + 1) * 1000
    acts = n_conv * 6.0 * cmax * pixels * cfg["batch_size"]
    probes = 8 * params + 4 * acts / cfg["batch_size"] * cfg.get("probe_batch_size", 0) if cfg.get("probes") else 0.0
    return 16 * params + 4 * acts + probes + 7.0 * (pool + test) * pixels * chans


def estimate_memory(cfg: dict) -> dict[str, float]:
    """Bytes a run will allocate, roughly (within a small factor): the data set
    (uint8 pool + its indexed copy + the float copy its mean/std are computed on), the model
    (weights, gradients, two optimizer moments) and the activations a training batch keeps for
    the backward pass (meta-device count at width 1, scaled by width and batch)."""
    pixels, chans, pool, test = data_shape(cfg)
    out = {"data": float(pool) * pixels * chans * 6 + float(test) * pixels * chans}
    size = model_size(cfg)
    if size is not None:
        w = float(cfg["width"])
        out["model"] = 4 * 4 * size[0] * max(w, w * w)
        # every layer's output in fp32: what autograd keeps (in-place ReLUs counted too, which makes
        # up for the backward's own buffers); a bound to refuse the impossible, not a fine budget
        out["activations"] = 4 * size[1] * w * cfg["batch_size"] * pixels / 1024
        if cfg.get("checkpoint_blocks"):  # recomputed in the backward: kept per block input only, not counted
            del out["activations"]
        if cfg.get("probes"):  # a probe's copy of the weights beside the training model (float64 at
            # most: signal_propagation, which keeps no graph) and the probe batch's activations that
            # a gradient probe (ics, landscape) keeps for its backward, in fp32
            out["probes"] = 8 * size[0] * max(w, w * w) + 4 * size[1] * w * cfg.get("probe_batch_size", 0) * pixels / 1024
    return out
