"""P4 probes (Bjorck et al. 2018, "Understanding Batch Normalization"): the loss along one SGD
step of growing size (Fig. 4), activation moments per layer (Fig. 2), per-layer gradients and one
layer's gradient histogram (Fig. 3), and how much the final layer's gradient depends on the input
(Sec. 4)."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..models import conv_layers
from ..params import Param
from .registry import ProbeContext, n_convs, register_probe

__all__ = ["step_size_loss", "channel_moments", "layer_grads", "final_layer_grad", "HIST_BINS"]


def _final_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]


def _check_step_sizes(cfg: dict, bad: set) -> list[str]:
    if "probe_step_sizes" in bad:
        return []
    s = cfg["probe_step_sizes"]
    if not s or any(not math.isfinite(v) or v < 0 for v in s):
        return [f"probe_step_sizes={s!r}: must be a non-empty list of finite step sizes >= 0"]
    return []


@register_probe("step_size_loss", check=_check_step_sizes, params={
    "probe_step_sizes": Param([1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0],
                              "step_size_loss: SGD step sizes s (P4 Fig. 4: log grid 1e-6 ... 1)")}, doc=(
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


def _check_layer(cfg: dict, bad: set) -> list[str]:
    if cfg.get("probe_layer") is None or bad & {"probe_layer", "arch", "width", "stem", "shortcut"}:
        return []
    n = n_convs(cfg)
    if n is not None and cfg["probe_layer"] >= n:
        return [f"probe_layer={cfg['probe_layer']}: arch={cfg['arch']!r} has {n} conv layers "
                f"(indices 0..{n - 1}, bnlib.models.conv_layers); None means the middle one, {n // 2}"]
    return []


@register_probe("layer_grads", check=_check_layer, params={
    "probe_layer": Param(None, "layer_grads: conv index (bnlib.models.conv_layers) of the gradient histogram "
                         "(None: the middle conv)", type="int", lo=0, nullable=True)}, doc=(
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
