"""An example plugin: a normalization bnlib lacks, a probe and a small study, registered with
bnlib's own registration functions and nothing else. Use it with

    python -m bnlib run --plugins examples/ws_gn.py --norm ws_gn --epochs 1
    python -m bnlib study p1 --plugins examples/ws_gn.py --arms +ws_gn      # a sixth arm in P1
    python -m bnlib study wsgn --plugins examples/ws_gn.py                   # the study below

Weight Standardization + GroupNorm (Qiao et al. 2019, "Micro-Batch Training with Batch-Channel
Normalization and Weight Standardization"): GroupNorm uses no batch statistics, so it does not
degrade at small batches as BN does, but alone it trains worse than BN at ordinary ones. The
paper's remedy standardizes every conv's weights, per output channel, to zero mean and unit
variance before the convolution, which smooths the loss landscape as BN's normalization of
activations does. Both halves here: the norm layer is GroupNorm; the conv half is the norm's
model-level part (`attach`), which the model factory calls once on the finished network.
"""
from __future__ import annotations

import torch
from torch import nn

import bnlib.stats as stats
from bnlib import Preset, Study, register_norm, register_probe, register_study
from bnlib.params import Param


class WSConv2d(nn.Conv2d):
    """A conv whose weights are standardized on every forward: per output channel, minus their
    mean, divided by their standard deviation (+ eps). The stored weights stay free parameters;
    the gradient flows through the standardization, as in the paper."""

    ws_eps = 1e-5

    def forward(self, x):
        w = self.weight
        flat = w.flatten(1)
        w = ((flat - flat.mean(1, keepdim=True)) / (flat.std(1, keepdim=True, unbiased=False) + self.ws_eps)).view_as(w)
        return self._conv_forward(x, w, self.bias)


def standardize_convs(model: nn.Module) -> None:
    # every conv of the net, stem and projection shortcuts included (the paper standardizes all);
    # a class swap, not a hook: the model stays an ordinary module that deep-copies and pickles
    for m in model.modules():
        if type(m) is nn.Conv2d:
            m.__class__ = WSConv2d


@register_norm("ws_gn", has_gamma=True, has_beta=True, batch_stats=False, attach=standardize_convs,
               doc="Weight Standardization + GroupNorm (Qiao et al. 2019): every conv's weights standardized "
                   "per output channel, then GroupNorm with ws_gn_groups groups; no batch statistics",
               options={"ws_gn_groups": Param(4, "ws_gn: groups of channels of its GroupNorm (must divide every "
                                                 "channel count of the net at its width)", lo=1)})
def ws_gn(num_features, gamma0=1.0, eps=1e-5, momentum=0.1, *, ws_gn_groups):
    groups = ws_gn_groups if num_features % ws_gn_groups == 0 else 1  # a stem of few channels: one group
    layer = nn.GroupNorm(groups, num_features, eps=eps)
    with torch.no_grad():
        layer.weight.fill_(float(gamma0))
    return layer


@register_probe("weight_spread", doc="per conv: the mean over output channels of its raw weights' mean and "
                                     "standard deviation (what Weight Standardization divides out)",
                params={"probe_spread_convs": Param(4, "weight_spread: the first k convs measured", lo=1)})
def weight_spread(ctx):
    rows = []
    convs = [(n, m) for n, m in ctx.model.named_modules() if isinstance(m, nn.Conv2d)]
    for depth, (name, m) in enumerate(convs[:ctx.cfg["probe_spread_convs"]]):
        flat = m.weight.detach().flatten(1).float()
        rows.append(ctx.row("weight_spread", "mean", flat.mean(1).abs().mean().item(), layer=name, depth=depth))
        rows.append(ctx.row("weight_spread", "std", flat.std(1).mean().item(), layer=name, depth=depth))
    return rows


# ---- a small study: at a small batch, does WS + GN beat GroupNorm alone, and keep up with BN? ----

METRIC = "test_acc_at_best_val"


def verdicts(runs) -> list:
    r = runs.runs if hasattr(runs, "runs") else runs
    fin = r[r["status"].isin(["completed", "diverged"])] if "status" in r else r
    if fin.empty or "norm" not in fin or not {"ws_gn", "group_norm"} <= set(fin["norm"]):
        return [stats.Verdict("wsgn", "WS + GN beats GroupNorm alone", "inconclusive",
                              "WS + GN beats GroupNorm alone: INCONCLUSIVE — needs finished runs of ws_gn and "
                              "group_norm.", [], ["no runs"], short="WS+GN > GN")]
    sel = stats.at_selected_lr(fin, ["norm"])  # each arm at its rate chosen on validation
    out = [stats.decide("wsgn", "WS + GN beats GroupNorm alone (each at its validated rate)",
                        stats.paired_effect(sel, "norm", "ws_gn", "group_norm", METRIC, ["seed"]),
                        what="test accuracy difference", short="WS+GN > GN")]
    for arm in sorted(set(sel["norm"]) - {"ws_gn"}):  # every other arm, an added one too
        if arm != "group_norm":
            out.append(stats.decide("wsgn", f"WS + GN is at least as accurate as {arm}",
                                    stats.paired_effect(sel, "norm", "ws_gn", arm, METRIC, ["seed"]), threshold=-0.02,
                                    what="test accuracy difference", short=f"WS+GN ≥ {arm} − 0.02"))
    return out


register_study(Study(
    name="wsgn", title="WS + GN vs GroupNorm and BN at batch 8 (example plugin)", notebook=None,
    doc="ws_gn / group_norm / bn at batch size 8, two learning rates each, chosen on validation",
    verdicts=verdicts,
    presets={
        "quick": Preset(base=dict(dataset="fashion_mnist", n_train=2000, val_fraction=0.05, n_test=1000,
                                  width=0.125, epochs=1, batch_size=8, crop_pad=0, ws_gn_groups=2, norm_groups=2,
                                  probes=["weight_spread"]),
                        grid=dict(norm=["bn", "group_norm", "ws_gn"], lr=[0.01, 0.03], seed=[0, 1, 2])),
        # what the tests run: seconds on a CPU
        "tiny": Preset(base=dict(dataset="synthetic", synthetic_size=300, n_test=100, val_fraction=0.2, arch="resnet8",
                                 width=0.25, epochs=1, batch_size=16, ws_gn_groups=2, norm_groups=2, log_every=2,
                                 eval_batch_size=100, progress=False),
                       grid=dict(norm=["group_norm", "ws_gn"], lr=[0.05], seed=[0, 1])),
    }))
