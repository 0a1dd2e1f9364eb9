"""P3's norms (bnlib.bn_variants, registered in bnlib.norms): each against a hand computation or
PyTorch's reference, their options from the run config, and one real training step each."""
import copy
import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnlib
from bnlib import bnstats
from bnlib.bn_variants import GroupNorm2d
from bnlib.config import ConfigError, RunConfig, validate
from bnlib.models import create_model, norm_layers
from bnlib.norms import NORMS, get_norm
from bnlib.train import build_model, param_groups

P3_NORMS = ["noisy_bn", "ics_free", "ics_free_stale", "group_norm", "layer_norm", "batch_renorm", "ghost_bn"]


def _x(n=8, c=4, h=5, w=6, seed=0, shift=1.5, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, h, w, generator=g) * scale + shift


def _bn_train(x, eps=1e-5):
    mu = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps)


def _randomize_affine(*layers, seed=1):
    g = torch.Generator().manual_seed(seed)
    c = layers[0].weight.numel()
    gamma, beta = torch.randn(c, generator=g), torch.randn(c, generator=g)
    with torch.no_grad():
        for m in layers:
            m.weight.copy_(gamma)
            m.bias.copy_(beta)
    return gamma.view(1, -1, 1, 1), beta.view(1, -1, 1, 1)


def _assert_same_as_bn(ours, ref, xs, grads=True):
    """Train-mode outputs (and input gradients), running statistics, then eval-mode outputs."""
    ours.train(), ref.train()
    for x in xs:
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), ref(xb)
        torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
        if grads:
            up = torch.randn_like(ya)
            ya.backward(up), yb.backward(up)
            torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-5, atol=1e-6)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == len(xs)
    ours.eval(), ref.eval()
    for x in xs:
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# noisy_bn: Santurkar et al.'s noise, its moments, train mode only
# ----------------------------------------------------------------------------------------------

def _noise_draws(layer, shape, draws):
    """(m, s) of `draws` independent draws: perturb(0) = m, perturb(1) = s + m at one RNG state."""
    ms, ss = [], []
    for k in range(draws):
        torch.manual_seed(1000 + k)
        m = layer.perturb(torch.zeros(shape))
        torch.manual_seed(1000 + k)
        ms.append(m)
        ss.append(layer.perturb(torch.ones(shape)) - m)
    return torch.stack(ms), torch.stack(ss)  # (draws, N, C, H, W)


def test_noisy_bn_noise_has_santurkars_moments_per_layer():
    layer = get_norm("noisy_bn")(4)  # RunConfig defaults: 0.5, 1.25, 0.1, 0.1, per layer
    m, s = _noise_draws(layer, (8, 4, 5, 5), 600)
    mu, sigma = m.mean(dim=(1, 2, 3, 4)), s.mean(dim=(1, 2, 3, 4))  # one (μ, σ) per draw (layer, step)
    # μ ~ U(-0.5, 0.5): mean 0, variance 1/12, within its support (up to the element average's noise)
    assert mu.abs().max() <= 0.5 + 0.02 and mu.abs().max() > 0.45
    assert abs(mu.mean()) < 0.04 and abs(mu.var() - 1 / 12) < 0.015
    # σ ~ U(1, 1.25): mean 1.125, variance 0.25²/12
    assert 1 - 0.02 <= sigma.min() and sigma.max() <= 1.25 + 0.02
    assert abs(sigma.mean() - 1.125) < 0.01 and abs(sigma.var() - 0.25 ** 2 / 12) < 0.002
    # per element: m ~ U(μ ± 0.1) (variance 0.1²/3, bounded by 0.1), s ~ N(σ, 0.1²)
    m_dev = m - m.mean(dim=(1, 2, 3, 4), keepdim=True)
    assert m_dev.abs().max() <= 0.1 + 0.01
    assert abs(m_dev.var() / (0.1 ** 2 / 3) - 1) < 0.05
    s_dev = s - s.mean(dim=(1, 2, 3, 4), keepdim=True)
    assert abs(s_dev.std() / 0.1 - 1) < 0.05
    kurt = (s_dev ** 4).mean() / s_dev.var() ** 2
    assert abs(kurt - 3) < 0.2  # Gaussian (a uniform would give 1.8)
    # one (μ, σ) for the whole layer: the channel means of a draw agree up to the element noise
    assert m.mean(dim=(1, 3, 4)).std(dim=1).max() < 0.03


def test_noisy_bn_options_set_the_distribution_per_channel():
    opts = dict(noise_mean_range=2.0, noise_scale_max=3.0, noise_mean_spread=0.5, noise_scale_std=0.3,
                noise_per="channel")
    layer = get_norm("noisy_bn", **opts)(16)
    m, s = _noise_draws(layer, (4, 16, 6, 6), 100)
    mu = m.mean(dim=(1, 3, 4))  # (draws, C): one μ per channel and step
    sigma = s.mean(dim=(1, 3, 4))
    assert abs(mu.var() - 4.0 ** 2 / 12) < 0.15 and mu.abs().max() <= 2.0 + 0.1
    assert abs(sigma.mean() - 2.0) < 0.05 and sigma.min() >= 1 - 0.1 and sigma.max() <= 3.0 + 0.1
    assert mu.std(dim=1).mean() > 0.8  # channels of one step differ: drawn per channel
    m_dev = m - m.mean(dim=(1, 3, 4), keepdim=True)
    assert m_dev.abs().max() <= 0.5 + 0.1 and abs(m_dev.var() / (0.5 ** 2 / 3) - 1) < 0.05
    assert abs((s - s.mean(dim=(1, 3, 4), keepdim=True)).std() / 0.3 - 1) < 0.05


