"""Normalization layers by name: the word a user types (`-p norm affine`) is the registry key.

Conventions (PyTorch's, stated once here): for x of shape (N, C, H, W), BatchNorm in train
mode normalizes with per-channel batch statistics over (N, H, W) and updates running
statistics as r <- (1 - momentum) * r + momentum * stat (momentum 0.1, eps 1e-5); in eval
mode it uses the running statistics.

Each registry entry builds a `norm_layer(num_features) -> nn.Module`, the callable the ResNet
factory injects (as torchvision's resnet.py does). A new variant is one `@register_norm` entry.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .bn_variants import BatchRenorm2d, GhostBatchNorm2d, GroupNorm2d, NOISE_PER, NoisyBatchNorm2d
from .ics_free import IcsFreeBatchNorm2d, StaleBatchNorm2d, attach_reference_pass
from .params import Param
from .plugins import check_unique, entry_source

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
    edit elsewhere. Default: weight -> scale when has_gamma, bias -> shift when has_beta.

    `options` declares the run parameters the entry's build reads besides γ0, ε and momentum,
    name -> bnlib.params.Param (type, default, range, help), e.g. {"norm_groups": Param(8, ...)}:
    bnlib.config assembles RunConfig from them, `get_norm` passes them (their defaults when not
    given) and bnlib.models.build_model takes them from the run's config, so a norm with options
    is one entry here. `check(cfg, model)` returns error lines for
    option values that are in range but do not fit the rest of the run (bnlib.config.validate
    calls it; `model()` builds the run's network on the meta device).

    `attach(model)`, when set, is the norm's model-level part: the model factory
    (bnlib.models.ResNet) calls it once on the finished network, after initialization, e.g. to
    add state or hooks that need the whole network (ics_free's reference pass with the previous
    step's parameters, bnlib.ics_free.attach_reference_pass). Whatever it adds must live in
    the network (buffers: checkpointed, copied by probes) and work on a deep copy of it, so the
    training loop needs no edit per norm."""

    name: str
    build: Callable[..., nn.Module]  # build(num_features, gamma0=..., eps=..., momentum=...)
    has_gamma: bool
    has_beta: bool
    batch_stats: bool
    doc: str
    param_roles: tuple = ()  # ((attribute, role), ...); empty: derived from has_gamma/has_beta
    options: dict = field(default_factory=dict, compare=False)  # name -> Param, passed to build as keywords
    check: Callable[[dict, Callable[[], nn.Module]], list] | None = None
    attach: Callable[[nn.Module], object] | None = None  # attach(network), once, by the model factory
    # the implementation's version: raise it when the entry computes something else under the
    # same name, so its runs get new ids (bnlib.records.run_id hashes it when it is not 1)
    version: int = 1
    # where it was defined: None for bnlib's own, else a plugin's file and its sha256 (run_id hashes it)
    source: dict | None = field(default=None, compare=False)

    def roles(self) -> dict[str, str]:
        """{attribute name: "scale" | "shift"} of the layer's learnable parameters."""
        if self.param_roles:
            return dict(self.param_roles)
        return {**({"weight": "scale"} if self.has_gamma else {}), **({"bias": "shift"} if self.has_beta else {})}


NORMS: dict[str, NormSpec] = {}


ROLES = ("scale", "shift")


def register_norm(name: str, *, has_gamma: bool, has_beta: bool, batch_stats: bool, doc: str,
                  param_roles: dict[str, str] | None = None, options: dict | None = None, check=None, attach=None,
                  version: int = 1):
    """Register a norm (see NormSpec); used as a decorator on its build function. Also from a
    plugin (bnlib.plugins): the entry then records the plugin's file and content hash."""
    def deco(build):
        source = entry_source(build)
        check_unique("norm", NORMS, name, source)
        bad = {r for r in (param_roles or {}).values() if r not in ROLES}
        if bad:
            raise ValueError(f"norm {name!r}: param_roles {sorted(bad)} unknown; valid roles: {list(ROLES)}")
        NORMS[name] = NormSpec(name, build, has_gamma, has_beta, batch_stats, doc,
                               tuple(sorted((param_roles or {}).items())), dict(options or {}), check, attach,
                               int(version), source)
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


