"""The normalization layers P3 compares with BatchNorm (Awais et al. 2021): BN with injected
noise, GroupNorm/LayerNorm, Batch Renormalization and ghost BN, and the fp32 batch-norm helpers
they share with the ICS-free schemes (bnlib/ics_free.py).

The registry entries that build them by name are in bnlib/norms.py; their options are run
parameters (bnlib.config.RunConfig, `# --- model ---`), one default each, filled in by
`bnlib.norms.get_norm`. Shapes: x is (N, C, H, W); per-channel vectors are (C,).

The four BatchNorm2d subclasses keep PyTorch's conventions (running statistics r <- (1 - m)·r
+ m·stat with the unbiased batch variance, normalization with the biased one, eval mode uses
the running statistics), so `bnlib.bnstats` (precise evaluation statistics) treats them as BN.
They normalize with PyTorch's fused batch-norm kernel and apply what they add (noise, the
renormalization's r and d with γ, β) in fp32, returning the input's dtype (under bf16
autocast, bf16, as nn.BatchNorm2d does), so every arm of a study runs at one precision.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["NoisyBatchNorm2d", "GroupNorm2d", "BatchRenorm2d", "GhostBatchNorm2d", "NOISE_PER", "acc_dtype",
           "batch_norm", "update_running", "renormalize"]

NOISE_PER = ("layer", "channel")  # noisy_bn: what one draw of (μ, σ) covers


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for bf16/fp16 activations (what the kernel accumulates in), else their own (fp64 in
    probes that run the net in double precision)."""
    return torch.promote_types(dtype, torch.float32)


def batch_norm(x: torch.Tensor, eps: float, weight=None, bias=None):
    """PyTorch's train-mode batch norm of x (its fused kernel: ~15x faster on CPU than a
    hand-written fp32 reduction) and the batch's per-channel mean and unbiased variance, (C,)
    fp32, no gradient: with momentum 1 the kernel's running-statistics update writes exactly
    the batch statistics into the two scratch buffers it is given."""
    c, acc = x.shape[1], acc_dtype(x.dtype)
    mean = torch.zeros(c, device=x.device, dtype=acc)
    var = torch.ones(c, device=x.device, dtype=acc)
    y = F.batch_norm(x, mean, var, weight, bias, True, 1.0, eps)
    return y, mean, var


@torch.no_grad()
def update_running(bn: nn.BatchNorm2d, mean: torch.Tensor, var_unbiased: torch.Tensor) -> None:
    """PyTorch's update: r <- (1 - m)·r + m·stat (m = None: cumulative average), counter + 1."""
    bn.num_batches_tracked.add_(1)
    m = bn.momentum if bn.momentum is not None else 1.0 / bn.num_batches_tracked.float()
    bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), m)
    bn.running_var.lerp_(var_unbiased.to(bn.running_var.dtype), m)


