"""Probes: measurements taken inside training (gradients, activations, the loss along a step).

P3, P4 and P5 are about what happens during training, not only accuracy. A probe is one
registered function `fn(ctx) -> rows`, like a norm is one registry entry; the loop calls every
due probe through one hook (`ProbeRunner.at`) and the rows go to `probes.parquet` in the run
directory, loaded by `bnlib.load_runs` as `runs.probes`. Long format, one row per number:

    step      optimizer updates done when measured (0 = initialization)
    epoch     step / steps per epoch (0.0 = init, 1.0 = end of the first epoch)
    probe     registry name
    layer     module name ("" when the number is about the whole net)
    depth     conv index (bnlib.models.conv_layers), block index or -1
    quantity  what the number is (each probe's doc lists its quantities)
    x         abscissa where one is needed (step size, histogram bin centre), else NaN
    value     the number

Contract (tests/test_probes.py checks it for every registered probe):
- Training is bit-identical with and without probes. A probe works on a deep copy of the model
  (its parameters, BN running statistics and counters; no .grad), so it may run forward and
  backward passes or move the weights freely; every RNG (python, numpy, torch CPU and CUDA, the
  loop's data generator) is saved before and restored after. The optimizer is passed for reading
  (learning rates, state); a probe never steps it. On CUDA this holds as far as the run is
  reproducible at all: with cuDNN autotuning on (deterministic=False) a probe's forward pass
  can be the first to autotune a shape, and autotuning may pick another kernel than a run
  without probes would; two runs without probes can differ the same way.
- Probes compute in fp32: autocast is off inside them, whatever the run's precision.

Cadence (parameters in bnlib.config, `# --- probes ---`): every requested probe runs at
initialization and at the end of every epoch; also every k steps (`name@k` in `probes`, else
`probe_every`, else the probe's registry default) and at the chosen `probe_steps`. Cost per
call on the bench model: `make bench`.
"""
from __future__ import annotations

import contextlib
import copy
import math
import random
import re
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from .models import conv_layers, norm_layers

__all__ = ["ProbeContext", "ProbeSpec", "PROBES", "register_probe", "probe_names", "parse_probes",
           "check_probe_params", "ProbeRunner", "preserved_rng", "COLUMNS"]

COLUMNS = {"step": "int64", "epoch": "float64", "probe": "object", "layer": "object", "depth": "int64",
           "quantity": "object", "x": "float64", "value": "float64"}


@dataclass
class ProbeContext:
    model: nn.Module  # a deep copy of the training model, in train mode: the probe may change it
    x: torch.Tensor  # the current training batch as the step sees it (augmented, float, fp32)
    y: torch.Tensor
    loss_fn: Callable  # loss_fn(logits, y) -> the run's mean loss
    optimizer: torch.optim.Optimizer  # the run's optimizer: read it, never step it
    step: int  # optimizer updates done (0 = initialization)
    epoch: float  # step / steps per epoch
    cfg: dict
    probe_batch: tuple  # (images, labels): the first probe_batch_size training images, not augmented
    # id(a parameter of the training model) -> the same parameter of `model`: maps the
    # optimizer's parameter groups onto the copy (the P3 ICS probe replays the real update there)
    twin_params: dict = field(default_factory=dict)

    def row(self, probe: str, quantity: str, value, layer: str = "", depth: int = -1, x: float = math.nan) -> dict:
        return {"step": self.step, "epoch": self.epoch, "probe": probe, "layer": layer, "depth": int(depth),
                "quantity": quantity, "x": float(x), "value": float(value)}


@dataclass(frozen=True)
class ProbeSpec:
    name: str
    fn: Callable[[ProbeContext], list]
    doc: str
    default_every: int | None  # run every k steps by default (None: init and epoch ends only)


PROBES: dict[str, ProbeSpec] = {}


