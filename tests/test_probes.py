"""bnlib.probes: the contract every registered probe keeps, and the P4 probes against known answers."""
import random

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnlib
from bnlib.config import ConfigError
from bnlib.probes import COLUMNS, PROBES, ProbeRunner, probe_names, register_probe
from bnlib.train import build_model, make_optimizer, param_groups

TINY = dict(arch="resnet8", width=0.25, synthetic_size=300, val_fraction=0.2, n_test=60, batch_size=32,
            epochs=2, progress=False, log_every=2, precision="fp32")


def _loss(o, t):
    return F.cross_entropy(o.float(), t)


def _setup(probes, **kw):
    """A tiny BN net, its optimizer after two real steps (gradients and momentum present)."""
    cfg = bnlib.validate(arch="resnet8", width=0.25, probes=probes, probe_batch_size=24, **kw)
    torch.manual_seed(0)
    model = build_model(cfg).to(memory_format=torch.channels_last)
    opt = make_optimizer(param_groups(model, cfg), cfg)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(16, 3, 32, 32, generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (16,), generator=g)
    for _ in range(2):
        opt.zero_grad()
        _loss(model(x), y).backward()
        opt.step()
    opt.zero_grad()
    _loss(model(x), y).backward()  # gradients present: a probe must leave them as they are
    pb = (torch.rand(24, 3, 32, 32, generator=g), torch.arange(24) % 10)
    gen = torch.Generator().manual_seed(5)
    return cfg, model, opt, x, y, pb, gen


def _state(model, opt, gen):
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
            "buffers": {n: b.clone() for n, b in model.named_buffers()},
            "opt": {k: {kk: (vv.clone() if torch.is_tensor(vv) else vv) for kk, vv in v.items()}
                    for k, v in opt.state_dict()["state"].items()},
            "groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
            "torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].copy(), "python": random.getstate(),
            "gen": gen.get_state(), "mode": model.training}


def _assert_same(a, b):
    for k in ("params", "grads", "buffers"):
        assert a[k].keys() == b[k].keys(), k
        for n in a[k]:
            assert torch.equal(a[k][n], b[k][n]), (k, n)
    assert a["opt"].keys() == b["opt"].keys()
    for i in a["opt"]:
        for kk, v in a["opt"][i].items():
            assert torch.equal(v, b["opt"][i][kk]) if torch.is_tensor(v) else v == b["opt"][i][kk]
    assert a["groups"] == b["groups"]
    assert torch.equal(a["torch"], b["torch"]) and (a["numpy"] == b["numpy"]).all() and a["python"] == b["python"]
    assert torch.equal(a["gen"], b["gen"]) and a["mode"] == b["mode"]


@pytest.mark.parametrize("name", probe_names())
def test_probe_leaves_training_state_bit_identical_and_computes_in_fp32(name):
    cfg, model, opt, x, y, pb, gen = _setup([name], probe_step_sizes=[0.0, 1e-3, 10.0])
    before = _state(model, opt, gen)
    runner = ProbeRunner(cfg, model, opt, _loss, pb, steps_per_epoch=4, generators=[gen])
    runner.at(3, x, y, epoch_end=True)
    _assert_same(before, _state(model, opt, gen))
    rows = runner.frame()
    assert len(rows) > 0 and list(rows.columns) == list(COLUMNS) and set(rows.probe) == {name}
    assert (rows.step == 3).all() and (rows.epoch == 0.75).all()
    # fp32 whatever the training precision: inside a bf16 autocast region the rows are the same
    again = ProbeRunner(cfg, model, opt, _loss, pb, steps_per_epoch=4, generators=[gen])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        again.at(3, x, y, epoch_end=True)
    pd.testing.assert_frame_equal(rows, again.frame())
    _assert_same(before, _state(model, opt, gen))


def test_training_with_every_probe_is_bit_identical_to_training_without(tmp_path):
    plain = bnlib.run({**TINY, "out_dir": str(tmp_path / "a")})
    probed = bnlib.run({**TINY, "out_dir": str(tmp_path / "b"), "probes": probe_names(), "probe_every": 3,
                        "probe_steps": [1]})
    for t, drop in (("epochs", ["seconds", "img_per_s"]), ("steps", []), ("norm_params", [])):
        a = pd.read_parquet(plain.run_dir / f"{t}.parquet").drop(columns=drop)
        b = pd.read_parquet(probed.run_dir / f"{t}.parquet").drop(columns=drop)
        pd.testing.assert_frame_equal(a, b, check_exact=True)
    runs = bnlib.load_runs(tmp_path / "b")
    spe = runs.epochs.step.iloc[0]
    assert set(runs.probes.probe) == set(probe_names())
    got = runs.probes.groupby("probe").step.unique().map(sorted).to_dict()
    expected = sorted({0, 1, spe, 2 * spe} | set(range(0, 2 * spe, 3)))
    assert all(v == expected for v in got.values()), got
    assert (runs.probes.epoch == runs.probes.step / spe).all()
    assert bnlib.load_runs(tmp_path / "a").probes.empty  # runs without probes have no probes table


