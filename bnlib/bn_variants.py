"""The normalization layers P3 compares with BatchNorm (Awais et al. 2021): BN with injected
noise, an ICS-free scheme, GroupNorm/LayerNorm, Batch Renormalization and ghost BN.

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

__all__ = ["NoisyBatchNorm2d", "IcsFreeBatchNorm2d", "ReferenceSnapshot", "attach_reference_pass",
           "StaleBatchNorm2d", "GroupNorm2d", "BatchRenorm2d", "GhostBatchNorm2d", "NOISE_PER"]

NOISE_PER = ("layer", "channel")  # noisy_bn: what one draw of (μ, σ) covers


def _acc(dtype: torch.dtype) -> torch.dtype:
    """fp32 for bf16/fp16 activations (what the kernel accumulates in), else their own (fp64 in
    probes that run the net in double precision)."""
    return torch.promote_types(dtype, torch.float32)


def _batch_norm(x: torch.Tensor, eps: float, weight=None, bias=None):
    """PyTorch's train-mode batch norm of x (its fused kernel: ~15x faster on CPU than a
    hand-written fp32 reduction) and the batch's per-channel mean and unbiased variance, (C,)
    fp32, no gradient: with momentum 1 the kernel's running-statistics update writes exactly
    the batch statistics into the two scratch buffers it is given."""
    c, acc = x.shape[1], _acc(x.dtype)
    mean = torch.zeros(c, device=x.device, dtype=acc)
    var = torch.ones(c, device=x.device, dtype=acc)
    y = F.batch_norm(x, mean, var, weight, bias, True, 1.0, eps)
    return y, mean, var


@torch.no_grad()
def _update_running(bn: nn.BatchNorm2d, mean: torch.Tensor, var_unbiased: torch.Tensor) -> None:
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
        acc = _acc(a.dtype)
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


def _renormalize(bn: nn.BatchNorm2d, x: torch.Tensor, reference, r_max=None, d_max=None):
    """Batch Renormalization's train-mode transform (Ioffe 2017, Alg. 1) against the reference
    statistics (ref_mean, ref_std) = reference(μ_B, σ²_B) ((C,) fp32, no gradient):

        x̂ = (x - μ_B)/σ_B · r + d,  r = sg(σ_B/σ_ref) clipped to [1/r_max, r_max],
                                    d = sg((μ_B - μ_ref)/σ_ref) clipped to [-d_max, d_max]

    (sg: stop-gradient). Unclipped, the forward value is exactly (x - μ_ref)/σ_ref while the
    gradient flows through μ_B, σ_B as in BN, scaled by r. Updates the running statistics with
    the batch's. Returns γ·x̂ + β in x's dtype, and the batch's μ_B, biased σ²_B (detached)."""
    xhat, mean, var_unbiased = _batch_norm(x, bn.eps)  # (x - μ_B)/σ_B, BN's gradient
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
    y = torch.addcmul(shift.view(1, -1, 1, 1), xhat.to(_acc(x.dtype)), scale.view(1, -1, 1, 1)).to(x.dtype)
    _update_running(bn, mean, var_unbiased)
    return y, mean, var


