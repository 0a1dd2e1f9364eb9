"""The epoch checkpoint a run resumes from: its training state and every random number state.

Loaded to the CPU, whatever device saved it: model and optimizer state reach the run's device
through load_state_dict (which puts each optimizer state tensor where torch wants it: moments
on the parameter's device, AdamW's `step` counters on the CPU, where reading them costs no
device sync), and RNG states must be CPU ByteTensors (torch.set_rng_state,
Generator.set_state and torch.cuda.set_rng_state accept nothing else).

RNG states saved: Python's, NumPy's, torch's CPU generator, the run's own generator (data order
and augmentation; its state is a CPU tensor even for a CUDA generator) and, on CUDA, the
default generator of the run's device. The key names of older checkpoints are kept, so a run
interrupted before this version still resumes.
"""
from __future__ import annotations

from pathlib import Path

import torch

import bnlib.rng as rng
from .records import atomic_path

__all__ = ["save_checkpoint", "load_checkpoint", "checkpoint_problem", "rng_states", "set_rng_states"]


def rng_states(gen: torch.Generator, device: torch.device) -> dict:
    """Every random number state a run draws from, as CPU objects (bnlib.rng), under the key
    names checkpoints have always used."""
    # the run's device only: a run resumed on cuda:1 that started on cuda:0 continues its own stream
    states = rng.get_state((gen,), cuda=device if device.type == "cuda" else None)
    states["generator"] = states.pop("generators")[0]
    return states


def set_rng_states(states: dict, gen: torch.Generator, device: torch.device) -> None:
    rng.set_state({**states, "generators": [states["generator"]]}, (gen,), cuda=device)


def save_checkpoint(path: Path, state: dict, gen: torch.Generator, device: torch.device) -> None:
    """`state` (the training state) plus every RNG state, atomically: a kill during the save
    leaves the previous checkpoint intact."""
    with atomic_path(path) as tmp:
        torch.save({**state, **rng_states(gen, device)}, tmp)


# What train() reads from a checkpoint to resume (rng_states' keys are checked by set_rng_states).
RESUME_KEYS = ("epoch", "step", "model", "optimizer", "scheduler", "tracker_init", "epochs", "steps", "norms",
               "generator", "torch_rng")


def checkpoint_problem(path: Path) -> str | None:
    """None when the checkpoint at `path` loads and holds what a resume reads; else what is
    wrong with it (truncated by a full disk, overwritten, not a bnlib checkpoint). A damaged
    checkpoint would make every resume fail: run() checks it first and starts afresh instead."""
    try:
        state = load_checkpoint(path)
    except Exception as e:  # noqa: BLE001 — torch.load raises several kinds on a damaged file
        return f"unreadable: {type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
    if not isinstance(state, dict):
        return f"holds {type(state).__name__}, not a checkpoint"
    missing = [k for k in RESUME_KEYS if k not in state]
    if missing:
        return f"incomplete: no {', '.join(missing)}"
    if not isinstance(state["epoch"], int) or state["epoch"] < 1:
        return f"epoch {state['epoch']!r} is not a finished epoch"
    return None


def load_checkpoint(path: Path) -> dict:
    """The checkpoint with every tensor on the CPU. weights_only=False: it holds NumPy's and
    Python's RNG states, and bnlib only loads checkpoints it wrote into its own run directory."""
    return torch.load(path, map_location="cpu", weights_only=False)