def test_default_cadence_is_init_and_every_epoch_end_and_name_at_k_sets_one_probe(tmp_path):
    res = bnlib.run({**TINY, "out_dir": str(tmp_path), "probes": ["final_layer_grad", "channel_moments@4"]})
    p = bnlib.load_runs(tmp_path).probes
    spe = int(pd.read_parquet(res.run_dir / "epochs.parquet").step.iloc[0])
    steps = p.groupby("probe").step.unique().map(sorted).to_dict()
    assert steps["final_layer_grad"] == [0, spe, 2 * spe]
    assert steps["channel_moments"] == sorted({0, spe, 2 * spe} | set(range(0, 2 * spe, 4)))


def test_probe_rows_survive_a_resume(tmp_path):
    """A run interrupted in epoch 2 and resumed from its epoch-1 checkpoint records the same
    probe rows as an uninterrupted one: none lost, none twice."""
    calls = {"n": 0}

    @register_probe("_interrupt_once", doc="test only: Ctrl-C at step 12, once")
    def _interrupt(ctx):
        if ctx.step == 12 and calls["n"] == 0:
            calls["n"] += 1
            raise KeyboardInterrupt
        return [ctx.row("_interrupt_once", "step_seen", ctx.step)]

    try:
        params = {**TINY, "epochs": 3, "probes": ["layer_grads", "_interrupt_once@4"]}
        with pytest.raises(KeyboardInterrupt):
            bnlib.run({**params, "out_dir": str(tmp_path / "a")})
        resumed = bnlib.run({**params, "out_dir": str(tmp_path / "a")})
        assert resumed["status"] == "completed" and resumed.get("resumed_from_epoch") == 1
        whole = bnlib.run({**params, "out_dir": str(tmp_path / "b")})
        a = pd.read_parquet(resumed.run_dir / "probes.parquet")
        b = pd.read_parquet(whole.run_dir / "probes.parquet")
        pd.testing.assert_frame_equal(a, b, check_exact=True)
    finally:
        del PROBES["_interrupt_once"]


def test_step_of_size_zero_has_relative_loss_exactly_one():
    cfg, model, opt, x, y, pb, gen = _setup(["step_size_loss"], probe_step_sizes=[0.0, 0.01])
    runner = ProbeRunner(cfg, model, opt, _loss, pb, steps_per_epoch=1)
    runner.at(0, x, y)
    rel = runner.frame().query("quantity == 'rel_loss'").set_index("x").value
    assert rel[0.0] == 1.0 and rel[0.01] != 1.0


def test_relative_loss_matches_the_closed_form_on_a_linear_model():
    """L(W) = mean((XWᵀ - Y)²) is quadratic: with G = ∇L and R = XWᵀ - Y,
    L(W - sG) = L - 2s·mean(R ∘ XGᵀ) + s²·mean((XGᵀ)²)."""
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(40, 5, generator=g), torch.randn(40, 3, generator=g)
    model = nn.Sequential(nn.Linear(5, 3, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(3, 5, generator=g))
    sizes = [0.0, 1e-3, 0.03, 0.3, 1.0, 3.0]
    cfg = {"probes": ["step_size_loss"], "probe_step_sizes": sizes, "probe_steps": []}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    runner = ProbeRunner(cfg, model, opt, F.mse_loss, (X, Y), steps_per_epoch=1)
    runner.at(0, X, Y)
    got = runner.frame().query("quantity == 'rel_loss'").set_index("x").value
    Xd, Yd, W = X.double(), Y.double(), model[0].weight.detach().double()
    R = Xd @ W.T - Yd
    L = R.pow(2).mean()
    G = 2 * R.T @ Xd / R.numel()
    XG = Xd @ G.T
    for s in sizes:
        expected = (L - 2 * s * (R * XG).mean() + s * s * XG.pow(2).mean()) / L
        assert got[s] == pytest.approx(float(expected), rel=1e-5), s


class _KnownNet(nn.Module):
    """A 1x1 conv with weights diag(a) and bias b, then ReLU, as one 'block': channel c of the
    conv output is a_c·x_c + b_c, so its mean and variance follow from the input's."""

    def __init__(self, a, b):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(len(a), len(a), 1), nn.ReLU())
        self.fc = nn.Linear(len(a), 10)
        with torch.no_grad():
            self.block[0].weight.copy_(torch.diag(torch.tensor(a)).view(len(a), len(a), 1, 1))
            self.block[0].bias.copy_(torch.tensor(b))

    def blocks(self):
        return [self.block]

    def forward(self, x):
        return self.fc(self.block(x).mean((2, 3)))