def register_probe(name: str, *, doc: str, default_every: int | None = None):
    def deco(fn):
        if name in PROBES:
            raise ValueError(f"probe {name!r} is registered twice")
        PROBES[name] = ProbeSpec(name, fn, doc, default_every)
        return fn

    return deco


def probe_names() -> list[str]:
    return sorted(PROBES)


# ----------------------------------------------------------------------------------------------
# parameters and cadence
# ----------------------------------------------------------------------------------------------

_ENTRY = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?:@(.*))?")


def parse_probes(entries) -> tuple[list[tuple[str, int | None]], list[str]]:
    """'name' or 'name@k' -> [(name, k or None)], plus error lines."""
    out, errors = [], []
    for e in entries:
        m = _ENTRY.fullmatch(e)
        name, k = (m.group(1), m.group(2)) if m else (e, None)
        if name not in PROBES:
            errors.append(f"probes: {e!r} is not a known probe; valid choices: {probe_names()} "
                          f"(optionally with '@k' to run it every k steps)")
            continue
        if k is not None and not (k.isdigit() and int(k) >= 1):
            errors.append(f"probes: {e!r}: the cadence after '@' must be a whole number of steps >= 1, "
                          f"e.g. '{name}@100'")
            continue
        if name in [n for n, _ in out]:
            errors.append(f"probes: {name!r} is requested twice; give it once (with '@k' for its cadence)")
            continue
        out.append((name, int(k) if k is not None else None))
    return out, errors


def check_probe_params(cfg: dict, bad: set) -> list[str]:
    """Error lines for the probe parameters of a config (called by bnlib.config.validate)."""
    errors = []
    if "probes" not in bad:
        errors += parse_probes(cfg["probes"])[1]
    if "probe_steps" not in bad and any(s < 0 for s in cfg["probe_steps"]):
        errors.append(f"probe_steps={cfg['probe_steps']!r}: each must be >= 0 (optimizer updates done; "
                      f"0 = initialization)")
    if "probe_step_sizes" not in bad:
        s = cfg["probe_step_sizes"]
        if not s or any(not math.isfinite(v) or v < 0 for v in s):
            errors.append(f"probe_step_sizes={s!r}: must be a non-empty list of finite step sizes >= 0")
    if cfg.get("probe_layer") is not None and not bad & {"probe_layer", "arch", "width", "stem", "shortcut"}:
        n = _n_convs(cfg)
        if n is not None and cfg["probe_layer"] >= n:
            errors.append(f"probe_layer={cfg['probe_layer']}: arch={cfg['arch']!r} has {n} conv layers "
                          f"(indices 0..{n - 1}, bnlib.models.conv_layers); None means the middle one, {n // 2}")
    if cfg.get("probe_ics_layers") and not bad & {"probe_ics_layers", "arch", "width", "stem", "shortcut"}:
        layers, n = cfg["probe_ics_layers"], _n_convs(cfg)
        if any(i < 0 or (n is not None and i >= n) for i in layers) or len(set(layers)) < len(layers):
            errors.append(f"probe_ics_layers={layers!r}: conv indices (bnlib.models.conv_layers), each once, "
                          + (f"in 0..{n - 1} for arch={cfg['arch']!r} ({n} conv layers)" if n is not None else ">= 0")
                          + "; [] means every conv")
    if "probe_landscape_steps" in cfg and "probe_landscape_steps" not in bad:
        k = cfg["probe_landscape_steps"]
        if not k or any(not math.isfinite(v) or v <= 0 for v in k):
            errors.append(f"probe_landscape_steps={k!r}: must be a non-empty list of finite multiples of the "
                          f"learning rate > 0 (Santurkar et al. 2018: 0.5 ... 4)")
    return errors


def _n_convs(cfg: dict) -> int | None:
    """Conv layers of the config's network (bnlib.models.conv_layers), or None when it cannot be built."""
    from .models import create_model

    try:
        with torch.device("meta"):  # shapes only: no memory, no initialization time
            return len(conv_layers(create_model(cfg["arch"], width=cfg["width"], stem=cfg["stem"],
                                                shortcut=cfg["shortcut"])))
    except ValueError:
        return None  # the arch/shortcut error is reported by validate itself