class IcsFreeBatchNorm2d(nn.BatchNorm2d):
    """`ics_free`: BN that normalizes each batch with the statistics BN would have computed on
    that same batch with the previous training step's parameters, so it removes every earlier
    update's shift of its input but not the latest one's: BN without ICS reduction.

    Internal covariate shift as P3 measures it (Santurkar et al. 2018, Def. 2.1) is the change
    of layer i's gradient when only the layers before i take their latest update, on the same
    batch. BN reduces it, as far as it does, because its statistics are recomputed from the
    current activations, so a shift or rescaling of layer i's input caused by that update is
    divided out before layer i sees it. Here, at training step t, layer i normalizes with
    reference statistics μ_ref, σ²_ref: those of its input in a no-gradient pass of the SAME
    batch through the network with the parameters θ_{t-1} of the previous training forward,
    every layer normalizing as plain BN in that pass (`attach_reference_pass`). The current
    activations differ from that reference only by what the last update of the earlier layers
    did, which is exactly the shift ICS measures; it reaches layer i undamped, as without
    normalization. Equivalently, the training forward is BN's network at θ_{t-1} on this batch
    with its normalization constants frozen, evaluated at θ_t: at θ_t = θ_{t-1} it is BN.

    Why this, not the previous batch's statistics (`ics_free_stale`, StaleBatchNorm2d): there
    each layer differenced its input's scale in time and batch-to-batch noise grew ~2^depth
    (diverged at every rate). Here the reference sees the same batch (no batch noise) and is a
    plain-BN network (no per-layer time difference): the offset of layer i's output from zero
    mean and unit variance is one step's update of the layers below, first order in the learning
    rate, whatever the depth, and every earlier step's shift is removed, since the reference is
    renewed every step: BN's control of activation scale is kept. Why plain BN in the reference
    pass, not the scheme itself: the scheme's reference would need θ_{t-2}, and so on back to
    initialization (one pass per past step, or the time differencing again); plain BN ends the
    regress after one pass and makes the reference exactly "BN, minus the latest update".

    The gradient is BN's: Batch Renormalization (Ioffe 2017) against the reference, unclipped,
    x̂ = (x − μ_B)/σ_B·r + d, r = sg(σ_B/σ_ref), d = sg((μ_B − μ_ref)/σ_ref) (sg: stop-gradient),
    whose forward value is exactly (x − μ_ref)/σ_ref while the gradient flows through the
    current batch's μ_B, σ_B as in BN, times r. So the input gradient has no component along the
    batch mean or along x̂, the preceding conv's weight gradient is orthogonal to its weights
    (scale invariance of the update, as under BN), and the normalization the gradient does not
    see cannot blow a bias up (Ioffe & Szegedy 2015, Sec. 2). γ, β, the running statistics (of
    the current batch, as BN's) and eval mode are BN's.

    State and special cases. The snapshot θ_{t-1} is one copy of the parameters, held as
    buffers of a `ReferenceSnapshot` submodule of the network (`ics_free_reference`): saved
    in checkpoints, so a resumed run is identical, and copied and restored with the model by
    probes (bnlib.probes restores every buffer before each evaluation: their forwards neither
    advance the real model's snapshot nor their copy's between evaluations). It starts as the
    constructed network's parameters, so the first step is BN (r = 1, d = 0). Only a train-mode
    forward with gradients enabled is a training step: it runs the reference pass, then copies
    the current parameters into the snapshot. A train-mode forward without gradients (precise
    evaluation statistics, bnlib.bnstats; no-gradient probes) is plain BN with the current
    parameters, i.e. the reference of a step with no previous one, and leaves the snapshot
    alone, so precise statistics are BN's at the final weights, which eval mode uses. The layer
    used outside a network built by bnlib.models (no reference pass) is plain BN. Forward hooks
    on submodules also see the reference pass (it runs first, inside the network's call). The
    reference pass runs under the caller's autocast and memory format, like the real one, so
    with unchanged parameters both compute bit-for-bit the same statistics (r = 1, d = 0
    exactly on a deterministic backend) and precision differences are not mistaken for ICS; it
    forks the RNG (dropout draws the same masks in both passes, the training stream is
    unchanged) and restores every other buffer afterwards (input_norm='bn''s running statistics
    are updated once per step). Cost: one extra no-gradient forward per training
    step, one extra copy of the parameters (measured on the P3 quick model, CPU, fp32: a step
    ≈1.9x BN's, of which ≈0.45x is the reference pass and the rest the renormalization layer
    that batch_renorm and ics_free_stale also pay).

    Measured (P3 quick setting, seed 0, bf16): trains at every rate tried, test accuracy 0.55 at
    lr 0.02 (BN 0.58), 0.39 at 0.08 (BN 0.73), 0.18 at 0.32 (BN 0.70): it matches BN at small
    rates and loses the large ones, where one step's update, not divided out at any layer,
    compounds through depth (at 0.32 the deepest layers' output scale is off by 10^0.5-10^1
    within 5 steps; with a gradient that omits the factor r, i.e. exactly BN's backward, the
    accuracies are the same: 0.38 at 0.08, 0.17 at 0.32, so it is the forward). ICS probe from
    the same initialization (step 0, layers 6/11/16, relative ℓ2): 0.60/0.57/0.43 vs BN's
    0.55/0.52/0.39 at lr 0.02, 0.98/0.96/0.82 vs 0.89/0.92/0.75 at 0.08: larger at every layer
    and rate, so it does not reduce ICS the way BN does."""

    def __init__(self, num_features: int, eps: float, momentum: float):
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.reference = None  # (μ_ref, biased σ²_ref), (C,) fp32 (fp64 in fp64 nets), no gradient
        self.recording = False  # set by the reference pass: plain BN, record the batch statistics

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        if self.recording:  # the reference pass: BN with the batch's statistics, running ones untouched
            y, mean, var_unbiased = _batch_norm(x, self.eps, self.weight, self.bias)
            n = x.numel() // x.shape[1]
            self.reference = (mean, var_unbiased * ((n - 1) / n))  # biased, as _renormalize's σ_B
            return y
        if self.reference is None:  # no reference pass: plain BN (see the class docstring)
            return super().forward(x)
        ref_mean, ref_var = self.reference
        ref_std = torch.sqrt(ref_var + self.eps)
        return _renormalize(self, x, lambda mean, var: (ref_mean, ref_std))[0]


