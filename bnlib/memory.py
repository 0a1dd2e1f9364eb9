"""How much memory a run will allocate, estimated before anything is allocated: validation
refuses a run that cannot fit (issue 15) instead of crashing in its first step.

Two estimates: a cheap bound from the architecture's table alone (decides that a run surely
fits, in microseconds, also for a 1000-layer net) and, only when the bound does not settle it,
a count on PyTorch's meta device (shapes only) of the network's parameters and activations.
"""
from __future__ import annotations

import functools
import math
import os

import torch

from .data import data_shape
from .device import resolve_device
from .models import arch_spec, meta_model

__all__ = ["estimate_memory", "memory_bound", "memory_limit", "model_size"]


@functools.lru_cache(maxsize=64)
def _model_size(arch: str, stem: str, shortcut: str) -> tuple[int, int] | None:
    # the plain BN net at width 1: the estimate scales it by the run's width and batch
    cfg = {"arch": arch, "stem": stem, "shortcut": shortcut, "width": 1.0, "norm": "bn", "gamma0": 1.0,
           "zero_init_last_gamma": False, "residual_gain": False, "alpha0": 0.0, "alpha_learnable": True,
           "conv_init": "kaiming_fan_in", "input_norm": "dataset", "bn_eps": 1e-5, "bn_momentum": 0.1,
           "zero_bias": False, "dropout": 0.0, "fc_dropout": 0.0, "conv_bias": False, "checkpoint_blocks": False}
    try:
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
    except Exception:  # noqa: BLE001 — an estimate: never block a run on a failure to estimate
        return None


def model_size(cfg: dict) -> tuple[int, int] | None:
    """(parameters, activation values per 32x32 image) of the run's architecture at width 1,
    counted on the meta device; None when it cannot be counted."""
    return _model_size(cfg["arch"], cfg["stem"], cfg["shortcut"])


def memory_limit(device: str) -> tuple[float, str]:
    """Bytes of memory a run can have at most: the GPU's total memory, else the host's RAM."""
    d = resolve_device(device)
    if d.type == "cuda" and torch.cuda.is_available():
        return float(torch.cuda.get_device_properties(d.index or 0).total_memory), f"the GPU ({d})"
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
    return 16 * params + 4 * acts + 7.0 * (pool + test) * pixels * chans


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
    return out