def test_noisy_bn_is_bn_then_noise_in_train_mode_and_bn_times_the_noise_mean_in_eval_mode():
    ours = get_norm("noisy_bn", gamma0=0.5)(4)
    ref = nn.BatchNorm2d(4)
    with torch.no_grad():
        ref.weight.fill_(0.5)
    xs = [_x(seed=i) for i in range(3)]
    for x in xs:
        torch.manual_seed(7)
        y = ours.train()(x)
        torch.manual_seed(7)
        torch.testing.assert_close(y, ours.perturb(ref.train()(x)))
        assert (y - ref.eval()(x)).abs().mean() > 0.05  # the noise is really there
    torch.testing.assert_close(ours.running_mean, ref.running_mean)  # statistics of the input, pre-noise
    torch.testing.assert_close(ours.running_var, ref.running_var)
    state = torch.get_rng_state()
    ours.eval(), ref.eval()
    for x in xs:
        torch.testing.assert_close(ours(x), ref(x) * (1 + 1.25) / 2)  # E[s]·a + E[m], E[s] = (1 + σ_max)/2
    assert torch.equal(torch.get_rng_state(), state)  # eval mode draws nothing


def test_noisy_bn_eval_is_the_trained_networks_expectation():
    """The bug of the first P3 run: eval mode was plain BN, so a net trained with E[s] = 1.125
    after every norm was evaluated without it (train accuracy 0.62, test 0.27). Through a stack
    of (noisy BN, ReLU, conv, + skip), the eval output must be closer to the mean train-mode output
    over many draws than plain BN's eval output is."""
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.conv = get_norm("noisy_bn")(4), nn.Conv2d(4, 4, 1, bias=False)

        def forward(self, x):
            return x + self.conv(torch.relu(self.norm(x)))

    net = nn.Sequential(*[Block() for _ in range(8)])
    x = _x(seed=3)
    with torch.no_grad():
        net.train()
        for _ in range(50):  # running statistics of the noisy inputs (momentum 0.1)
            net(x)
        train_mean = torch.stack([net(x) for _ in range(300)]).mean(0)
        net.eval()
        ev = net(x)
        for b in net:  # what the first run evaluated: plain BN
            b.norm.noise_scale_max = 1.0
        plain = net(x)

    def err(y):
        return float((y - train_mean).norm() / train_mean.norm())
    assert err(ev) < 0.5 * err(plain)


# ----------------------------------------------------------------------------------------------
# ghost_bn
# ----------------------------------------------------------------------------------------------

def test_ghost_bn_with_one_virtual_batch_is_bn():
    xs = [_x(n=8, seed=i) for i in range(3)]
    for g in (8, 32):  # virtual batch = batch, or larger than it
        ours = get_norm("ghost_bn", gamma0=0.7, momentum=0.2, ghost_batch_size=g)(4)
        ref = nn.BatchNorm2d(4, momentum=0.2)
        _randomize_affine(ours, ref)
        _assert_same_as_bn(ours, ref, xs)


def test_ghost_bn_normalizes_each_virtual_batch_and_averages_their_statistics():
    x = _x(n=10, seed=3)
    layer = get_norm("ghost_bn", ghost_batch_size=4)(4)
    gamma, beta = _randomize_affine(layer)
    y = layer.train()(x)
    parts = (x[:4], x[4:])  # 10 = 4 + 6: the remainder joins the last virtual batch
    expected = torch.cat([gamma * _bn_train(p) + beta for p in parts])
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    mean = torch.stack([p.mean(dim=(0, 2, 3)) for p in parts]).mean(0)
    var = torch.stack([p.var(dim=(0, 2, 3), unbiased=True) for p in parts]).mean(0)
    torch.testing.assert_close(layer.running_mean, 0.1 * mean)
    torch.testing.assert_close(layer.running_var, 0.9 + 0.1 * var)
    # not BN: the two halves are normalized separately
    assert not torch.allclose(y, gamma * _bn_train(x) + beta, atol=1e-3)
    torch.testing.assert_close(layer.eval()(x), F.batch_norm(x, layer.running_mean, layer.running_var,
                                                             layer.weight, layer.bias, False, 0.0, 1e-5))


# ----------------------------------------------------------------------------------------------
# group_norm, layer_norm
# ----------------------------------------------------------------------------------------------

def test_group_norm_with_one_group_per_channel_is_instance_norm():
    ours = get_norm("group_norm", norm_groups=6)(6)
    ref = nn.InstanceNorm2d(6, affine=True)
    _randomize_affine(ours, ref)
    x = _x(c=6, seed=4)
    for mode in (True, False):  # no batch statistics: train and eval agree
        torch.testing.assert_close(ours.train(mode)(x), ref(x), rtol=1e-5, atol=1e-5)
    assert list(ours.buffers()) == []