REFERENCE_MODULE = "ics_free_reference"  # attribute of the network holding the snapshot


class ReferenceSnapshot(nn.Module):
    """The parameters of the network's previous training forward, one buffer per parameter
    (named as the parameter with '.' -> '__'), for `ics_free`'s reference pass. Buffers, so
    they follow the network in .to(device), memory format, dtype, state_dict and deepcopy."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.names = []  # (parameter name, buffer name)
        for n, p in model.named_parameters():
            b = n.replace(".", "__")
            self.register_buffer(b, p.detach().clone())
            self.names.append((n, b))
        if len({b for _, b in self.names}) < len(self.names):
            raise ValueError("ReferenceSnapshot: two parameter names map to one buffer name")
        self.busy = False  # inside the reference pass (the network's hook does nothing then)

    def params(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, b) for n, b in self.names}

    @torch.no_grad()
    def take(self, model: nn.Module) -> None:
        """Copy the network's current parameters into the snapshot."""
        cur = dict(model.named_parameters())
        snap = [getattr(self, b) for _, b in self.names]
        torch._foreach_copy_(snap, [cur[n].detach() for n, _ in self.names])


@torch.compiler.disable  # eager, also under torch.compile: it swaps parameters and forks the RNG
def _reference_pass(model: nn.Module, args: tuple, kwargs: dict):
    """The network's forward pre-hook (attach_reference_pass): in a training forward, run the
    same input through the network with the snapshot's parameters (no gradient, every ics_free
    layer as plain BN recording its statistics), then take the snapshot of the current ones."""
    snap = getattr(model, REFERENCE_MODULE)
    if snap.busy:
        return None
    layers = [m for m in model.modules() if isinstance(m, IcsFreeBatchNorm2d)]
    if not (model.training and torch.is_grad_enabled()):
        for m in layers:
            m.reference = None
        return None
    own = {id(b) for b in snap.buffers()}
    # every other buffer is restored afterwards: the pass advances no state (e.g. running statistics)
    saved = [(b, b.detach().clone()) for b in model.buffers() if id(b) not in own]
    cur, old = dict(model.named_parameters()), snap.params()
    pairs = [(cur[n], old[n]) for n in cur]
    devices = sorted({p.device.index if p.device.index is not None else torch.cuda.current_device()
                      for p in model.parameters() if p.device.type == "cuda"})
    snap.busy = True
    for m in layers:
        m.recording = True
    # the previous parameters put in place by swapping storage with the snapshot (no copy; the
    # Parameter objects, which the optimizer holds, stay the same; torch.func.functional_call
    # is not used: it restores a module registered under two names, e.g. a block's bn2 and
    # last_norm, with the wrong tensors)
    try:
        with torch.no_grad():
            for p, s in pairs:
                p.data, s.data = s.data, p.data
            with torch.random.fork_rng(devices=devices):
                model(*args, **kwargs)
    finally:
        with torch.no_grad():
            for p, s in pairs:
                p.data, s.data = s.data, p.data
            for b, v in saved:
                b.copy_(v)
        snap.busy = False
        for m in layers:
            m.recording = False
    snap.take(model)
    return None


def attach_reference_pass(model: nn.Module) -> nn.Module:
    """`ics_free`'s model-level part (bnlib.norms.NormSpec.attach, called once by the model
    factory on the finished network): the parameter snapshot as submodule `ics_free_reference`
    and the forward pre-hook that runs the reference pass. A plain function as the hook (it gets
    the module it runs on), so a deep copy of the network hooks the copy, not the original."""
    if hasattr(model, REFERENCE_MODULE):
        raise ValueError("attach_reference_pass: the network already has a reference pass")
    setattr(model, REFERENCE_MODULE, ReferenceSnapshot(model))
    model.register_forward_pre_hook(_reference_pass, with_kwargs=True)
    return model


