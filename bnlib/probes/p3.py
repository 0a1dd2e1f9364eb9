"""P3 probes (Awais et al. 2021, measuring as Santurkar et al. 2018, "How Does Batch Normalization
Help Optimization?", Sec. 2.2 and 3.1): internal covariate shift per conv layer (Def. 2.1) and the
loss landscape along the gradient (Sec. 3.1, Fig. 4)."""
from __future__ import annotations

import copy
import math

import torch

from ..models import conv_layers
from ..params import Param
from ..rng import get_state, same_state, set_state
from .registry import ProbeContext, n_convs, register_probe

__all__ = ["ics", "landscape"]


class _Evaluations:
    """Loss and gradients of the probe's copy on the current training batch, every evaluation
    from the same state: train mode (batch statistics, as the step computes them) with the
    model's buffers as they were when the probe started (BN running statistics, counters, any
    state a norm carries from step to step, which a train-mode forward would otherwise advance),
    and the same random draw of stochastic layers (noisy BN, dropout): the step's own draw, or
    with `fresh` the draw that follows it (the next step's)."""

    def __init__(self, ctx: ProbeContext):
        self.ctx, self.model = ctx, ctx.model
        self.buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        self.rng, self.rng_next = get_state(host=False), None  # torch CPU and every CUDA device

    def loss(self, fresh: bool = False) -> torch.Tensor:
        with torch.no_grad():
            for b, saved in self.buffers:
                b.copy_(saved)
        if fresh and self.rng_next is None:
            raise RuntimeError("a fresh draw is the one after the step's own: evaluate once without fresh first")
        set_state(self.rng_next if fresh else self.rng)
        out = self.ctx.loss_fn(self.model(self.ctx.x), self.ctx.y)
        if self.rng_next is None:
            self.rng_next = get_state(host=False)
        return out

    @property
    def stochastic(self) -> bool:
        """Whether the forward pass draws random numbers (known after the first evaluation)."""
        return self.rng_next is not None and not same_state(self.rng, self.rng_next)

    def grads(self, params: list, fresh: bool = False) -> tuple[float, list[torch.Tensor]]:
        loss = self.loss(fresh)
        gs = torch.autograd.grad(loss, params, allow_unused=True)
        return float(loss.detach()), [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, gs)]


def _upstream(t: torch.Tensor) -> set[int]:
    """ids of the leaf tensors (the parameters) that `t` depends on: the AccumulateGrad nodes
    reachable from t's autograd node. Read off the graph, so it holds for any architecture."""
    found, seen, stack = set(), set(), [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)  # keeps the node's Python object alive: identity stays valid
        if hasattr(fn, "variable"):
            found.add(id(fn.variable))
        stack += [f for f, _ in fn.next_functions]
    return found


def _step_lrs(ctx: ProbeContext) -> tuple[float, list[float]]:
    """The replayed update's step: (the weight group's lr, every group's lr). With
    probe_ics_lr unset, the run's current scheduled rates. With probe_ics_lr set, every group's
    lr is scaled so that the weight group's is probe_ics_lr, each group keeping its ratio to the
    weight group's base rate (gamma_lr_mult, bias_lr_mult, alpha_lr_mult): one absolute step
    for every arm, whatever rate it trains at (ICS grows with the step)."""
    groups = ctx.optimizer.param_groups
    # bnlib.optim names the weight group; another optimizer's: the group with the most elements
    w = next((g for g in groups if g.get("name") == "weight"), None) or \
        max(groups, key=lambda g: sum(p.numel() for p in g["params"]))
    fixed = ctx.cfg.get("probe_ics_lr")
    if fixed is None:
        return float(w["lr"]), [float(g["lr"]) for g in groups]
    base = w.get("initial_lr", w["lr"])  # LambdaLR keeps each group's base rate as initial_lr
    return float(fixed), [float(fixed) * (g.get("initial_lr", g["lr"]) / base if base else 1.0) for g in groups]