def test_group_norm_groups_and_fallback():
    x = _x(c=8, seed=5)
    layer = get_norm("group_norm", norm_groups=2)(8)
    gamma, beta = _randomize_affine(layer)
    xg = x.view(8, 2, 4, 5, 6)  # two groups of four consecutive channels
    mu = xg.mean(dim=(2, 3, 4), keepdim=True)
    var = xg.var(dim=(2, 3, 4), unbiased=False, keepdim=True)
    expected = ((xg - mu) / torch.sqrt(var + 1e-5)).view_as(x) * gamma + beta
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    # the default groups come from RunConfig; a count they do not divide gets gcd(groups, C)
    assert get_norm("group_norm")(32).num_groups == RunConfig.norm_groups
    assert GroupNorm2d(12, 8, 1e-5).num_groups == 4 and GroupNorm2d(3, 8, 1e-5).num_groups == 1


def test_layer_norm_is_per_sample_over_channels_height_width():
    layer = get_norm("layer_norm", eps=1e-3)(4)
    gamma, beta = _randomize_affine(layer)
    x = _x(seed=6)
    mu = x.mean(dim=(1, 2, 3), keepdim=True)  # one mean and variance per sample over (C, H, W)
    var = x.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
    expected = (x - mu) / torch.sqrt(var + 1e-3) * gamma + beta
    torch.testing.assert_close(layer.train()(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.eval()(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x[:1]), expected[:1], rtol=1e-5, atol=1e-5)  # independent of the batch


# ----------------------------------------------------------------------------------------------
# batch_renorm
# ----------------------------------------------------------------------------------------------

def test_batch_renorm_with_rmax_1_dmax_0_is_bn():
    ours = get_norm("batch_renorm", renorm_r_max=1.0, renorm_d_max=0.0, renorm_warmup_steps=0)(4)
    ref = nn.BatchNorm2d(4)
    _randomize_affine(ours, ref)
    _assert_same_as_bn(ours, ref, [_x(seed=i, shift=3.0 * i) for i in range(3)])


def test_batch_renorm_corrects_towards_the_running_statistics_with_clipping():
    layer = get_norm("batch_renorm", renorm_r_max=1.5, renorm_d_max=0.5, renorm_warmup_steps=0)(4)
    gamma, beta = _randomize_affine(layer)
    run_mean, run_var = torch.tensor([0.0, 1.0, 2.0, 1.5]), torch.tensor([1.0, 4.0, 9.0, 0.25])
    with torch.no_grad():
        layer.running_mean.copy_(run_mean)
        layer.running_var.copy_(run_var)
    x = _x(seed=7)  # batch mean ~1.5, std ~2
    mu, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
    sd, run_sd = torch.sqrt(var + 1e-5), torch.sqrt(run_var + 1e-5)
    r = (sd / run_sd).clamp(1 / 1.5, 1.5)
    d = ((mu - run_mean) / run_sd).clamp(-0.5, 0.5)
    assert (r == 1.5).any() and (r == 1 / 1.5).any() and (d.abs() == 0.5).any()  # the clips are exercised
    view = lambda t: t.view(1, -1, 1, 1)  # noqa: E731
    expected = gamma * ((x - view(mu)) / view(sd) * view(r) + view(d)) + beta
    torch.testing.assert_close(layer.train()(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.running_mean, 0.9 * run_mean + 0.1 * mu)
    torch.testing.assert_close(layer.running_var, 0.9 * run_var + 0.1 * x.var(dim=(0, 2, 3), unbiased=True))


def test_batch_renorm_limits_ramp_over_the_warmup():
    layer = get_norm("batch_renorm", renorm_r_max=3.0, renorm_d_max=5.0, renorm_warmup_steps=10)(2)
    for t, (r, d) in {0: (1.0, 0.0), 5: (2.0, 2.5), 10: (3.0, 5.0), 50: (3.0, 5.0)}.items():
        layer.num_batches_tracked.fill_(t)
        assert [float(v) for v in layer.limits()] == pytest.approx([r, d])
    # the first training step is exactly BN, whatever the (initial) running statistics
    layer.num_batches_tracked.zero_()
    x = _x(c=2, seed=8, shift=4.0)
    torch.testing.assert_close(layer.train()(x), _bn_train(x), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# ics_free_stale: the previous batch's statistics in the forward, BN's gradient in the backward
# (P3's first ICS-free scheme, kept as a measured negative result)
# ----------------------------------------------------------------------------------------------

def test_ics_free_stale_normalizes_with_the_previous_batchs_statistics():
    layer = get_norm("ics_free_stale")(4)
    gamma, beta = _randomize_affine(layer)
    a, b = _x(seed=9, shift=-2.0, scale=0.5), _x(seed=10, shift=3.0, scale=4.0)  # far-apart statistics
    # first forward: no previous batch, so BN on this one
    torch.testing.assert_close(layer.train()(a), gamma * _bn_train(a) + beta, rtol=1e-5, atol=1e-5)
    # second: b normalized with a's mean and (biased) variance, not its own
    xb = b.clone().requires_grad_()
    y = layer(xb)
    mu_a = a.mean(dim=(0, 2, 3), keepdim=True)
    sd_a = torch.sqrt(a.var(dim=(0, 2, 3), unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(y, gamma * (b - mu_a) / sd_a + beta, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(y, gamma * _bn_train(b) + beta, atol=0.1)
    # ... while the gradient is BN's through b's own statistics, scaled by r = σ_b / σ_a
    up = torch.randn_like(y)
    y.backward(up)
    xr = b.clone().requires_grad_()
    (gamma * _bn_train(xr) + beta).backward(up)
    sd_b = torch.sqrt(b.var(dim=(0, 2, 3), unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(xb.grad, xr.grad * sd_b / sd_a, rtol=1e-4, atol=1e-5)
    # the running statistics and eval mode are BN's
    ref = nn.BatchNorm2d(4)
    _randomize_affine(ref)
    ref.train()(a), ref(b)
    torch.testing.assert_close(layer.running_mean, ref.running_mean)
    torch.testing.assert_close(layer.running_var, ref.running_var)
    torch.testing.assert_close(layer.eval()(a), ref.eval()(a))
    # a third batch is normalized with b's statistics
    c = _x(seed=11)
    torch.testing.assert_close(layer.train()(c), gamma * (c - b.mean(dim=(0, 2, 3), keepdim=True)) / sd_b + beta,
                               rtol=1e-4, atol=1e-4)


def test_ics_free_stale_does_not_undo_a_shift_that_bn_undoes():
    """What the scheme is for, on one layer: an update that shifts and rescales the layer's input
    (the layers below moved) reaches the output of ics_free_stale, and not of BN."""
    x = _x(seed=12)
    shifted = 1.7 * x + 0.8  # the same batch after an update of the layers below
    bn, free = get_norm("bn")(4).train(), get_norm("ics_free_stale")(4).train()
    bn(x), free(x)  # the previous step
    assert torch.allclose(bn(shifted), bn(x), atol=1e-4)  # BN divides the shift out
    assert not torch.allclose(free(shifted), free(x), atol=0.1)  # ics_free_stale passes it on
    mu = x.mean(dim=(0, 2, 3), keepdim=True)
    sd = torch.sqrt(x.var(dim=(0, 2, 3), unbiased=False, keepdim=True) + 1e-5)
    free(x)  # the previous batch is x again
    torch.testing.assert_close(free(shifted), (shifted - mu) / sd, rtol=1e-4, atol=1e-4)


def test_ics_free_stale_is_unstable_through_depth_even_without_updates():
    """Measured property of the stale-statistics scheme (documented in StaleBatchNorm2d): with
    the weights frozen, batch-to-batch noise in a deep stack is differenced in time at every
    layer (each layer passes on its input's scale relative to the previous step's), so the
    deepest layer's output scale drifts by orders of magnitude while BN's stays at 1."""
    def stack(norm):
        torch.manual_seed(0)
        return nn.Sequential(*[m for _ in range(16) for m in (nn.Conv2d(4, 4, 3, padding=1, bias=False),
                                                               get_norm(norm)(4), nn.ReLU())]).train()
    worst = {}
    for norm in ("bn", "ics_free_stale"):
        net, g, out = stack(norm), torch.Generator().manual_seed(1), []
        with torch.no_grad():
            for _ in range(40):
                y = net[:-1](torch.randn(16, 4, 8, 8, generator=g))  # the last norm's output
                out.append(float(y.std(dim=(0, 2, 3)).log10().abs().max()))
        worst[norm] = max(out[1:])
    assert worst["bn"] < 0.05  # BN: every channel at unit scale, every step
    assert worst["ics_free_stale"] > 1.0  # stale statistics: off by more than 10x at depth 16


# ----------------------------------------------------------------------------------------------
# ics_free: the statistics BN computes on the same batch with the previous step's parameters
# (a no-gradient reference pass, bnlib.ics_free.IcsFreeBatchNorm2d), BN's gradient
# ----------------------------------------------------------------------------------------------

class _Toy(nn.Module):
    """conv-norm-relu x3 + linear head, with `norm` layers; ics_free's reference pass attached
    as the model factory attaches it (NormSpec.attach)."""

    def __init__(self, norm="ics_free", c=4):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(3 if i == 0 else c, c, 3, padding=1, bias=False) for i in range(3)])
        self.norms = nn.ModuleList([get_norm(norm)(c) for _ in range(3)])
        self.head = nn.Linear(c, 5)
        if NORMS[norm].attach is not None:
            NORMS[norm].attach(self)

    def forward(self, x):
        for conv, norm in zip(self.convs, self.norms):
            x = torch.relu(norm(conv(x)))
        return self.head(x.mean(dim=(2, 3)))


def _as_bn(model):
    """A plain-BN copy of a _Toy holding `model`'s parameters (and running statistics)."""
    bn = _Toy("bn")
    bn.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("ics_free_reference")})
    return bn


def _norm_inputs(model, x, grad=False):
    """Per norm layer (by index), the input it sees in one train-mode forward of x."""
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda _m, a, i=i: seen.__setitem__(i, a[0].detach().clone()))
             for i, m in enumerate(model.norms)]
    try:
        with torch.set_grad_enabled(grad):
            out = model.train()(x)
    finally:
        for h in hooks:
            h.remove()
    return seen, out


def _sgd_steps(model, xs, lr=0.2):
    """Train-mode steps of SGD on batches xs; returns the parameters each forward ran with."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    used = []
    for k, x in enumerate(xs):
        used.append({n: p.detach().clone() for n, p in model.named_parameters()})
        opt.zero_grad()
        nn.functional.cross_entropy(model.train()(x), torch.arange(len(x)) % 5).backward()
        opt.step()
    return used


def test_ics_free_reference_statistics_are_bns_on_the_same_batch_with_the_previous_parameters():
    torch.manual_seed(0)
    model = _Toy()
    xs = [torch.randn(8, 3, 6, 6) * (1 + k) + k for k in range(4)]
    used = _sgd_steps(model, xs)
    previous = _Toy("bn")  # the parameters of step t-1 (the last forward's), plain BN
    previous.load_state_dict(used[-2], strict=False)
    with torch.no_grad():  # the same batch as step t's, through step t-1's network, batch statistics
        seen, _ = _norm_inputs(previous, xs[-1])
    for i, m in enumerate(model.norms):
        mu_ref, var_ref = m.reference
        torch.testing.assert_close(mu_ref, seen[i].mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(var_ref, seen[i].var(dim=(0, 2, 3), unbiased=False), rtol=1e-5, atol=1e-6)
    # the snapshot now holds the parameters of step t, for step t + 1
    snap = model.ics_free_reference.params()
    for n, p in used[-1].items():
        assert torch.equal(snap[n], p), n
    # and the reference is not the statistics of step t's parameters (the update moved them)
    ref = model.norms[2].reference[0]
    now, _ = _norm_inputs(model, xs[-1])  # (a no-gradient forward: plain BN with the current parameters)
    assert not torch.allclose(ref, now[2].mean(dim=(0, 2, 3)), atol=1e-3)


def test_ics_free_forward_normalizes_with_the_reference_statistics():
    torch.manual_seed(1)
    model = _Toy()
    for m in model.norms:
        _randomize_affine(m, seed=3)
    xs = [torch.randn(8, 3, 6, 6) + k for k in range(3)]
    _sgd_steps(model, xs[:2])
    outs = {}
    hooks = [m.register_forward_hook(lambda _m, a, out, i=i: outs.__setitem__(i, (a[0].detach(), out.detach())))
             for i, m in enumerate(model.norms)]
    model(xs[2])  # a training forward (gradients on): reference pass, then the real one
    for h in hooks:
        h.remove()
    for i, m in enumerate(model.norms):
        x, y = outs[i]
        mu, var = (t.view(1, -1, 1, 1) for t in m.reference)
        expected = m.weight.view(1, -1, 1, 1) * (x - mu) / torch.sqrt(var + m.eps) + m.bias.view(1, -1, 1, 1)
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(y, m.weight.view(1, -1, 1, 1) * _bn_train(x) + m.bias.view(1, -1, 1, 1), atol=1e-3)


def test_ics_free_first_step_is_bn():
    """No previous parameters: the snapshot is the constructed network's, so the reference is
    the batch's own statistics (r = 1, d = 0): outputs, gradients and running statistics are BN's."""
    torch.manual_seed(2)
    model = create_model("resnet8", width=0.25, norm="ics_free")
    bn = create_model("resnet8", width=0.25, norm="bn")
    bn.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("ics_free_reference")})
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 10, (8,))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    oa, ob = model.train()(xa), bn.train()(xb)
    torch.testing.assert_close(oa, ob, rtol=1e-5, atol=1e-6)
    nn.functional.cross_entropy(oa, y).backward(), nn.functional.cross_entropy(ob, y).backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-7)
    for (n, p), q in zip(model.named_parameters(), bn.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7, msg=n)
    ours, ref = model.state_dict(), bn.state_dict()
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], msg=k)


def test_ics_free_input_gradient_has_no_component_along_the_batch_mean_or_xhat():
    """BN's Jacobian (the reference statistics are constants of the backward): per channel the
    input gradient sums to 0 and is orthogonal to the batch-normalized input x̂_B."""
    torch.manual_seed(3)
    model = _Toy()
    xs = [torch.randn(8, 3, 6, 6) * (1 + k) for k in range(3)]
    _sgd_steps(model, xs[:2], lr=0.5)
    seen, _ = _norm_inputs(model, xs[2], grad=True)  # a training forward: the reference of this batch
    m = model.norms[1]
    x = seen[1].requires_grad_()
    y = m(x)  # the layer again, with that reference
    r = torch.sqrt(m.reference[1] + m.eps) / torch.sqrt(x.detach().var(dim=(0, 2, 3), unbiased=False) + m.eps)
    assert (r - 1).abs().max() > 1e-3  # the reference really differs from the batch (r != 1)
    y.backward(torch.randn_like(y))
    g = x.grad
    scale = g.abs().sum(dim=(0, 2, 3))
    assert (g.sum(dim=(0, 2, 3)).abs() / scale).max() < 1e-5
    assert ((g * _bn_train(x.detach())).sum(dim=(0, 2, 3)).abs() / scale).max() < 1e-4


def test_ics_free_passes_on_the_latest_update_and_only_it():
    """What the scheme is for: after an update that rescales and shifts a layer's input (the
    layers below moved), BN's output is unchanged and ics_free's carries the change; one step
    later that shift is in the reference and removed again (BN's scale control)."""
    torch.manual_seed(4)
    model = _Toy()
    x = torch.randn(16, 3, 6, 6)
    model(x)  # step t-1: the snapshot is now these parameters
    with torch.no_grad():
        model.convs[0].weight.mul_(1.7)  # "the update" of the first layer: its output scale x 1.7
    seen, _ = _norm_inputs(model, x, grad=True)  # step t: the same batch
    out0 = model.norms[0](seen[0])  # the layer's output as step t computed it (same reference)
    bn_out0 = _bn_train(seen[0])  # BN: the rescaling divided out
    assert torch.allclose(out0.std(dim=(0, 2, 3)), 1.7 * bn_out0.std(dim=(0, 2, 3)), rtol=1e-3)
    seen, _ = _norm_inputs(model, x, grad=True)  # step t + 1, nothing moved: the shift is removed again
    torch.testing.assert_close(model.norms[0](seen[0]), _bn_train(seen[0]), rtol=1e-4, atol=1e-5)


def test_ics_free_is_stable_through_depth_where_stale_statistics_are_not():
    """The failure of ics_free_stale (test above) does not occur: with frozen weights the
    reference is the batch's own BN statistics, so a 16-layer stack stays at unit scale."""
    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(*[m for _ in range(16) for m in (nn.Conv2d(4, 4, 3, padding=1, bias=False),
                                                                        get_norm("ics_free")(4), nn.ReLU())])
            NORMS["ics_free"].attach(self)

        def forward(self, x):
            return self.body[:-1](x)

    torch.manual_seed(0)
    net, g, worst = Stack().train(), torch.Generator().manual_seed(1), 0.0
    for _ in range(20):  # training forwards (gradients on), weights frozen
        y = net(torch.randn(16, 4, 8, 8, generator=g)).detach()
        worst = max(worst, float(y.std(dim=(0, 2, 3)).log10().abs().max()))
    assert worst < 0.05


def test_ics_free_no_grad_forwards_are_bn_and_leave_the_snapshot():
    torch.manual_seed(5)
    model = _Toy()
    _sgd_steps(model, [torch.randn(8, 3, 6, 6) for _ in range(2)])
    snap = {k: v.clone() for k, v in model.ics_free_reference.state_dict().items()}
    x = torch.randn(8, 3, 6, 6)
    with torch.no_grad():
        out = model.train()(x)
    torch.testing.assert_close(out, _as_bn(model).train()(x), rtol=1e-5, atol=1e-6)
    assert all(m.reference is None for m in model.norms)
    for k, v in model.ics_free_reference.state_dict().items():
        assert torch.equal(v, snap[k]), k


def test_ics_free_resumes_identically_from_a_state_dict_and_a_copy_leaves_the_original_alone():
    torch.manual_seed(6)
    a = _Toy()
    xs = [torch.randn(8, 3, 6, 6) * (1 + k) for k in range(4)]
    _sgd_steps(a, xs[:2])
    b = _Toy()
    b.load_state_dict(a.state_dict())  # the snapshot is part of the state: the next step is identical
    state = {k: v.clone() for k, v in a.state_dict().items()}
    twin = copy.deepcopy(a)
    _sgd_steps(twin, xs[2:])  # a probe-like copy trains on: the original is untouched
    for k, v in a.state_dict().items():
        assert torch.equal(v, state[k]), k
    ya, yb = a.train()(xs[2]), b.train()(xs[2])
    assert torch.equal(ya, yb)


def test_ics_free_runs_under_bf16_autocast_in_channels_last():
    torch.manual_seed(7)
    model = create_model("resnet8", width=0.25, norm="ics_free").to(memory_format=torch.channels_last)
    assert model.ics_free_reference.stem__0__weight.is_contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        x = torch.rand(8, 3, 16, 16).to(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.train()(x)
            layer = norm_layers(model)[0][1]
        assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
        assert layer.reference[0].dtype == torch.float32
        opt.zero_grad()
        nn.functional.cross_entropy(out.float(), torch.arange(8) % 10).backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
    # with double precision too (a probe runs a copy of the net in fp64)
    d = copy.deepcopy(model).double()
    y = d.train()(torch.rand(4, 3, 16, 16, dtype=torch.float64))
    assert y.dtype == torch.float64 and norm_layers(d)[0][1].reference[0].dtype == torch.float64


# ----------------------------------------------------------------------------------------------
# the registry mechanism: options, precise statistics, one real training step each
# ----------------------------------------------------------------------------------------------

def test_options_are_registry_driven():
    for name in P3_NORMS:
        spec = NORMS[name]
        assert all(k in RunConfig.__dataclass_fields__ for k in spec.options), name
    with pytest.raises(ValueError, match=r"norm='bn' takes no option\(s\) \['norm_groups'\]"):
        get_norm("bn", norm_groups=4)
    # the factory passes the options through to every norm layer
    model = create_model("resnet8", width=0.25, norm="ghost_bn", norm_options={"ghost_batch_size": 6})
    assert {m.ghost_batch_size for _, m in norm_layers(model)} == {6}
    cfg = validate(norm="group_norm", norm_groups=2, arch="resnet8", width=0.25)
    assert {m.num_groups for _, m in norm_layers(build_model(cfg))} == {2}


@pytest.mark.parametrize("name", ["noisy_bn", "ics_free", "ics_free_stale", "batch_renorm", "ghost_bn"])
def test_precise_statistics_leave_rng_and_every_buffer_untouched(name):
    torch.manual_seed(0)
    model = create_model("resnet8", width=0.25, norm=name, norm_options={"ghost_batch_size": 4}
                         if name == "ghost_bn" else None)
    assert bnstats.has_running_stats(model)
    model.train()
    for i in range(2):  # some training state: running and previous-batch statistics, counters
        model(torch.rand(8, 3, 16, 16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    batches = [torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    with bnstats.precise_bn(model, batches):
        layer = norm_layers(model)[0][1]  # the stem's norm: its input does not depend on the batch order
        xs = torch.cat([model.input_norm(b) for b in batches])
        h = model.stem[0](xs).double()
        torch.testing.assert_close(layer.running_mean.double(), h.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.running_var.double(), h.var(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("name", P3_NORMS)
def test_every_p3_norm_trains_a_step_with_gamma_beta_grouped_and_tracked(tmp_path, name):
    params = dict(norm=name, arch="resnet8", width=0.25, synthetic_size=100, val_fraction=0.2, n_train=16,
                  n_test=20, batch_size=16, epochs=1, progress=False, out_dir=str(tmp_path), precision="fp32",
                  bn_eval_stats="precise", precise_batches=1, ghost_batch_size=8, norm_groups=4,
                  gamma_lr_mult=0.5, bias_lr_mult=0.25)
    res = bnlib.run(params)
    assert res["status"] == "completed", res
    cfg = validate(params)
    model = build_model(cfg)
    layers = norm_layers(model)
    assert len(layers) == 9  # stem + 2 per block × 3 blocks + 2 projection shortcuts
    assert all(m._bnlib_norm == name for _, m in layers)
    groups = {g["name"]: g for g in param_groups(model, cfg)}
    assert {id(p) for p in groups["scale"]["params"]} == {id(m.weight) for _, m in layers}
    assert {id(m.bias) for _, m in layers} <= {id(p) for p in groups["bias"]["params"]}
    assert groups["scale"]["lr"] == pytest.approx(0.05) and groups["bias"]["lr"] == pytest.approx(0.025)
    table = pd.read_parquet(res.run_dir / "norm_params.parquet")
    names = [n for n, _ in layers]
    for epoch in (0, 1):
        rows = table[table.epoch == epoch]
        assert sorted(rows.layer.unique()) == sorted(names)
        assert set(map(tuple, rows[["layer", "param"]].values)) == {(n, p) for n in names for p in ("gamma", "beta")}
    moved = table[table.epoch == 1].mean_abs_delta
    assert (moved > 0).any()  # the step changed γ/β: they are trained
    assert math.isfinite(res["metrics"]["final_test_acc"])


@pytest.mark.parametrize("params, needles", [
    (dict(norm="group_norm", norm_groups=3),
     ["norm_groups=3", "[16, 32, 64, 128]", "valid choices here: [1, 2, 4, 8, 16]"]),
    (dict(norm="group_norm", arch="resnet20", width=0.25), ["norm_groups=8", "[4, 8, 16]", "[1, 2, 4]"]),
    (dict(norm="ghost_bn", ghost_batch_size=48),
     ["ghost_batch_size=48", "batch_size=128", "[2, 4, 8, 16, 32, 64, 128]"]),
    (dict(norm="ghost_bn", ghost_batch_size=1), ["ghost_batch_size=1", ">= 2"]),
    (dict(norm="batch_renorm", renorm_r_max=0.5), ["renorm_r_max=0.5", ">= 1"]),
    (dict(norm="batch_renorm", renorm_d_max=-1.0), ["renorm_d_max=-1.0", ">= 0"]),
    (dict(norm="batch_renorm", renorm_warmup_steps=2.5), ["renorm_warmup_steps=2.5", "an integer"]),
    (dict(norm="noisy_bn", noise_scale_max=0.9), ["noise_scale_max=0.9", ">= 1"]),
    (dict(norm="noisy_bn", noise_per="sample"), ["noise_per='sample'", "['layer', 'channel']"]),
    (dict(norm="noisy_bn", noise_mean_range=-0.1), ["noise_mean_range=-0.1", ">= 0"]),
])
def test_bad_norm_options_are_config_errors(tmp_path, params, needles):
    with pytest.raises(ConfigError) as ei:
        validate(params)
    for needle in needles:
        assert needle in str(ei.value), (needle, str(ei.value))
    with pytest.raises(ConfigError):  # and through run(), before anything is written
        bnlib.run({**params, "out_dir": str(tmp_path / "runs")})
    assert not (tmp_path / "runs").exists()


def test_good_norm_options_are_accepted():
    assert validate(norm="ghost_bn", batch_size=64, ghost_batch_size=64)["ghost_batch_size"] == 64
    assert validate(norm="group_norm", arch="resnet20", width=0.25, norm_groups=4)["norm_groups"] == 4
    assert validate(norm="batch_renorm", renorm_r_max=1, renorm_d_max=0)["renorm_r_max"] == 1.0
    # another norm's options do not constrain this one
    assert validate(norm="bn", norm_groups=3, ghost_batch_size=48)["norm"] == "bn"


@pytest.mark.parametrize("name", ["noisy_bn", "ics_free", "ics_free_stale"])
def test_training_with_probes_stays_bit_identical(tmp_path, name):
    """The probe contract with a norm that draws random numbers (noisy_bn) or keeps extra state
    (ics_free's parameter snapshot and reference pass, ics_free_stale's previous-batch
    statistics): probes copy the model and restore every RNG, so the training is unchanged."""
    from bnlib.probes import probe_names
    base = dict(norm=name, arch="resnet8", width=0.25, synthetic_size=100, val_fraction=0.2, n_train=32, n_test=20,
                batch_size=16, epochs=1, progress=False, precision="fp32", log_every=1, bn_eval_stats="precise",
                precise_batches=1, probe_batch_size=16)
    plain = bnlib.run({**base, "out_dir": str(tmp_path / "a")})
    probed = bnlib.run({**base, "out_dir": str(tmp_path / "b"), "probes": probe_names(), "probe_every": 1})
    for t, drop in (("epochs", ["seconds", "img_per_s"]), ("steps", []), ("norm_params", [])):
        a = pd.read_parquet(plain.run_dir / f"{t}.parquet").drop(columns=drop, errors="ignore")
        b = pd.read_parquet(probed.run_dir / f"{t}.parquet").drop(columns=drop, errors="ignore")
        pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert not bnlib.load_runs(tmp_path / "b").probes.empty


@pytest.mark.parametrize("name", ["noisy_bn", "ics_free", "ics_free_stale", "batch_renorm", "ghost_bn"])
def test_checkpointed_blocks_recompute_what_the_forward_computed(name):
    """checkpoint_blocks recomputes each block in the backward pass: with the buffers the first
    forward saw (ics_free_stale and batch_renorm read theirs in train mode; ics_free its
    reference statistics, recorded before the real forward) and the same noise."""
    torch.manual_seed(0)
    ref = create_model("resnet8", width=0.25, norm=name, norm_options={"ghost_batch_size": 2}
                       if name == "ghost_bn" else None)
    ckp = copy.deepcopy(ref)
    ckp.checkpoint_blocks = True
    for step in range(2):  # the second step normalizes with the first one's statistics (ics_free_stale)
        x, y = torch.rand(4, 3, 16, 16), torch.randint(0, 10, (4,))
        for model in (ref, ckp):
            model.zero_grad()
            torch.manual_seed(10 + step)  # the same noise (noisy_bn) in both
            nn.functional.cross_entropy(model(x), y).backward()
        for (n, p), q in zip(ref.named_parameters(), ckp.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=n)
        for (n, b), c in zip(ref.named_buffers(), ckp.buffers()):
            assert torch.equal(b, c), n


def test_ics_free_stale_weight_gradient_is_orthogonal_to_the_weights_as_under_bn():
    """The docstring's claim: the backward pass is BN's, so the gradient of the conv before the
    layer is orthogonal to its weights (though the forward value, normalized with the previous
    batch's statistics, is not invariant to their scale within a step)."""
    torch.manual_seed(0)
    for name in ("bn", "ics_free_stale", "none"):
        conv, norm = nn.Conv2d(3, 4, 3, bias=False), get_norm(name)(4).train()
        head = torch.randn(4 * 6 * 6, 5)
        for step in range(2):  # the second step normalizes with the first batch's statistics
            conv.zero_grad()
            x = torch.randn(8, 3, 8, 8) * (1 + step) + step
            out = torch.relu(norm(conv(x))).flatten(1) @ head
            nn.functional.cross_entropy(out, torch.arange(8) % 5).backward()
        w, g = conv.weight.detach().flatten(), conv.weight.grad.flatten()
        cos = float(w @ g / (w.norm() * g.norm()))
        assert (abs(cos) < 1e-4) == (name != "none"), (name, cos)


def test_run_identity_ignores_the_options_of_other_norms():
    from bnlib.records import run_id
    assert run_id(validate(norm="bn")) == run_id(validate(norm="bn", norm_groups=4, ghost_batch_size=64))
    assert run_id(validate(norm="group_norm")) != run_id(validate(norm="group_norm", norm_groups=4))
    assert run_id(validate(norm="ghost_bn")) != run_id(validate(norm="ghost_bn", ghost_batch_size=64))
    assert run_id(validate(norm="group_norm", norm_groups=4)) == run_id(validate(norm="group_norm", norm_groups=4,
                                                                                 ghost_batch_size=64))


@pytest.mark.parametrize("name", P3_NORMS)
def test_every_p3_norm_runs_in_double_precision(name):
    """Some probes run a copy of the net in fp64 (signal propagation): no fp32 scratch may leak in."""
    layer = get_norm(name)(4).double().train()
    x = _x().double().requires_grad_()
    y = layer(x)
    assert y.dtype == torch.float64
    y.square().sum().backward()
    assert x.grad.dtype == torch.float64 and torch.isfinite(x.grad).all()
    assert all(b.dtype in (torch.float64, torch.int64) for b in layer.buffers())