class NoisyBatchNorm2d(nn.BatchNorm2d):
    """BN followed by Santurkar et al. 2018's "noisy BN" (NeurIPS, Sec. 2.1 and App. A): after
    the normalization and γ, β, every activation is perturbed, a <- s·a + m, by noise with a
    non-zero mean and non-unit variance that changes at every step, so that the distribution of
    the next layer's inputs shifts from step to step by more than BN removes (deliberate ICS).

    Per layer and step (`noise_per='layer'`; 'channel' draws them per channel instead):
    μ ~ U(-noise_mean_range, noise_mean_range), σ ~ U(1, noise_scale_max); per element
    m ~ U(μ - noise_mean_spread, μ + noise_mean_spread), s ~ N(σ, noise_scale_std²).
    Santurkar et al.'s values (0.5, 1.25, 0.1, 0.1) are the defaults; whether they drew μ, σ
    once per layer or per unit is not certain from the paper, hence `noise_per`.

    Train mode draws the noise; eval mode applies its expectation (E[s]·a, see forward). The noise is drawn from torch's global
    generator on the activation's device, so it is seeded by the run's seed, saved in its
    checkpoints, and probes (which save and restore every RNG) leave training bit-identical. The
    noise is a constant of the forward pass (no gradient flows into it)."""

    def __init__(self, num_features: int, eps: float, momentum: float, *, noise_mean_range: float,
                 noise_scale_max: float, noise_mean_spread: float, noise_scale_std: float, noise_per: str):
        super().__init__(num_features, eps=eps, momentum=momentum)
        if noise_per not in NOISE_PER:
            raise ValueError(f"noise_per={noise_per!r}; valid choices: {list(NOISE_PER)}")
        if noise_scale_max < 1 or min(noise_mean_range, noise_mean_spread, noise_scale_std) < 0:
            raise ValueError("noisy_bn needs noise_scale_max >= 1 and noise_mean_range, noise_mean_spread, "
                             "noise_scale_std >= 0")
        self.noise_mean_range, self.noise_scale_max = float(noise_mean_range), float(noise_scale_max)
        self.noise_mean_spread, self.noise_scale_std = float(noise_mean_spread), float(noise_scale_std)
        self.noise_per = noise_per

    def perturb(self, a: torch.Tensor) -> torch.Tensor:
        """s·a + m with freshly drawn noise (drawn in fp32, fp64 for fp64 a; the result has a's dtype)."""
        shape = (1, a.shape[1], 1, 1) if self.noise_per == "channel" else (1, 1, 1, 1)
        acc = acc_dtype(a.dtype)
        u = torch.rand((2, *shape), device=a.device, dtype=acc)  # one (μ, σ) per layer or channel
        mu = (2 * u[0] - 1) * self.noise_mean_range
        sigma = 1 + (self.noise_scale_max - 1) * u[1]
        m = mu + (2 * torch.rand(a.shape, device=a.device, dtype=acc) - 1) * self.noise_mean_spread
        s = sigma + torch.randn(a.shape, device=a.device, dtype=acc) * self.noise_scale_std
        return torch.addcmul(m, a.to(acc), s).to(a.dtype)

    def expected_scale(self) -> float:
        """E[s] = E[σ] = (1 + noise_scale_max)/2 (E[m] = E[μ] = 0): the noise's mean effect."""
        return (1 + self.noise_scale_max) / 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if self.training:
            return self.perturb(y)
        # Eval mode: the noise's expectation, a <- E[s]·a + E[m] = (1 + σ_max)/2 · a, as dropout
        # evaluates with its expected mask. Santurkar et al. inject the noise to perturb
        # training and report it trains like BN; they do not say the test network is noisy. Plain
        # BN here (the earlier choice) evaluates a different network from the one trained: with
        # E[s] = 1.125 after each of ResNet-18's 20 norms the trained net's activations are
        # larger by up to 1.125^k at depth k, and the quick preset measured train accuracy 0.62
        # vs test 0.27. The running statistics are those of the (noisy) training inputs, as BN's.
        return y * self.expected_scale()

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, noise: μ~U(±{self.noise_mean_range}) σ~U(1, {self.noise_scale_max}) "
                f"per {self.noise_per}, m~U(μ±{self.noise_mean_spread}), s~N(σ, {self.noise_scale_std}²)")


def renormalize(bn: nn.BatchNorm2d, x: torch.Tensor, reference, r_max=None, d_max=None):
    """Batch Renormalization's train-mode transform (Ioffe 2017, Alg. 1) against the reference
    statistics (ref_mean, ref_std) = reference(μ_B, σ²_B) ((C,) fp32, no gradient):

        x̂ = (x - μ_B)/σ_B · r + d,  r = sg(σ_B/σ_ref) clipped to [1/r_max, r_max],
                                    d = sg((μ_B - μ_ref)/σ_ref) clipped to [-d_max, d_max]

    (sg: stop-gradient). Unclipped, the forward value is exactly (x - μ_ref)/σ_ref while the
    gradient flows through μ_B, σ_B as in BN, scaled by r. Updates the running statistics with
    the batch's. Returns γ·x̂ + β in x's dtype, and the batch's μ_B, biased σ²_B (detached)."""
    xhat, mean, var_unbiased = batch_norm(x, bn.eps)  # (x - μ_B)/σ_B, BN's gradient
    n = x.numel() // x.shape[1]
    var = var_unbiased * ((n - 1) / n)  # biased: what the normalization divides by
    ref_mean, ref_std = reference(mean, var)
    std = torch.sqrt(var + bn.eps)
    r, d = std / ref_std, (mean - ref_mean) / ref_std
    if r_max is not None:
        r = torch.minimum(torch.maximum(r, 1 / r_max), r_max)
        d = torch.minimum(torch.maximum(d, -d_max), d_max)
    scale, shift = (r, d) if bn.weight is None else (bn.weight * r, bn.weight * d + bn.bias)  # γ·x̂ + β
    # the per-channel affine in fp32, as the fused BN kernel applies γ, β, then x's dtype
    y = torch.addcmul(shift.view(1, -1, 1, 1), xhat.to(acc_dtype(x.dtype)), scale.view(1, -1, 1, 1)).to(x.dtype)
    update_running(bn, mean, var_unbiased)
    return y, mean, var