def _replayed_update(ctx: ProbeContext, params: list, grads: list, lrs: list[float]) -> list[torch.Tensor]:
    """The values `params` (of the probe's copy) take after the update the run's optimizer
    makes with `grads`: a fresh optimizer of the run's class over the copy's parameters, with
    the run's parameter groups (momentum, weight decay, ...) at the rates `lrs` (one per group,
    _step_lrs) and a deep copy of its state (momentum buffers, Adam moments), stepped once. The
    run's optimizer is only read. The copy's parameters are left as they were."""
    opt = ctx.optimizer
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [ctx.twin_params[id(p)] for p in g["params"]]}
              for g in opt.param_groups]
    twin_opt = type(opt)(groups)
    # deep copy: load_state_dict keeps tensors that need no cast, so the run's momentum
    # buffers would be shared and stepped in place
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for g, lr in zip(twin_opt.param_groups, lrs):  # after loading: the state dict carries the run's rates
        g["lr"] = lr
    before = [p.detach().clone() for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    twin_opt.step()
    after = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, b in zip(params, before):
            p.copy_(b)
            p.grad = None
    return after


def _l2_cos(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    a, b = a.flatten().double(), b.flatten().double()
    den = a.norm() * b.norm()
    return float((a - b).norm()), float(a @ b / den) if den > 0 else math.nan


def _check_ics_layers(cfg: dict, bad: set) -> list[str]:
    if not cfg.get("probe_ics_layers") or bad & {"probe_ics_layers", "arch", "width", "stem", "shortcut"}:
        return []
    layers, n = cfg["probe_ics_layers"], n_convs(cfg)
    if any(i < 0 or (n is not None and i >= n) for i in layers) or len(set(layers)) < len(layers):
        return [f"probe_ics_layers={layers!r}: conv indices (bnlib.models.conv_layers), each once, "
                + (f"in 0..{n - 1} for arch={cfg['arch']!r} ({n} conv layers)" if n is not None else ">= 0")
                + "; [] means every conv"]
    return []


@register_probe("ics", check=_check_ics_layers, params={
    "probe_ics_layers": Param([], "ics: conv indices (bnlib.models.conv_layers) whose internal covariate shift "
                              "is measured ([]: every conv; each costs one forward-backward pass)", items="int"),
    "probe_ics_lr": Param(None, "ics: the replayed update's step, an absolute learning rate for the weights, the "
                          "other parameter groups at their usual ratio to it (None: the run's current scheduled "
                          "rate; a number: the same step for every run, so that runs at different rates compare "
                          "at one step)", type="float", nullable=True, lo=0, lo_open=True)}, doc=(
        "P3 / Santurkar et al. 2018 Def. 2.1: internal covariate shift of conv layer i (bnlib.models.conv_layers; "
        "probe_ics_layers, default every conv) on the current training batch: G = dL/dW_i at the current "
        "parameters, G' = dL/dW_i after only the parameters upstream of layer i's input (every parameter its "
        "input depends on: earlier convs and their norms, earlier blocks' shortcuts; not layer i's own norm, "
        "which acts on its output) take the update the run's optimizer makes on this batch (its lr, momentum, "
        "weight decay; the step: the current scheduled rate, or probe_ics_lr for the weights with every other "
        "group at its usual ratio to them, recorded as step_lr). At a zero step (probe_ics_lr None where the "
        "schedule's rate is 0, e.g. a cosine's end) nothing moves, so nothing is measured: only step_lr = 0 is "
        "written. Train-mode norms, buffers as before the step; layer 0's ICS is 0 unless a "
        "learned layer precedes it (input_norm='bn'). Quantities: step_lr (once per time), l2 = "
        "||G - G'||, cos = cos(G, G'), grad_norm = ||G||. Stochastic nets (noisy BN, dropout): G and G' use the "
        "step's own random draw, and noise_l2, noise_cos (G at the next step's draw, no update: what the noise "
        "alone changes) and l2_fresh_draw, cos_fresh_draw (G' at the next step's draw) are added. At an epoch "
        "end the batch is the epoch's last one and the update is the one the optimizer would make on it next."))
def ics(ctx: ProbeContext) -> list[dict]:
    step_lr, lrs = _step_lrs(ctx)
    rows = [ctx.row("ics", "step_lr", step_lr)]
    if step_lr == 0:  # a zero step moves nothing: G' = G exactly, which is no measurement of ICS
        return rows
    model = ctx.model
    convs = conv_layers(model)
    layers = [convs[i] for i in (ctx.cfg.get("probe_ics_layers") or range(len(convs)))]
    params = [p for p in model.parameters() if p.requires_grad]
    ev = _Evaluations(ctx)
    inputs = {}
    hooks = [m.register_forward_hook(lambda _m, inp, _out, i=i: inputs.__setitem__(i, inp[0])) for i, _, m in layers]
    try:
        loss = ev.loss()
    finally:
        for h in hooks:
            h.remove()
    stochastic = ev.stochastic
    upstream = {i: _upstream(inputs[i]) for i, _, _ in layers}
    del inputs
    grads = [torch.zeros_like(p) if g is None else g.detach()
             for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True))]
    del loss
    G = {id(p): g for p, g in zip(params, grads)}
    new = _replayed_update(ctx, params, grads, lrs)
    if stochastic:  # the same weights, the next draw: what the noise alone changes
        _, noisy = ev.grads([m.weight for _, _, m in layers], fresh=True)
        for (i, n, m), g in zip(layers, noisy):
            l2, cos = _l2_cos(G[id(m.weight)], g)
            rows += [ctx.row("ics", "noise_l2", l2, layer=n, depth=i), ctx.row("ics", "noise_cos", cos, layer=n, depth=i)]
    for i, n, m in layers:
        moved = [(p, v) for p, v in zip(params, new) if id(p) in upstream[i]]
        with torch.no_grad():
            saved = [p.detach().clone() for p, _ in moved]
            for p, v in moved:
                p.copy_(v)
        g0 = G[id(m.weight)]
        # Santurkar's G' is the same loss function of the weights: the step's own random draw.
        # With a fresh draw G' also moves with the noise of every layer, the ones after i
        # included, so layer 0 would show "ICS" that no input shift causes: kept apart.
        draws = [("", False), ("_fresh_draw", True)] if stochastic else [("", False)]
        for suffix, fresh in draws:
            (g1,) = ev.grads([m.weight], fresh=fresh)[1]
            l2, cos = _l2_cos(g0, g1)
            rows += [ctx.row("ics", "l2" + suffix, l2, layer=n, depth=i), ctx.row("ics", "cos" + suffix, cos, layer=n, depth=i)]
        rows.append(ctx.row("ics", "grad_norm", float(g0.double().norm()), layer=n, depth=i))
        with torch.no_grad():
            for (p, _), s in zip(moved, saved):
                p.copy_(s)
    return rows