@contextlib.contextmanager
def preserved_rng(generators=()):
    """Every random number generator as it was, whatever the block draws: python, numpy, torch
    CPU, every CUDA device (when CUDA is in use) and the given torch.Generators."""
    py, npy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    gens = [(g, g.get_state()) for g in generators]
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        for g, s in gens:
            g.set_state(s)


class ProbeRunner:
    """Runs the requested probes when due and keeps their rows (`rows`, saved in checkpoints).
    `at(step, x, y)` is the loop's one hook: at the top of each step (before the update with
    index `step`) and, with `epoch_end=True`, after an epoch's last step. A (probe, step) pair
    is measured once, so the end of one epoch and the start of the next are one measurement."""

    def __init__(self, cfg: dict, model: nn.Module, optimizer, loss_fn, probe_batch, steps_per_epoch: int,
                 generators=()):
        self.cfg, self.model, self.optimizer, self.loss_fn = cfg, model, optimizer, loss_fn
        self.probe_batch, self.spe, self.generators = probe_batch, max(1, steps_per_epoch), tuple(generators)
        entries, errors = parse_probes(cfg.get("probes", []))
        if errors:
            from .config import ConfigError

            raise ConfigError("invalid run parameters:\n  - " + "\n  - ".join(errors))
        self.every = {n: k or cfg.get("probe_every") or PROBES[n].default_every for n, k in entries}
        self.steps = set(cfg.get("probe_steps", []))
        self.rows: list[dict] = []
        self.done: set = set()
        self.seconds = 0.0  # time spent in probes since the last take_seconds()

    def __bool__(self) -> bool:
        return bool(self.every)

    def restore(self, rows: list[dict]) -> None:
        """Rows from a checkpoint: a resumed run neither loses nor repeats measurements."""
        self.rows = list(rows)
        self.done = {(r["probe"], r["step"]) for r in rows}

    def due(self, step: int, epoch_end: bool = False) -> list[str]:
        return [n for n, k in self.every.items()
                if (n, step) not in self.done
                and (epoch_end or step == 0 or step in self.steps or (k is not None and step % k == 0))]

    def at(self, step: int, x: torch.Tensor, y: torch.Tensor, epoch_end: bool = False) -> None:
        if not self.every:
            return
        names = self.due(step, epoch_end)
        if not names:
            return
        t0 = time.perf_counter()
        with preserved_rng(self.generators), torch.autocast(x.device.type, enabled=False), torch.enable_grad():
            for name in names:
                self.rows += self.call(name, step, x, y)
                self.done.add((name, step))
        self.seconds += time.perf_counter() - t0  # probes read results back: the device has synchronized

    def take_seconds(self) -> float:
        """Seconds spent in probes since the last call (the loop leaves them out of its epoch timer)."""
        s, self.seconds = self.seconds, 0.0
        return s

    def frame(self):
        """The rows as the probes.parquet table (typed columns, also when empty)."""
        import pandas as pd

        return pd.DataFrame(self.rows, columns=list(COLUMNS)).astype(COLUMNS)

    def call(self, name: str, step: int, x, y) -> list[dict]:
        """One probe on a fresh copy of the model (no RNG or autocast handling: see `at`)."""
        twin = copy.deepcopy(self.model).train()
        ctx = ProbeContext(twin, x, y, self.loss_fn, self.optimizer, step, step / self.spe, self.cfg,
                           self.probe_batch, dict(zip(map(id, self.model.parameters()), twin.parameters())))
        return PROBES[name].fn(ctx)


# ----------------------------------------------------------------------------------------------
# P4 probes (Bjorck et al. 2018, "Understanding Batch Normalization")
# ----------------------------------------------------------------------------------------------