# ----------------------------------------------------------------------------------------------
# P3 (Awais et al. 2021): BN with injected noise, an ICS-free scheme, and BN's variants compared
# on ICS. The layers and the reasons for each choice are in bnlib/bn_variants.py and bnlib/ics_free.py.
# ----------------------------------------------------------------------------------------------

@register_norm("noisy_bn", has_gamma=True, has_beta=True, batch_stats=True,
               doc="BN followed by Santurkar et al. 2018's time-varying noise a <- s·a + m (non-zero mean, "
                   "non-unit scale, redrawn every train-mode step; none in eval): BN with deliberate ICS",
               options={
                   "noise_mean_range": Param(0.5, "noisy_bn: per layer and step the noise mean μ ~ U(-a, a) "
                                             "(Santurkar et al. 2018: 0.5)", lo=0),
                   "noise_scale_max": Param(1.25, "noisy_bn: per layer and step the noise scale σ ~ U(1, b) "
                                            "(Santurkar: 1.25)", lo=1),
                   "noise_mean_spread": Param(0.1, "noisy_bn: per element the additive noise m ~ U(μ - r, μ + r) "
                                              "(Santurkar: 0.1)", lo=0),
                   "noise_scale_std": Param(0.1, "noisy_bn: per element the multiplicative noise s ~ N(σ, r²) "
                                            "(Santurkar: 0.1)", lo=0),
                   "noise_per": Param("layer", "noisy_bn: μ, σ drawn once per layer per step ('layer', as the P3 "
                                      "spec reads Santurkar) or per channel per step ('channel')", choices=NOISE_PER)})
def _noisy_bn(num_features, gamma0=1.0, eps=1e-5, momentum=0.1, **noise):
    return _set_gamma(NoisyBatchNorm2d(num_features, eps, momentum, **noise), gamma0)


@register_norm("ics_free", has_gamma=True, has_beta=True, batch_stats=True,
               doc="P3's ICS-free scheme (bnlib's choice): BN whose forward normalizes each batch with the "
                   "statistics BN computes on the same batch with the previous step's parameters (a no-gradient "
                   "reference pass), so it removes every earlier update's shift but not the latest one's, while "
                   "its gradient is BN's (batch renormalization against those statistics, unclipped); one extra "
                   "forward per step",
               attach=attach_reference_pass,
               version=2)  # 2: the reference-pass scheme (version 1 under this name was ics_free_stale's)
def _ics_free(num_features, gamma0=1.0, eps=1e-5, momentum=0.1):
    return _set_gamma(IcsFreeBatchNorm2d(num_features, eps, momentum), gamma0)


@register_norm("ics_free_stale", has_gamma=True, has_beta=True, batch_stats=True,
               doc="P3's first ICS-free scheme, kept as a measured negative result: BN whose forward normalizes "
                   "with the previous batch's statistics (BN's gradient); diverges at every rate in a deep net "
                   "(stale statistics are differenced in time at every layer, bnlib.ics_free.StaleBatchNorm2d)")
def _ics_free_stale(num_features, gamma0=1.0, eps=1e-5, momentum=0.1):
    return _set_gamma(StaleBatchNorm2d(num_features, eps, momentum), gamma0)


def _check_groups(cfg: dict, model: Callable[[], nn.Module]) -> list[str]:
    # every group-normalized layer must get exactly norm_groups groups (GroupNorm2d would fall
    # back to gcd(groups, C)): the run's recorded norm_groups is then what it ran
    chans = sorted({m.num_channels for m in model().modules() if isinstance(m, GroupNorm2d)})
    g = cfg["norm_groups"]
    if not chans or all(c % g == 0 for c in chans):
        return []
    common = math.gcd(*chans)
    return [f"norm_groups={g}: does not divide every channel count of {cfg['arch']} at width={cfg['width']} "
            f"({chans}); valid choices here: {[d for d in range(1, common + 1) if common % d == 0]}, or change "
            f"width"]


@register_norm("group_norm", has_gamma=True, has_beta=True, batch_stats=False,
               doc="GroupNorm (Wu & He 2018): per sample, each of norm_groups groups of channels normalized "
                   "over (C/groups, H, W); per-channel γ, β; no batch statistics",
               options={"norm_groups": Param(8, "group_norm: groups of channels (Wu & He 2018 use 32; must divide every "
                                                "channel count of the net at its width)", lo=1)},
               check=_check_groups)
def _group_norm(num_features, gamma0=1.0, eps=1e-5, momentum=0.1, *, norm_groups):
    return _set_gamma(GroupNorm2d(num_features, norm_groups, eps), gamma0)


