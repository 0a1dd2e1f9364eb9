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

__all__ = ["Affine2d", "BatchInitAffine2d", "NormSpec", "NORMS", "ROLES", "register_norm", "get_norm", "norm_names",
           "tag_norm"]


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
        # γ, β in the activation's dtype: under bf16 autocast addcmul is not autocast and would
        # promote bf16 x with fp32 γ, β to fp32, while the BN arms (cuDNN/oneDNN batch_norm)
        # return bf16; P1's arms must run at one precision. A no-op in fp32.
        return torch.addcmul(self.bias.to(x.dtype).view(1, -1, 1, 1), x, self.weight.to(x.dtype).view(1, -1, 1, 1))

    def extra_repr(self) -> str:
        return f"{self.num_features}"


class BatchInitAffine2d(Affine2d):
    """P1's claim tested directly: an AffineLayer whose γ, β are set once, before training, from
    the batch statistics of its input on one training batch (bnlib.bnstats.init_from_batch), so
    that at step 0 the network computes what BN computes on that batch; then trained as a plain
    AffineLayer, with no statistics. If it recovers most of BN's gain over no normalization,
    "BN's success derives primarily from improved initialization" holds on these runs."""

    data_init = True  # bnlib.bnstats.init_from_batch sets γ, β of layers with this flag

    def __init__(self, num_features: int, gamma0: float = 1.0, eps: float = 1e-5):
        super().__init__(num_features, gamma0)
        self.gamma0, self.eps = float(gamma0), float(eps)


@dataclass(frozen=True)
class NormSpec:
    """One registry entry. `has_gamma`/`has_beta` say which learnable parameters exist (γ0 and
    zero-init only make sense with γ); `batch_stats` says whether the layer uses batch
    statistics in training (then a batch of 1 sample per channel is meaningless).

    `param_roles` maps a parameter's attribute name on the built layer to its role: "scale"
    (γ) or "shift" (β). Optimizer groups (bnlib.train.param_groups) and γ/β tracking read the
    roles from here, so a new norm (GroupNorm, LayerNorm, ...) is grouped and tracked with no
    edit elsewhere. Default: weight -> scale when has_gamma, bias -> shift when has_beta."""

    name: str
    build: Callable[..., nn.Module]  # build(num_features, gamma0=..., eps=..., momentum=...)
    has_gamma: bool
    has_beta: bool
    batch_stats: bool
    doc: str
    param_roles: tuple = ()  # ((attribute, role), ...); empty: derived from has_gamma/has_beta

    def roles(self) -> dict[str, str]:
        """{attribute name: "scale" | "shift"} of the layer's learnable parameters."""
        if self.param_roles:
            return dict(self.param_roles)
        return {**({"weight": "scale"} if self.has_gamma else {}), **({"bias": "shift"} if self.has_beta else {})}


NORMS: dict[str, NormSpec] = {}


ROLES = ("scale", "shift")


def register_norm(name: str, *, has_gamma: bool, has_beta: bool, batch_stats: bool, doc: str,
                  param_roles: dict[str, str] | None = None):
    def deco(build):
        if name in NORMS:
            raise ValueError(f"norm {name!r} is registered twice")
        bad = {r for r in (param_roles or {}).values() if r not in ROLES}
        if bad:
            raise ValueError(f"norm {name!r}: param_roles {sorted(bad)} unknown; valid roles: {list(ROLES)}")
        NORMS[name] = NormSpec(name, build, has_gamma, has_beta, batch_stats, doc,
                               tuple(sorted((param_roles or {}).items())))
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


@register_norm("affine_bn_init", has_gamma=True, has_beta=True, batch_stats=False,
               doc="P1's initialization test: AffineLayer with γ, β set once from one training batch's "
                   "statistics (at step 0 it computes BN's output on that batch), then no statistics")
def _affine_bn_init(num_features, gamma0=1.0, eps=1e-5, momentum=0.1):
    return BatchInitAffine2d(num_features, gamma0, eps)


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
        return tag_norm(spec.build(num_features, gamma0=gamma0, eps=eps, momentum=momentum), spec)

    norm_layer.spec = spec  # the factory reads has_gamma etc. from here
    return norm_layer


def tag_norm(layer: nn.Module, spec: NormSpec) -> nn.Module:
    """Mark `layer` as a norm layer built from `spec`: models find norm layers and the roles of
    their parameters by this mark, not by isinstance (plain strings and dicts, so the mark
    survives copy.deepcopy and pickling)."""
    layer._bnlib_norm = spec.name
    layer._bnlib_roles = spec.roles()
    return layer