def _final_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]


@register_probe("step_size_loss", doc=(
        "P4 Fig. 4: from the current state and batch, L(after one plain SGD step of size s on that batch) / "
        "L(before), for s in probe_step_sizes (no momentum, no weight decay, train-mode BN). Quantities: "
        "rel_loss (x = s), loss_before, lr_now (the run's weight lr). A ratio above 10^3 marks divergence."))
def step_size_loss(ctx: ProbeContext) -> list[dict]:
    model, x, y = ctx.model, ctx.x, ctx.y
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(ctx.loss_fn(model(x), y), params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]
    theta = [p.detach().clone() for p in params]

    @torch.no_grad()
    def loss_at(s: float) -> float:
        # s = 0 leaves every weight bitwise equal (t - 0·g = t), so its ratio is exactly 1
        for p, t, g in zip(params, theta, grads):
            p.copy_(t - s * g)
        return float(ctx.loss_fn(model(x), y))

    base = loss_at(0.0)
    rows = [ctx.row("step_size_loss", "loss_before", base),
            ctx.row("step_size_loss", "lr_now", ctx.optimizer.param_groups[-1]["lr"])]
    for s in ctx.cfg["probe_step_sizes"]:
        rows.append(ctx.row("step_size_loss", "rel_loss", loss_at(s) / base, x=s))
    return rows