def _check_landscape(cfg: dict, bad: set) -> list[str]:
    errors = []
    if "probe_landscape_steps" in cfg and "probe_landscape_steps" not in bad:
        k = cfg["probe_landscape_steps"]
        if not k or any(not math.isfinite(v) or v <= 0 for v in k):
            errors.append(f"probe_landscape_steps={k!r}: must be a non-empty list of finite multiples of the "
                          f"learning rate > 0 (Santurkar et al. 2018: 0.5 ... 4)")
    if "probe_landscape_etas" in cfg and "probe_landscape_etas" not in bad:
        e = cfg["probe_landscape_etas"]
        if any(not math.isfinite(v) or v <= 0 for v in e):
            errors.append(f"probe_landscape_etas={e!r}: each step size must be a finite number > 0; [] means "
                          f"probe_landscape_steps × lr")
    return errors


def _etas(cfg: dict) -> tuple[list[float], bool]:
    """The landscape's step sizes and whether they are absolute (probe_landscape_etas) rather
    than multiples of the run's base lr (probe_landscape_steps)."""
    if cfg.get("probe_landscape_etas"):
        return [float(e) for e in cfg["probe_landscape_etas"]], True
    lr = float(cfg["lr"])  # the base rate: late in a cosine schedule the scheduled one is ~0
    return [k * lr for k in cfg["probe_landscape_steps"]], False


