"""P3's ICS-free schemes (Awais et al. 2021): BN that keeps everything of BN but its reduction of
internal covariate shift. `ics_free` normalizes each batch with the statistics BN computes on it
with the previous step's parameters (a no-gradient reference pass over the whole network);
`ics_free_stale`, the superseded first scheme, with the previous batch's statistics.

Registered by name in bnlib/norms.py. Shapes: x is (N, C, H, W); per-channel vectors are (C,).
Both keep PyTorch's BatchNorm2d conventions (bnlib/bn_variants.py says which).
"""
from __future__ import annotations

import torch
from torch import nn

from .bn_variants import batch_norm, renormalize

__all__ = ["IcsFreeBatchNorm2d", "ReferenceSnapshot", "attach_reference_pass", "StaleBatchNorm2d", "REFERENCE_MODULE"]


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
            y, mean, var_unbiased = batch_norm(x, self.eps, self.weight, self.bias)
            n = x.numel() // x.shape[1]
            self.reference = (mean, var_unbiased * ((n - 1) / n))  # biased, as renormalize's σ_B
            return y
        if self.reference is None:  # no reference pass: plain BN (see the class docstring)
            return super().forward(x)
        ref_mean, ref_var = self.reference
        ref_std = torch.sqrt(ref_var + self.eps)
        return renormalize(self, x, lambda mean, var: (ref_mean, ref_std))[0]


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

        y, mean, var = renormalize(self, x, previous_batch)
        with torch.no_grad():
            self.stale_mean.copy_(mean)
            self.stale_var.copy_(var)
        return y