def _moments(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (biased) variance over (N, H, W) of a (N, C, ...) activation."""
    t = t.detach().float().transpose(0, 1).reshape(t.shape[1], -1)
    return t.mean(1), t.var(1, unbiased=False)


@register_probe("channel_moments", doc=(
        "P4 Fig. 2: per layer, the channel means and variances of activations on the fixed probe batch, "
        "train mode. Sites: 'prenorm' = each conv's output (depth = conv index), 'block' = each residual "
        "block's output (depth = block index). Quantities {site}_mean_abs (mean over channels of |channel "
        "mean|), {site}_var (mean over channels of the channel variance), and their _std over channels."))
@torch.no_grad()
def channel_moments(ctx: ProbeContext) -> list[dict]:
    model = ctx.model
    sites = [("prenorm", i, n, m) for i, n, m in conv_layers(model)]
    if hasattr(model, "blocks"):
        names = {id(m): n for n, m in model.named_modules()}
        sites += [("block", j, names[id(b)], b) for j, b in enumerate(model.blocks())]
    rows, handles = [], []

    def hook(site, depth, name):
        def f(_m, _inp, out):
            mu, var = _moments(out)
            stats = torch.stack([mu.abs().mean(), mu.abs().std(unbiased=False), var.mean(),
                                 var.std(unbiased=False)]).tolist()
            for q, v in zip(("mean_abs", "mean_abs_std", "var", "var_std"), stats):
                rows.append(ctx.row("channel_moments", f"{site}_{q}", v, layer=name, depth=depth))
        return f

    for site, depth, name, m in sites:
        handles.append(m.register_forward_hook(hook(site, depth, name)))
    try:
        model(ctx.probe_batch[0])
    finally:
        for h in handles:
            h.remove()
    return rows


HIST_BINS = 81  # odd: zero sits in the middle of the centre bin


@register_probe("layer_grads", doc=(
        "P4 Fig. 3: on the current batch, the loss gradient's norm per conv layer (grad_norm, weight_norm; "
        "depth = conv index, the final linear layer last) and the histogram of one layer's gradient entries "
        "(probe_layer, default the middle conv): hist_count (x = bin centre; 81 equal bins over ±max|g|), "
        "hist_bin_width, hist_abs_max, hist_std, hist_kurtosis (3 for a Gaussian; heavy tails above)."))
def layer_grads(ctx: ProbeContext) -> list[dict]:
    model = ctx.model
    convs = conv_layers(model)
    fc_name, fc = _final_linear(model)
    ctx.loss_fn(model(ctx.x), ctx.y).backward()
    layers = [(i, n, m) for i, n, m in convs] + [(len(convs), fc_name, fc)]
    norms = torch.stack([torch.stack([m.weight.grad.float().norm() if m.weight.grad is not None
                                      else m.weight.new_zeros(()), m.weight.detach().float().norm()])
                         for _, _, m in layers]).tolist()
    rows = []
    for (i, n, _), (g, w) in zip(layers, norms):
        rows += [ctx.row("layer_grads", "grad_norm", g, layer=n, depth=i),
                 ctx.row("layer_grads", "weight_norm", w, layer=n, depth=i)]
    k = ctx.cfg.get("probe_layer")
    i, n, m = convs[len(convs) // 2] if k is None else convs[k]
    g = m.weight.grad.detach().float().flatten() if m.weight.grad is not None else m.weight.new_zeros(1).flatten()
    g = g[torch.isfinite(g)]
    if g.numel() == 0:
        return rows + [ctx.row("layer_grads", "hist_abs_max", math.nan, layer=n, depth=i)]
    top = float(g.abs().max()) or 1.0
    counts = torch.histc(g.cpu(), bins=HIST_BINS, min=-top, max=top).tolist()
    width = 2 * top / HIST_BINS
    centres = [-top + width * (b + 0.5) for b in range(HIST_BINS)]
    c = g - g.mean()
    var = c.pow(2).mean()
    kurt = float(c.pow(4).mean() / var.pow(2)) if var > 0 else math.nan
    rows += [ctx.row("layer_grads", "hist_count", v, layer=n, depth=i, x=xc) for xc, v in zip(centres, counts)]
    rows += [ctx.row("layer_grads", q, v, layer=n, depth=i)
             for q, v in (("hist_bin_width", width), ("hist_abs_max", top), ("hist_std", float(var.sqrt())),
                          ("hist_kurtosis", kurt))]
    return rows


def _spread(g: torch.Tensor, y: torch.Tensor | None = None) -> float:
    """Share of the energy of per-example vectors g (N, D) not common to all examples:
    mean ||g_i - ḡ||² / mean ||g_i||² (0: every input gets the same vector). With labels y:
    the share of the spread left once the label is known, mean ||g_i - ḡ_{y_i}||² over
    mean ||g_i - ḡ||² (0: the vector is a function of the label alone)."""
    dev = (g - g.mean(0)).pow(2).sum(1).mean()
    if y is None:
        energy = g.pow(2).sum(1).mean()
        return float(dev / energy) if energy > 0 else math.nan
    within = sum((g[y == c] - g[y == c].mean(0)).pow(2).sum() for c in y.unique()) / len(g)
    return float(within / dev) if dev > 0 else math.nan


def _mean_cos(v: torch.Tensor) -> float:
    """Mean cosine similarity over pairs of different rows of v (N, D)."""
    u = v / v.norm(dim=1, keepdim=True).clamp_min(1e-30)
    n = len(u)
    return float(((u @ u.T).sum() - (u * u).sum()) / (n * (n - 1))) if n > 1 else math.nan


@register_probe("final_layer_grad", doc=(
        "P4 Sec. 4: the final linear layer's per-example loss gradient on the fixed probe batch, G_i = "
        "(dℓ_i/dz_i) h_iᵀ, and how much it depends on the input. P4: without BN, at init, the net predicts "
        "the same class for every input and G_i is nearly the same for all inputs. Quantities: "
        "input_dependence = mean ||G_i - Ḡ||² / mean ||G_i||² (0: one gradient for every input), "
        "input_dependence_logits (the same for dℓ_i/dz_i), label_unexplained (share of the spread of G_i left "
        "once the label is known), cos_mean (mean cosine between G_i of different examples), feature_cos_mean "
        "(the same for the final layer's inputs h_i), grad_norm_mean, top_class_frac (share of the batch "
        "predicted as its most frequent class)."))
def final_layer_grad(ctx: ProbeContext) -> list[dict]:
    model = ctx.model
    x, y = ctx.probe_batch
    name, fc = _final_linear(model)
    feats = {}
    h = fc.register_forward_hook(lambda _m, inp, _out: feats.__setitem__("h", inp[0].detach().float()))
    try:
        with torch.no_grad():
            z = model(x).float()
    finally:
        h.remove()
    zg = z.detach().requires_grad_()
    # per-example gradients of the per-example loss: the mean loss times N, differentiated per row
    (dz,) = torch.autograd.grad(ctx.loss_fn(zg, y) * len(y), zg)
    G = (dz[:, :, None] * feats["h"][:, None, :]).flatten(1)  # (N, K·D)
    pred = z.argmax(1)
    rows = [("input_dependence", _spread(G)), ("input_dependence_logits", _spread(dz)),
            ("label_unexplained", _spread(G, y)), ("cos_mean", _mean_cos(G)),
            ("feature_cos_mean", _mean_cos(feats["h"])), ("grad_norm_mean", float(G.norm(dim=1).mean())),
            ("top_class_frac", float(pred.bincount().max()) / len(pred))]
    return [ctx.row("final_layer_grad", q, v, layer=name) for q, v in rows]


# ----------------------------------------------------------------------------------------------
# P3 probes (Awais et al. 2021, measuring as Santurkar et al. 2018, "How Does Batch
# Normalization Help Optimization?", Sec. 2.2 and 3.1)
# ----------------------------------------------------------------------------------------------

def _rng_state() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def _same_rng(a: tuple, b: tuple) -> bool:
    return torch.equal(a[0], b[0]) and (a[1] is None) == (b[1] is None) and \
        (a[1] is None or all(torch.equal(u, v) for u, v in zip(a[1], b[1])))


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
        self.rng, self.rng_next = _rng_state(), None

    def loss(self, fresh: bool = False) -> torch.Tensor:
        with torch.no_grad():
            for b, saved in self.buffers:
                b.copy_(saved)
        if fresh and self.rng_next is None:
            raise RuntimeError("a fresh draw is the one after the step's own: evaluate once without fresh first")
        _set_rng_state(self.rng_next if fresh else self.rng)
        out = self.ctx.loss_fn(self.model(self.ctx.x), self.ctx.y)
        if self.rng_next is None:
            self.rng_next = _rng_state()
        return out

    @property
    def stochastic(self) -> bool:
        """Whether the forward pass draws random numbers (known after the first evaluation)."""
        return self.rng_next is not None and not _same_rng(self.rng, self.rng_next)

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


def _replayed_update(ctx: ProbeContext, params: list, grads: list) -> list[torch.Tensor]:
    """The values `params` (of the probe's copy) take after the update the run's optimizer
    makes with `grads`: a fresh optimizer of the run's class over the copy's parameters, with
    the run's parameter groups (this step's scheduled lr, momentum, weight decay, ...) and a deep
    copy of its state (momentum buffers, Adam moments), stepped once. The run's optimizer is only
    read. The copy's parameters are left as they were."""
    opt = ctx.optimizer
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [ctx.twin_params[id(p)] for p in g["params"]]}
              for g in opt.param_groups]
    twin_opt = type(opt)(groups)
    # deep copy: load_state_dict keeps tensors that need no cast, so the run's momentum
    # buffers would be shared and stepped in place
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
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


