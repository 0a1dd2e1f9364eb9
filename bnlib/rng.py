"""Random number states, saved and restored in one place: checkpoints (resume bit-identical),
probes (training bit-identical with and without them) and the P3 evaluations that replay one
random draw. A leaf of the package.

A state is a dict of CPU objects: Python's, NumPy's and torch's CPU generator, the CUDA
generators in use, and any given torch.Generators (a CUDA generator's state is a CPU tensor
too, which is what Generator.set_state and torch.cuda.set_rng_state accept).
"""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

__all__ = ["get_state", "set_state", "same_state", "preserved"]


def _cuda_in_use() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def get_state(generators=(), cuda: str | torch.device | None = "all", host: bool = True) -> dict:
    """The RNG state. `cuda`: "all" (every device, when CUDA is in use), one device, or None;
    `host=False` leaves out Python's and NumPy's generators (torch's CPU one is always kept)."""
    out = {"torch_rng": torch.get_rng_state(), "generators": [g.get_state() for g in generators]}
    if host:
        out["numpy_rng"], out["python_rng"] = np.random.get_state(), random.getstate()
    if cuda == "all":
        out["cuda_rng_all"] = torch.cuda.get_rng_state_all() if _cuda_in_use() else None
    elif cuda is not None and torch.device(cuda).type == "cuda":
        out["cuda_rng"] = torch.cuda.get_rng_state(torch.device(cuda))
    return out


def set_state(state: dict, generators=(), cuda: str | torch.device | None = "all") -> None:
    """Restore what get_state saved (the generators in the same order)."""
    torch.set_rng_state(state["torch_rng"].cpu())
    for g, s in zip(generators, state.get("generators", ())):
        g.set_state(s.cpu())
    if "numpy_rng" in state:
        np.random.set_state(state["numpy_rng"])
    if "python_rng" in state:
        random.setstate(state["python_rng"])
    if state.get("cuda_rng_all") is not None:
        torch.cuda.set_rng_state_all(state["cuda_rng_all"])
    if state.get("cuda_rng") is not None and cuda is not None and torch.device(cuda).type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"].cpu(), torch.device(cuda))


def same_state(a: dict, b: dict) -> bool:
    """Whether two torch states (CPU and CUDA generators) are equal."""
    ca, cb = a.get("cuda_rng_all"), b.get("cuda_rng_all")
    return torch.equal(a["torch_rng"], b["torch_rng"]) and (ca is None) == (cb is None) and \
        (ca is None or all(torch.equal(u, v) for u, v in zip(ca, cb)))


@contextlib.contextmanager
def preserved(generators=()):
    """Every random number generator as it was, whatever the block draws: python, numpy, torch
    CPU, every CUDA device (when CUDA is in use) and the given torch.Generators."""
    state = get_state(generators)
    try:
        yield
    finally:
        set_state(state, generators)