@register_probe("landscape", check=_check_landscape, params={
    "probe_landscape_steps": Param([0.5, 1.0, 2.0, 4.0], "landscape: step sizes along the gradient as multiples of "
                                   "lr (Santurkar et al. 2018 Fig. 4: 0.5 ... 4); used when probe_landscape_etas "
                                   "is []"),
    "probe_landscape_etas": Param([], "landscape: absolute step sizes η along the gradient, the same for every run "
                                  "([]: probe_landscape_steps × lr)")}, doc=(
        "P3 / Santurkar et al. 2018 Sec. 3.1, Fig. 4: from the current parameters θ and training batch, along the "
        "gradient g = ∇L(θ) (every trainable parameter), for step sizes η (the absolute probe_landscape_etas, or "
        "η = k·lr with k in probe_landscape_steps and lr the run's base learning rate when that is []): "
        "loss = L(θ − ηg) and grad_diff = ||∇L(θ) − ∇L(θ − ηg)|| (x = η); "
        "their ranges loss_min, loss_max, grad_diff_min, grad_diff_max (gradient predictiveness: a small "
        "grad_diff means the gradient stays predictive along the step); beta_smoothness = max over η of "
        "grad_diff / ||ηg|| (effective β-smoothness); loss_before, grad_norm, lr, eta_absolute (1: the η are "
        "probe_landscape_etas, 0: multiples of lr). Train-mode norms from the same buffers and random draw at "
        "every point, so only θ moves."))
def landscape(ctx: ProbeContext) -> list[dict]:
    model = ctx.model
    params = [p for p in model.parameters() if p.requires_grad]
    ev = _Evaluations(ctx)
    loss0, g = ev.grads(params)
    gnorm = float(torch.sqrt(sum(t.double().pow(2).sum() for t in g)))
    theta = [p.detach().clone() for p in params]
    etas, absolute = _etas(ctx.cfg)
    rows = [ctx.row("landscape", "loss_before", loss0), ctx.row("landscape", "grad_norm", gnorm),
            ctx.row("landscape", "lr", float(ctx.cfg["lr"])), ctx.row("landscape", "eta_absolute", float(absolute))]
    losses, diffs, betas = [], [], []
    for eta in etas:
        with torch.no_grad():
            for p, t, d in zip(params, theta, g):
                p.copy_(t - eta * d)
        loss, g2 = ev.grads(params)
        diff = float(torch.sqrt(sum((a.double() - b.double()).pow(2).sum() for a, b in zip(g, g2))))
        losses.append(loss)
        diffs.append(diff)
        betas.append(diff / (eta * gnorm) if gnorm > 0 else math.nan)
        rows += [ctx.row("landscape", "loss", loss, x=eta), ctx.row("landscape", "grad_diff", diff, x=eta)]
    # a step that makes the loss or gradient non-finite counts as unbounded (nan sorts badly)
    worst = [v if math.isfinite(v) else math.inf for v in losses]
    diffs = [v if math.isfinite(v) else math.inf for v in diffs]
    betas = [v if math.isfinite(v) or gnorm == 0 else math.inf for v in betas]
    rows += [ctx.row("landscape", q, v) for q, v in (
        ("loss_min", min(worst)), ("loss_max", max(worst)), ("grad_diff_min", min(diffs)),
        ("grad_diff_max", max(diffs)), ("beta_smoothness", max(betas)))]
    return rows