@register_norm("layer_norm", has_gamma=True, has_beta=True, batch_stats=False,
               doc="LayerNorm over channels: per sample over (C, H, W) (GroupNorm with one group), "
                   "per-channel γ, β; no batch statistics")
def _layer_norm(num_features, gamma0=1.0, eps=1e-5, momentum=0.1):
    return _set_gamma(GroupNorm2d(num_features, 1, eps), gamma0)


@register_norm("batch_renorm", has_gamma=True, has_beta=True, batch_stats=True,
               doc="Batch Renormalization (Ioffe 2017): BN corrected towards the running statistics by "
                   "r in [1/renorm_r_max, renorm_r_max], d in [-renorm_d_max, renorm_d_max] (no gradient), "
                   "limits ramped from (1, 0) over renorm_warmup_steps",
               options={
                   "renorm_r_max": Param(3.0, "batch_renorm: r clipped to [1/r_max, r_max] (Ioffe 2017's final "
                                         "value 3; 1: BN)", lo=1),
                   "renorm_d_max": Param(5.0, "batch_renorm: d clipped to [-d_max, d_max] (Ioffe 2017's final "
                                         "value 5; 0: BN)", lo=0),
                   "renorm_warmup_steps": Param(100, "batch_renorm: steps over which the limits grow linearly from "
                                                "(1, 0) to (r_max, d_max) (0: fixed from the start)", lo=0)})
def _batch_renorm(num_features, gamma0=1.0, eps=1e-5, momentum=0.1, **limits):
    return _set_gamma(BatchRenorm2d(num_features, eps, momentum, **limits), gamma0)


def _check_ghost(cfg: dict, model: Callable[[], nn.Module]) -> list[str]:
    # every training step splits into equal virtual batches (Hoffer et al. 2017); equal to the
    # batch size it is one virtual batch, i.e. BN (a control arm)
    g, b = cfg["ghost_batch_size"], cfg["batch_size"]
    if b % g == 0:
        return []
    return [f"ghost_batch_size={g}: must divide batch_size={b} (each training batch splits into equal virtual "
            f"batches); valid choices here: {[d for d in range(2, b + 1) if b % d == 0]}"]


@register_norm("ghost_bn", has_gamma=True, has_beta=True, batch_stats=True,
               doc="ghost BN (Hoffer et al. 2017): BN over virtual batches of ghost_batch_size samples in "
                   "training; running statistics averaged over them; eval as BN",
               options={"ghost_batch_size": Param(32, "ghost_bn: samples per virtual batch (must divide batch_size; "
                                                     "= batch_size: BN)", lo=2)},
               check=_check_ghost)
def _ghost_bn(num_features, gamma0=1.0, eps=1e-5, momentum=0.1, *, ghost_batch_size):
    return _set_gamma(GhostBatchNorm2d(num_features, eps, momentum, ghost_batch_size=ghost_batch_size), gamma0)


def get_norm(name: str, gamma0: float = 1.0, eps: float = 1e-5,
             momentum: float = 0.1, **options) -> Callable[[int], nn.Module]:
    """Return `norm_layer(num_features)` for a registry name; unknown names raise ValueError.
    `options` are the entry's own run parameters (NormSpec.options); those not given take their
    RunConfig default, others are refused."""
    if name not in NORMS:
        raise ValueError(f"norm={name!r} is not a known norm; valid choices: {norm_names()}")
    spec = NORMS[name]
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise ValueError(f"norm={name!r} takes no option(s) {unknown}; its options: {list(spec.options)}")
    options = {**{k: p.default for k, p in spec.options.items()}, **options}

    def norm_layer(num_features: int) -> nn.Module:
        return tag_norm(spec.build(num_features, gamma0=gamma0, eps=eps, momentum=momentum, **options), spec)

    norm_layer.spec = spec  # the factory reads has_gamma etc. from here
    return norm_layer


def tag_norm(layer: nn.Module, spec: NormSpec) -> nn.Module:
    """Mark `layer` as a norm layer built from `spec`: models find norm layers and the roles of
    their parameters by this mark, not by isinstance (plain strings and dicts, so the mark
    survives copy.deepcopy and pickling)."""
    layer._bnlib_norm = spec.name
    layer._bnlib_roles = spec.roles()
    return layer