class StaleBatchNorm2d(nn.BatchNorm2d):
    """`ics_free_stale` (P3's first ICS-free scheme, superseded by `ics_free`, IcsFreeBatchNorm2d,
    and kept so that its measured instability stays reproducible): BN whose forward pass normalizes with the statistics of the previous
    train-mode batch (computed with the previous step's weights), not the current one's.

    Why this keeps BN's other properties and drops only ICS reduction. Internal covariate
    shift, as P3 measures it (Santurkar et al. 2018), is the change of layer i's gradient when
    the layers before it move to their updated weights, on the same batch. BN reduces it, as far
    as it does, because its statistics are recomputed from the current activations: a shift or
    rescaling of layer i's input caused by the last update of the layers below is divided out
    before layer i sees it. Here the statistics come from one step earlier (the previous batch,
    previous weights), so the normalization cannot react to the latest update: whatever shift
    the last step caused in a channel reaches the next layer unremoved, as without
    normalization. Over steps the statistics follow the activations (they are one step old), so
    every channel stays at zero mean and unit variance up to one step's change: BN's control of
    activation scale, which is what lets large learning rates work, is kept.

    The gradient is BN's. The layer is Batch Renormalization (Ioffe 2017) with the previous
    batch's statistics as reference and no clipping: x̂ = (x - μ_B)/σ_B·r + d with r = sg(σ_B/σ_prev),
    d = sg((μ_B - μ_prev)/σ_prev), whose forward value is exactly (x - μ_prev)/σ_prev while
    gradients flow through the current batch's μ_B, σ_B as in BN (times r = σ_B/σ_prev). So the
    input gradient is BN's Jacobian applied to the output gradient: it has no component along
    the batch mean or along x̂, hence the gradient of the preceding conv's weights is orthogonal
    to them as under BN (their norm can only grow, which shrinks the effective step: how BN
    tolerates large learning rates), the mechanism Santurkar et al. tie to a smoother landscape
    is kept, and the blow-up of a normalization the gradient does not see is avoided (Ioffe &
    Szegedy 2015, Sec. 2: a bias the normalization cancels grows without bound). Parameters
    (γ, β), running statistics and eval mode are BN's: the same network, only the source of the
    training-time statistics differs.

    The first train-mode forward has no previous batch and normalizes with its own statistics
    (then the layer is exactly BN). Every train-mode forward stores its batch's mean and biased
    variance in `stale_mean`, `stale_var` (buffers: checkpointed, and copied with the model by
    probes). Other choices that keep scale control without ICS reduction, e.g. the running
    averages as reference (batch_renorm with unbounded r_max, d_max: staler, ~1/momentum steps)
    or fixed random statistics per step (destroys scale control, which noisy_bn studies), were
    not taken: one step of staleness is the least change to BN that stops it from reacting to
    the update it is supposed to compensate.

    Measured: the scheme is unstable in a deep net at any learning rate, and not through a bug.
    The scale argument above holds for one layer; stacked, each layer outputs its input's scale
    relative to the previous step's (log-scale b_t^l = a_t^l − a_{t−1}^l, a^l its input's), and
    its input's scale is the previous layer's output, so b^{l+1}_t = b^l_t − b^l_{t−1}: depth
    applies a time difference per layer, and batch-to-batch noise at the bottom reaches layer l
    amplified ~2^l (the l-th difference of a noise series). ResNet-18 (width 1/8, Fashion-MNIST,
    batch 64) diverged within 5-20 steps at every rate tried, 1e-5 to 0.25, in fp32 and bf16, with
    channel variances of its last stage off by 1e2-1e7 from the previous step's (BN's: ≤1.35);
    tests/test_norms_p3.py checks the mechanism on a frozen 16-layer stack. A stable ICS-free
    scheme needs reference statistics that are BN's except for the latest update (a
    no-gradient pass with the previous weights on the current batch), not stale ones: that is
    IcsFreeBatchNorm2d, the `ics_free` norm."""

    def __init__(self, num_features: int, eps: float, momentum: float):
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.register_buffer("stale_mean", torch.zeros(num_features))
        self.register_buffer("stale_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        first = self.num_batches_tracked == 0  # no previous batch yet: BN on this one

        def previous_batch(mean, var):
            return (torch.where(first, mean, self.stale_mean),
                    torch.sqrt(torch.where(first, var, self.stale_var) + self.eps))

        y, mean, var = _renormalize(self, x, previous_batch)
        with torch.no_grad():
            self.stale_mean.copy_(mean)
            self.stale_var.copy_(var)
        return y


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
        return _renormalize(self, x, lambda mean, var: running, r_max, d_max)[0]

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
            y, mean, var = _batch_norm(xc, self.eps, self.weight, self.bias)
            outs.append(y)
            means.append(mean)
            vars_.append(var)
        _update_running(self, torch.stack(means).mean(0), torch.stack(vars_).mean(0))
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