def test_channel_moments_on_a_net_with_a_known_answer():
    a, b = [2.0, -3.0, 0.5], [1.0, 0.5, -4.0]
    net = _KnownNet(a, b)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 5, 5, generator=g) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1) + 3.0
    runner = ProbeRunner({"probes": ["channel_moments"]}, net, torch.optim.SGD(net.parameters(), lr=0.1), _loss,
                         (x, torch.zeros(8, dtype=torch.long)), steps_per_epoch=1)
    runner.at(0, x, None)
    got = runner.frame().set_index("quantity").value
    xd = x.double()
    mu_x, var_x = xd.mean((0, 2, 3)), xd.var((0, 2, 3), unbiased=False)
    ad, bd = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    mu, var = ad * mu_x + bd, ad ** 2 * var_x
    assert got["prenorm_mean_abs"] == pytest.approx(float(mu.abs().mean()), rel=1e-5)
    assert got["prenorm_var"] == pytest.approx(float(var.mean()), rel=1e-5)
    assert got["prenorm_var_std"] == pytest.approx(float(var.std(unbiased=False)), rel=1e-4)
    out = torch.relu(ad.view(1, 3, 1, 1) * xd + bd.view(1, 3, 1, 1))  # the block's output
    assert got["block_var"] == pytest.approx(float(out.var((0, 2, 3), unbiased=False).mean()), rel=1e-5)
    assert got["block_mean_abs"] == pytest.approx(float(out.mean((0, 2, 3)).abs().mean()), rel=1e-5)


def test_p4_probes_tell_bn_from_none_at_init():
    """P4's observations at initialization on a deep unnormalized CIFAR net (option A): the
    activations grow with depth, every input gets nearly the same final-layer gradient, and the
    middle layer's gradient is heavy-tailed; with BN none of this."""
    out = {}
    for norm in ("bn", "none"):
        cfg = bnlib.validate(arch="resnet32", width=0.5, norm=norm, shortcut="A", probe_batch_size=64,
                             probes=["channel_moments", "final_layer_grad", "layer_grads"])
        torch.manual_seed(0)
        model = build_model(cfg)
        g = torch.Generator().manual_seed(0)
        x, y = torch.rand(64, 3, 32, 32, generator=g), torch.arange(64) % 10
        runner = ProbeRunner(cfg, model, make_optimizer(param_groups(model, cfg), cfg), _loss, (x, y), 1)
        runner.at(0, x, y)
        out[norm] = runner.frame()
    q = {k: v.groupby("quantity").value for k, v in out.items()}
    var = {k: v.query("quantity == 'prenorm_var'").sort_values("depth").value.to_numpy() for k, v in out.items()}
    assert var["none"][-1] / var["none"][1] > 1e3 and var["bn"][-1] / var["bn"][1] < 10
    assert q["none"].first()["top_class_frac"] == 1.0
    assert q["none"].first()["input_dependence"] < q["bn"].first()["input_dependence"]
    assert q["none"].first()["hist_kurtosis"] > q["bn"].first()["hist_kurtosis"]


@pytest.mark.parametrize("params, needle", [
    ({"probes": ["step_size_los"]}, "'step_size_los' is not a known probe"),
    ({"probes": "layer_grads"}, "must be a list of strings"),
    ({"probes": ["layer_grads@0"]}, "whole number of steps >= 1"),
    ({"probes": ["layer_grads@x"]}, "whole number of steps >= 1"),
    ({"probes": ["layer_grads", "layer_grads@5"]}, "requested twice"),
    ({"probe_every": 0}, "probe_every=0"),
    ({"probe_steps": [-1]}, "probe_steps=[-1]"),
    ({"probe_steps": [1.5]}, "must be a list of integers"),
    ({"probe_step_sizes": []}, "non-empty list"),
    ({"probe_layer": 99, "arch": "resnet20", "shortcut": "A"}, "has 19 conv layers"),
])
def test_unknown_probe_and_bad_cadence_are_config_errors(params, needle):
    with pytest.raises(ConfigError) as e:
        bnlib.validate(params)
    msg = str(e.value)
    assert needle in msg
    if "known probe" in needle:
        assert all(repr(n) in msg for n in probe_names())


def test_every_probe_documents_itself():
    assert {"step_size_loss", "channel_moments", "layer_grads", "final_layer_grad"} <= set(PROBES)
    for spec in PROBES.values():
        assert spec.doc and (spec.default_every is None or spec.default_every >= 1)


@pytest.mark.parametrize("name", probe_names())
def test_a_probe_leaves_no_cycle_that_keeps_its_model_copy(name):
    """The copy a probe works on is freed by reference counting as the probe returns, without
    waiting for a full garbage collection (a float64 copy of a 1000-layer net is large; P5's
    probe once left each block referring to itself through its wrapped `parts`)."""
    import copy
    import gc
    import weakref

    from bnlib.probes import ProbeContext

    cfg, model, opt, x, y, pb, _ = _setup([name])
    gc.collect()
    gc.disable()
    try:
        twin = copy.deepcopy(model).train()
        ctx = ProbeContext(twin, x, y, _loss, opt, 2, 1.0, cfg, pb,
                           dict(zip(map(id, model.parameters()), twin.parameters())))
        alive = [weakref.ref(m) for m in twin.modules()] + [weakref.ref(p) for p in twin.parameters()]
        PROBES[name].fn(ctx)
        del ctx, twin
        kept = [r() for r in alive if r() is not None]
        assert not kept, f"{name}: {len(kept)} modules/parameters of its copy outlive it until a full GC, e.g. " \
                         f"{type(kept[0]).__name__}"
    finally:
        gc.enable()