class BatchRenorm2d(nn.BatchNorm2d):
    """Batch Renormalization (Ioffe 2017): BN whose train-mode output is corrected towards the
    running statistics, x̂ = (x - μ_B)/σ_B·r + d, r = sg(σ_B/σ) clipped to [1/r_max, r_max],
    d = sg((μ_B - μ)/σ) clipped to [-d_max, d_max], μ, σ² the running statistics (σ =
    √(running_var + ε); Ioffe averages σ itself, bnlib keeps PyTorch's running variance so that
    eval mode and precise statistics are BN's). With r_max = 1, d_max = 0 it is BN.

    Ioffe starts at r_max = 1, d_max = 0 and relaxes them to 3 and 5 over tens of thousands of
    steps, once the running averages are reliable. bnlib's runs are hundreds of steps, so the
    limits grow linearly from (1, 0) at the first step to (renorm_r_max, renorm_d_max) over
    `renorm_warmup_steps` train-mode steps (counted by num_batches_tracked), 0: fixed limits
    from the start. The default 100 steps is ~10 time constants of the running averages at
    momentum 0.1: by then their initial values (0, 1) weigh 0.9^100 ≈ 3e-5."""

    def __init__(self, num_features: int, eps: float, momentum: float, *, renorm_r_max: float,
                 renorm_d_max: float, renorm_warmup_steps: int):
        super().__init__(num_features, eps=eps, momentum=momentum)
        if renorm_r_max < 1 or renorm_d_max < 0 or renorm_warmup_steps < 0:
            raise ValueError("batch_renorm needs renorm_r_max >= 1, renorm_d_max >= 0, renorm_warmup_steps >= 0")
        self.r_max, self.d_max, self.warmup_steps = float(renorm_r_max), float(renorm_d_max), int(renorm_warmup_steps)

    def limits(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(r_max, d_max) at the current step, as tensors (no host synchronization)."""
        t = self.num_batches_tracked.float()
        f = (t / self.warmup_steps).clamp(max=1.0) if self.warmup_steps else torch.ones_like(t)
        return 1 + (self.r_max - 1) * f, self.d_max * f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        r_max, d_max = self.limits()
        running = (self.running_mean.clone(), torch.sqrt(self.running_var + self.eps))
        return renormalize(self, x, lambda mean, var: running, r_max, d_max)[0]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}, warmup_steps={self.warmup_steps}"


class GhostBatchNorm2d(nn.BatchNorm2d):
    """Ghost BN (Hoffer et al. 2017, "Train longer, generalize better", Alg. 1): in train mode
    the batch is split, in its order, into virtual batches of `ghost_batch_size` samples, each
    normalized with its own statistics. A batch of N <= ghost_batch_size is one virtual batch
    (BN); when ghost_batch_size does not divide N (probe batches, a ragged last batch) the
    remainder joins the last virtual batch, so none is smaller than ghost_batch_size.
    (bnlib.config requires ghost_batch_size to divide the training batch_size.)

    Running statistics are updated once per step, with the mean over the virtual batches of
    their means and of their unbiased variances (an unbiased estimate of the population
    variance), so `bn_momentum` has the same per-step meaning as in BN and a single virtual
    batch gives BN's running statistics exactly. Eval mode is BN's."""

    def __init__(self, num_features: int, eps: float, momentum: float, *, ghost_batch_size: int):
        super().__init__(num_features, eps=eps, momentum=momentum)
        if ghost_batch_size < 1:
            raise ValueError(f"ghost_batch_size={ghost_batch_size}: must be >= 1")
        self.ghost_batch_size = int(ghost_batch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        n, g = x.shape[0], self.ghost_batch_size
        k = max(1, n // g)
        sizes = [g] * (k - 1) + [n - g * (k - 1)]
        outs, means, vars_ = [], [], []
        for xc in torch.split(x, sizes):
            y, mean, var = batch_norm(xc, self.eps, self.weight, self.bias)
            outs.append(y)
            means.append(mean)
            vars_.append(var)
        update_running(self, torch.stack(means).mean(0), torch.stack(vars_).mean(0))
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ghost_batch_size={self.ghost_batch_size}"


class GroupNorm2d(nn.GroupNorm):
    """GroupNorm (Wu & He 2018): per sample, the channels split into `groups` groups of C/groups
    consecutive channels, each normalized over (C/groups, H, W); learnable per-channel γ, β; no
    batch statistics, so train and eval mode agree. groups=1 is LayerNorm over (C, H, W) with a
    per-channel affine (what `layer_norm` builds); groups=C is InstanceNorm.

    A layer whose channel count `groups` does not divide gets gcd(groups, C) groups (e.g. 8
    requested, 4 channels: 4 groups). bnlib.config refuses a run where that would happen, so a
    run's recorded norm_groups is what every layer uses; the fallback serves direct use."""

    def __init__(self, num_channels: int, groups: int, eps: float):
        if groups < 1:
            raise ValueError(f"norm_groups={groups}: must be >= 1")
        super().__init__(math.gcd(int(groups), num_channels), num_channels, eps=eps)
        self.requested_groups = int(groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # under CUDA autocast group_norm runs in fp32: return the activation's dtype, as BN does
        return super().forward(x).to(x.dtype)
