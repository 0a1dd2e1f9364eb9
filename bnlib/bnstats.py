"""Batch statistics outside the training step: at initialization and before evaluation.

Two uses, both forward passes in train mode over a fixed set of training images that touch no
random number generator (so every arm and seed of a study sees the same images):

- `init_from_batch`: P1's claim that BN "may derive primarily from improved weight
  initialization" (Peerthum & Stamp 2023), tested directly. Every layer marked `data_init`
  (the `affine_bn_init` norm) gets γ = γ0/√(σ²+ε), β = −γ0·μ/√(σ²+ε) from the per-channel
  statistics (μ, biased σ² over N, H, W) of its input on one training batch, layer by layer in
  depth order within one forward pass: each layer is set before the layers after it see its
  output, so at step 0 the network computes exactly what BN (train mode) computes on that
  batch. It then trains as a plain AffineLayer, with no statistics.
- `precise_bn`: BN's running statistics are an exponential average over past steps, so they
  lag the weights; in a short run (tens of steps) that lag under-reports every batch-statistics
  arm at evaluation. Inside this context the running mean and variance of every layer with
  running statistics are replaced by the exact mean and (unbiased) variance of its input over
  the given batches, computed with the final weights (as pycls's precise BN does); on exit the
  training state (running statistics, momentum, counters) is restored exactly.

Layers with running statistics are BatchNorm2d and its subclasses: BN, bn_minus and the BN
variants of bnlib.bn_variants (noisy_bn, ics_free, batch_renorm, ghost_bn), whose eval mode is
BN's. Their train-mode forwards here behave as in training (noisy_bn draws its noise, from
forked generators, so the training stream is untouched; ghost_bn normalizes per virtual batch)
and every buffer they hold (ics_free's previous-batch statistics too) is restored on exit.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["init_from_batch", "precise_bn", "fixed_batches", "has_running_stats", "EVAL_STATS"]

# `bn_eval_stats`: which statistics a batch-statistics norm uses at evaluation.
EVAL_STATS = ("running", "precise")


def fixed_batches(x_u8: torch.Tensor, batch_size: int, n_batches: int) -> list[torch.Tensor]:
    """The first `n_batches` full batches of a uint8 training set (N, C, H, W), in stored order:
    no augmentation and no RNG, so the training stream is untouched."""
    n = min(n_batches, len(x_u8) // batch_size)
    return [x_u8[i * batch_size:(i + 1) * batch_size] for i in range(max(1, n))]


@torch.no_grad()
def init_from_batch(model: nn.Module, x: torch.Tensor, forward: Callable | None = None) -> int:
    """Set γ, β of every `data_init` layer from the statistics of its input on batch `x` (float
    input as the model takes it). The model's train/eval mode is kept; BN layers elsewhere in
    the net (none in a pure affine_bn_init net) would update their running statistics, so they
    are saved and restored. Returns the number of layers set."""
    layers = [m for m in model.modules() if getattr(m, "data_init", False)]
    if not layers:
        return 0

    def hook(m, args):
        (inp,) = args
        xf = inp.detach().float()  # (N, C, H, W)
        mean = xf.mean(dim=(0, 2, 3))
        var = xf.var(dim=(0, 2, 3), unbiased=False)  # BN normalizes with the biased variance
        scale = m.gamma0 / torch.sqrt(var + m.eps)
        m.weight.copy_(scale)
        m.bias.copy_(-mean * scale)

    saved = _save_running(model)
    handles = [m.register_forward_pre_hook(hook) for m in layers]
    was_training = model.training
    try:
        model.train()
        with _rng_untouched(model):
            (forward or model)(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        _restore_running(saved)
    return len(layers)


def _stat_layers(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def has_running_stats(model: nn.Module) -> bool:
    """Whether evaluation statistics matter for this net (it has layers with running statistics)."""
    return bool(_stat_layers(model))


def _save_running(model: nn.Module) -> list[tuple]:
    # every buffer of the layer, not only running mean/var and the counter: BN variants keep
    # more training state (ics_free's previous-batch statistics, bnlib.ics_free)
    return [(m, {n: b.clone() for n, b in m.named_buffers(recurse=False)}, m.momentum)
            for m in _stat_layers(model)]


def _restore_running(saved: list[tuple]) -> None:
    with torch.no_grad():
        for m, buffers, momentum in saved:
            for n, b in buffers.items():
                getattr(m, n).copy_(b)
            m.momentum = momentum


@contextlib.contextmanager
def _rng_untouched(model: nn.Module):
    """Forward passes in train mode may draw random numbers (noisy_bn's noise): fork torch's
    generators (CPU and the model's CUDA device) so the training stream is not advanced."""
    devices = sorted({torch.cuda.current_device() if p.device.index is None else p.device.index
                      for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        yield


@contextlib.contextmanager
def precise_bn(model: nn.Module, batches: Iterable[torch.Tensor], forward: Callable | None = None):
    """Within the block, every BN layer's running statistics are the exact per-channel mean and
    unbiased variance of its input over all of `batches` (float inputs as the model takes them;
    each layer sees its inputs computed with batch statistics, as in training). Sums are kept in
    float64: E[x] and E[x²] over N·H·W·batches elements, var = (E[x²] − E[x]²)·n/(n−1)."""
    layers = _stat_layers(model)
    saved = _save_running(model)
    if not layers:
        yield model
        return
    acc = {m: [0, 0.0, 0.0] for m in layers}  # count, Σx (C,), Σx² (C,)

    def hook(m, args):
        xf = args[0].detach().double()
        a = acc[m]
        a[0] += xf.numel() // xf.shape[1]
        a[1] = a[1] + xf.sum(dim=(0, 2, 3))
        a[2] = a[2] + (xf * xf).sum(dim=(0, 2, 3))

    handles = [m.register_forward_pre_hook(hook) for m in layers]
    was_training = model.training
    try:
        with torch.no_grad(), _rng_untouched(model):
            model.train()
            for xb in batches:
                (forward or model)(xb)
        for h in handles:
            h.remove()
        handles = []
        with torch.no_grad():
            for m, (n, s, s2) in acc.items():
                mean = s / n
                var = (s2 / n - mean * mean).clamp_min(0) * (n / max(1, n - 1))
                m.running_mean.copy_(mean.to(m.running_mean.dtype))
                m.running_var.copy_(var.to(m.running_var.dtype))
        model.train(was_training)
        yield model
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        _restore_running(saved)
