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
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from .models import conv_layers

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
        from .models import create_model

        try:
            with torch.device("meta"):  # shapes only: no memory, no initialization time
                n = len(conv_layers(create_model(cfg["arch"], width=cfg["width"], stem=cfg["stem"],
                                                 shortcut=cfg["shortcut"])))
        except ValueError:
            n = None  # the arch/shortcut error is reported by validate itself
        if n is not None and cfg["probe_layer"] >= n:
            errors.append(f"probe_layer={cfg['probe_layer']}: arch={cfg['arch']!r} has {n} conv layers "
                          f"(indices 0..{n - 1}, bnlib.models.conv_layers); None means the middle one, {n // 2}")
    return errors


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
                           self.probe_batch)
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
