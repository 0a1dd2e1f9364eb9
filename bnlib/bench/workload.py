"""The one workload every loop of the bench measures: resnet18 (BN, CIFAR stem; width 0.25 on
CPU, 1.0 on CUDA) on bnlib's synthetic images, batch size 128, as bnlib run parameters."""
from __future__ import annotations

import math

import torch

__all__ = ["BATCH", "VAL_FRACTION", "bench_width", "default_n_train", "synthetic_size", "bench_params"]

BATCH = 128
VAL_FRACTION = 0.1


def bench_width(device: torch.device) -> float:
    return 1.0 if device.type == "cuda" else 0.25


def default_n_train(device: torch.device, quick: bool, n_train: int | None = None) -> int:
    """Training images per epoch, in whole batches (CPU 2048 / CUDA 16384; quick 1024 / 4096)."""
    gpu = device.type == "cuda"
    n = n_train or ({True: 4096, False: 1024} if quick else {True: 16384, False: 2048})[gpu]
    return max(BATCH, n // BATCH * BATCH)


def synthetic_size(n_cap: int) -> int:
    """A synthetic pool whose training split (after VAL_FRACTION) holds at least n_cap images."""
    return math.ceil(n_cap / (1 - VAL_FRACTION) / 10) * 10 + 10


def bench_params(width: float, n_train: int, device: torch.device) -> dict:
    """bnlib run parameters of the workload: 2 epochs of n_train images, progress bar off.

    The synthetic pool has balanced classes and the caps are stratified per class, so ask for
    a multiple of 10 training images: every loop runs n_train // 128 full batches per epoch."""
    n_cap = math.ceil(n_train / 10) * 10
    return dict(arch="resnet18", norm="bn", stem="cifar", width=width, dataset="synthetic",
                synthetic_size=synthetic_size(n_cap), val_fraction=VAL_FRACTION, n_train=n_cap,
                n_test=min(1000, max(250, n_train // 8)), batch_size=BATCH, epochs=2, device=str(device),
                progress=False)