@register_probe("ics", doc=(
        "P3 / Santurkar et al. 2018 Def. 2.1: internal covariate shift of conv layer i (bnlib.models.conv_layers; "
        "probe_ics_layers, default every conv) on the current training batch: G = dL/dW_i at the current "
        "parameters, G' = dL/dW_i after only the parameters upstream of layer i's input (every parameter its "
        "input depends on: earlier convs and their norms, earlier blocks' shortcuts; not layer i's own norm, "
        "which acts on its output) take the update the run's optimizer makes on this batch (its lr, momentum, "
        "weight decay). Train-mode norms, buffers as before the step; layer 0's ICS is 0 unless a "
        "learned layer precedes it (input_norm='bn'). Quantities: l2 = "
        "||G - G'||, cos = cos(G, G'), grad_norm = ||G||. Stochastic nets (noisy BN, dropout): G and G' use the "
        "step's own random draw, and noise_l2, noise_cos (G at the next step's draw, no update: what the noise "
        "alone changes) and l2_fresh_draw, cos_fresh_draw (G' at the next step's draw) are added. At an epoch "
        "end the batch is the epoch's last one and the update is the one the optimizer would make on it next."))
def ics(ctx: ProbeContext) -> list[dict]:
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
    new = _replayed_update(ctx, params, grads)
    rows = []
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


