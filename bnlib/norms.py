"""Normalization layers by name: the word a user types (`-p norm affine`) is the registry key.

Conventions (PyTorch's, stated once here): for x of shape (N, C, H, W), BatchNorm in train
mode normalizes with per-channel batch statistics over (N, H, W) and updates running
statistics as r <- (1 - momentum) * r + momentum * stat (momentum 0.1, eps 1e-5); in eval
mode it uses the running statistics.

Each registry entry builds a `norm_layer(num_features) -> nn.Module`, the callable the ResNet
factory injects (as torchvision's resnet.py does). A new variant is one `@register_norm` entry.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

__all__ = ["Affine2d", "NormSpec", "NORMS", "register_norm", "get_norm", "norm_names"]


class Affine2d(nn.Module):
    """P1's AffineLayer: y = γ_c·x + β_c per channel, learnable, no statistics of any kind.

    With γ=1, β=0 at init the network computes exactly what the unnormalized one does; only
    training differs (Peerthum & Stamp 2023, Sec. 3).
    """

    def __init__(self, num_features: int, gamma0: float = 1.0):
        super().__init__()
        self.num_features = num_features
        self.weight = nn.Parameter(torch.full((num_features,), float(gamma0)))  # γ, shape (C,)
        self.bias = nn.Parameter(torch.zeros(num_features))  # β, shape (C,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, C, H, W)
        return torch.addcmul(self.bias.view(1, -1, 1, 1), x, self.weight.view(1, -1, 1, 1))

    def extra_repr(self) -> str:
        return f"{self.num_features}"


@dataclass(frozen=True)
class NormSpec:
    """One registry entry. `has_gamma`/`has_beta` say which learnable parameters exist (γ0 and
    zero-init only make sense with γ); `batch_stats` says whether the layer uses batch
    statistics in training (then a batch of 1 sample per channel is meaningless)."""

    name: str
    build: Callable[..., nn.Module]  # build(num_features, gamma0=..., eps=..., momentum=...)
    has_gamma: bool
    has_beta: bool
    batch_stats: bool
    doc: str


NORMS: dict[str, NormSpec] = {}


def register_norm(name: str, *, has_gamma: bool, has_beta: bool, batch_stats: bool, doc: str):
    def deco(build):
        if name in NORMS:
            raise ValueError(f"norm {name!r} is registered twice")
        NORMS[name] = NormSpec(name, build, has_gamma, has_beta, batch_stats, doc)
        return build

    return deco


def norm_names() -> list[str]:
    return sorted(NORMS)


def _set_gamma(layer: nn.Module, gamma0: float) -> nn.Module:
    # P2 (Davis & Frank): γ starts at γ0 (recommended 0.1), β at 0; the forward pass is unchanged.
    with torch.no_grad():
        layer.weight.fill_(float(gamma0))
    return layer


@register_norm("bn", has_gamma=True, has_beta=True, batch_stats=True,
               doc="standard BatchNorm2d: batch statistics + learnable γ, β")
def _bn(num_features, gamma0=1.0, eps=1e-5, momentum=0.1):
    return _set_gamma(nn.BatchNorm2d(num_features, eps=eps, momentum=momentum), gamma0)


@register_norm("bn_minus", has_gamma=False, has_beta=False, batch_stats=True,
               doc="P1 BatchNorm-minus: normalization only, no γ/β (BatchNorm2d(affine=False))")
def _bn_minus(num_features, gamma0=1.0, eps=1e-5, momentum=0.1):
    return nn.BatchNorm2d(num_features, eps=eps, momentum=momentum, affine=False)


@register_norm("affine", has_gamma=True, has_beta=True, batch_stats=False,
               doc="P1 AffineLayer: per-channel learnable γ·x + β, no statistics")
def _affine(num_features, gamma0=1.0, eps=1e-5, momentum=0.1):
    return Affine2d(num_features, gamma0)


@register_norm("none", has_gamma=False, has_beta=False, batch_stats=False,
               doc="identity: no normalization")
def _none(num_features, gamma0=1.0, eps=1e-5, momentum=0.1):
    return nn.Identity()


def get_norm(name: str, gamma0: float = 1.0, eps: float = 1e-5,
             momentum: float = 0.1) -> Callable[[int], nn.Module]:
    """Return `norm_layer(num_features)` for a registry name; unknown names raise ValueError."""
    if name not in NORMS:
        raise ValueError(f"norm={name!r} is not a known norm; valid choices: {norm_names()}")
    spec = NORMS[name]

    def norm_layer(num_features: int) -> nn.Module:
        return spec.build(num_features, gamma0=gamma0, eps=eps, momentum=momentum)

    norm_layer.spec = spec  # the factory reads has_gamma etc. from here
    return norm_layer