@register_probe("landscape", doc=(
        "P3 / Santurkar et al. 2018 Sec. 3.1, Fig. 4: from the current parameters θ and training batch, along the "
        "gradient g = ∇L(θ) (every trainable parameter), for step sizes η = k·lr (k in probe_landscape_steps, "
        "lr = the run's base learning rate): loss = L(θ − ηg) and grad_diff = ||∇L(θ) − ∇L(θ − ηg)|| (x = η); "
        "their ranges loss_min, loss_max, grad_diff_min, grad_diff_max (gradient predictiveness: a small "
        "grad_diff means the gradient stays predictive along the step); beta_smoothness = max over η of "
        "grad_diff / ||ηg|| (effective β-smoothness); loss_before, grad_norm, lr. Train-mode norms from the "
        "same buffers and random draw at every point, so only θ moves."))
def landscape(ctx: ProbeContext) -> list[dict]:
    model = ctx.model
    params = [p for p in model.parameters() if p.requires_grad]
    ev = _Evaluations(ctx)
    loss0, g = ev.grads(params)
    gnorm = float(torch.sqrt(sum(t.double().pow(2).sum() for t in g)))
    theta = [p.detach().clone() for p in params]
    lr = float(ctx.cfg["lr"])  # the base rate: late in a cosine schedule the scheduled one is ~0
    rows = [ctx.row("landscape", "loss_before", loss0), ctx.row("landscape", "grad_norm", gnorm),
            ctx.row("landscape", "lr", lr)]
    losses, diffs, betas = [], [], []
    for k in ctx.cfg["probe_landscape_steps"]:
        eta = k * lr
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


# ----------------------------------------------------------------------------------------------
# P2 probes (Davis & Frank 2022, "Revisiting Batch Normalization")
# ----------------------------------------------------------------------------------------------

@register_probe("max_normalized", doc=(
        "P2 Sec. 3: normalization can produce overly large values, and γ ≈ 1 passes them on. Per norm layer "
        "(bnlib.models.norm_layers; depth = its index there, P2's input BN first when input_norm='bn'), on the "
        "fixed probe batch in train mode: xhat_abs_max, the largest |x̂| (the layer applied to its input with "
        "its scale set to 1 and its shift to 0: for BN, (x − μ_B)/√(σ²_B + ε)), and out_abs_max, the largest "
        "|γ·x̂ + β| (the layer's actual output)."))
@torch.no_grad()
def max_normalized(ctx: ProbeContext) -> list[dict]:
    model, layers = ctx.model, norm_layers(ctx.model)
    seen = {}  # layer name -> (its input, its output) on the probe batch
    handles = [m.register_forward_hook(lambda _m, inp, out, name=name: seen.__setitem__(name, (inp[0], out)))
               for name, m in layers]
    try:
        model(ctx.probe_batch[0])
    finally:
        for h in handles:
            h.remove()
    rows = []
    for depth, (name, m) in enumerate(layers):
        if name not in seen:
            continue
        x, out = seen[name]
        # x̂ from the layer itself with γ = 1, β = 0 (roles from the norm registry), so any norm
        # is measured by its own normalization; the model is the probe's copy, free to change
        for attr, role in m._bnlib_roles.items():
            p = getattr(m, attr, None)
            if isinstance(p, torch.Tensor):
                p.fill_(1.0 if role == "scale" else 0.0)
        top = torch.stack([m(x).float().abs().max(), out.float().abs().max()]).tolist()
        rows += [ctx.row("max_normalized", "xhat_abs_max", top[0], layer=name, depth=depth),
                 ctx.row("max_normalized", "out_abs_max", top[1], layer=name, depth=depth)]
    return rows


# ----------------------------------------------------------------------------------------------
# P5 probe (De & Smith 2020, "Batch Normalization Biases Residual Blocks Towards the Identity
# Function in Deep Networks")
# ----------------------------------------------------------------------------------------------

@register_probe("signal_propagation", doc=(
        "P5 Fig. 2: per residual block (depth = block index in model.blocks(), layer = its name), on the fixed "
        "probe batch in train mode, the mean squared activation of the two tensors the block adds, from its "
        "parts(x) -> (skip, branch): skip_ms (the skip path), branch_ms (the residual branch, SkipInit's α "
        "included), branch_to_skip = branch_ms / skip_ms, and identity_skip (1 where the skip is the identity, "
        "0 where a projection or padding resets it at a stage start). Computed in float64, so an unnormalized "
        "net's ~2^l growth is measured rather than overflowed (fp32 ends at 2^128, a few hundred blocks)."))
@torch.no_grad()
def signal_propagation(ctx: ProbeContext) -> list[dict]:
    # P5's argument: with BN at the start of each branch, Var(x_{l+1}) ≈ Var(x_l) + 1, so the
    # skip path's mean square grows ~linearly in l while the branch's stays ~1 (the branch is
    # down-weighted by ~√l); without normalization (He init) both double per block; SkipInit's
    # α = 0 makes every branch exactly 0 at init, so the skip path stays flat.
    model = ctx.model.double()  # the probe's own copy: free to change precision
    names = {id(m): n for n, m in model.named_modules()}
    blocks = model.blocks() if hasattr(model, "blocks") else []
    seen: dict[int, tuple] = {}

    def record(j: int, b: nn.Module, skip: torch.Tensor, branch: torch.Tensor) -> None:
        ms = torch.stack([skip.pow(2).mean(), branch.pow(2).mean()])
        seen[j] = (ms, isinstance(getattr(b, "shortcut", None), nn.Identity))

    def through_parts(j, b, parts):
        def wrapped(x):  # every block's forward is parts + its combine: one forward measures all
            skip, branch = parts(x)
            record(j, b, skip, branch)
            return skip, branch
        return wrapped

    def fallback(j, parts):  # a block whose forward does not call parts: measure its input again
        def hook(b, inp, _out):
            if j not in seen:
                record(j, b, *parts(inp[0]))
        return hook

    handles = []
    for j, b in enumerate(blocks):
        parts = getattr(b, "parts", None)  # bnlib.models: every residual block has it
        if parts is None:
            continue
        b.parts = through_parts(j, b, parts)
        handles.append(b.register_forward_hook(fallback(j, parts)))
    try:
        model(ctx.probe_batch[0].to(torch.float64))
    finally:
        for h in handles:
            h.remove()
    if not seen:
        return []
    ms = torch.stack([seen[j][0] for j in sorted(seen)]).tolist()  # one read-back for every block
    rows = []
    for (skip, branch), j in zip(ms, sorted(seen)):
        name = names[id(blocks[j])]
        ratio = branch / skip if skip > 0 else math.nan
        rows += [ctx.row("signal_propagation", q, v, layer=name, depth=j)
                 for q, v in (("skip_ms", skip), ("branch_ms", branch), ("branch_to_skip", ratio),
                              ("identity_skip", float(seen[j][1])))]
    return rows
