"""P3 (Awais et al. 2021; Santurkar et al. 2018's measurements): the ICS and landscape probes
against straightforward references, and the P3 study's grid and verdicts."""
import copy
from types import SimpleNamespace
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnlib
from bnlib.models import conv_layers
from bnlib.norms import NORMS, get_norm, norm_names
from bnlib.probes import ProbeRunner, _upstream
from bnlib.train import build_model, make_optimizer, param_groups


def _loss(o, t):
    return F.cross_entropy(o.float(), t)


def _toy(norm: str, seed: int = 0) -> nn.Sequential:
    """A plain chain conv-norm-relu x3 -> pool -> linear: "the layers before i" are simply the
    modules before conv i, the setting of Santurkar et al.'s definition."""
    torch.manual_seed(seed)
    nl = get_norm(norm, norm_groups=2) if "norm_groups" in NORMS[norm].options else get_norm(norm)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nl(4), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, stride=2, padding=1, bias=False), nl(4), nn.ReLU(),
                         nn.Conv2d(4, 6, 3, padding=1, bias=False), nl(6), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 10))


def _trained(model, optimizer: str = "sgd"):
    """The toy net and its optimizer after two real steps (momentum / Adam state present), with
    two groups of different lr and weight decay (as bnlib's: no decay on norm parameters)."""
    conv = [p for m in model if isinstance(m, (nn.Conv2d, nn.Linear)) for p in m.parameters()]
    rest = [p for p in model.parameters() if all(p is not q for q in conv)]
    groups = [{"params": conv, "lr": 0.05, "weight_decay": 5e-4}]
    groups += [{"params": rest, "lr": 0.02, "weight_decay": 0.0}] if rest else []
    opt = (torch.optim.SGD(groups, momentum=0.9) if optimizer == "sgd" else
           torch.optim.AdamW(groups, betas=(0.9, 0.999)))
    g = torch.Generator().manual_seed(1)
    x = torch.rand(16, 3, 8, 8, generator=g)
    y = torch.randint(0, 10, (16,), generator=g)
    for _ in range(2):
        opt.zero_grad()
        _loss(model(x), y).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return opt, x, y


def _reference_ics(model, opt, x, y, rng):
    """Santurkar et al.'s definition written out: G from a copy; the real step taken by a copy
    of (model, optimizer); for conv i, a fresh copy whose modules before conv i (in the chain)
    take their post-step values, gradient of W_i again. Every evaluation on its own copy (BN
    running statistics of the original untouched) from the RNG state `rng`."""
    def grad_of(m, i):
        torch.set_rng_state(rng)
        m.zero_grad()
        _loss(m(x), y).backward()
        return m[i].weight.grad.detach().clone()

    stepped, o2 = copy.deepcopy((model, opt))
    torch.set_rng_state(rng)
    o2.zero_grad()
    _loss(stepped(x), y).backward()
    o2.step()
    out = {}
    for j, (i, m) in enumerate((i, m) for i, m in enumerate(model) if isinstance(m, nn.Conv2d)):
        g = grad_of(copy.deepcopy(model), i)
        moved = copy.deepcopy(model)
        with torch.no_grad():
            for k in range(i):
                for p, q in zip(moved[k].parameters(), stepped[k].parameters()):
                    p.copy_(q)
        g2 = grad_of(moved, i)
        out[j] = (float((g - g2).double().norm()), float(F.cosine_similarity(g.flatten().double(),
                                                                               g2.flatten().double(), dim=0)))
    return out


def _probe(model, opt, x, y, probes=("ics",), **cfg):
    cfg = {"probes": list(probes), "probe_ics_layers": [], "probe_landscape_steps": [0.5, 1.0, 2.0, 4.0],
           "lr": 0.05, **cfg}
    runner = ProbeRunner(cfg, model, opt, _loss, (x, y), steps_per_epoch=1)
    runner.at(2, x, y, epoch_end=True)
    return runner.frame()


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("norm", norm_names())
def test_ics_probe_equals_the_straightforward_reference(norm, optimizer):
    model = _toy(norm)
    opt, x, y = _trained(model, optimizer)
    rng = torch.get_rng_state()
    ref = _reference_ics(model, opt, x, y, rng)
    torch.set_rng_state(rng)
    frame = _probe(model, opt, x, y)
    assert frame.loc[frame.quantity == "step_lr", "value"].tolist() == [0.05]  # the weight group's rate
    rows = frame[frame.depth >= 0].pivot_table(index="depth", columns="quantity", values="value")
    assert sorted(rows.index) == [0, 1, 2]
    for d, (l2, cos) in ref.items():
        scale = rows.loc[d, "grad_norm"]
        assert rows.loc[d, "l2"] == pytest.approx(l2, abs=1e-5 * scale + 1e-9), (norm, d)
        if math.isfinite(cos):
            assert rows.loc[d, "cos"] == pytest.approx(cos, abs=1e-5), (norm, d)
    # the first layer's ICS is 0 by definition (nothing before it moves), exactly
    assert rows.loc[0, "l2"] == 0.0
    # the update is not a no-op: the later layers do shift
    assert rows.loc[2, "l2"] > 0 or norm == "none" and rows.loc[2, "grad_norm"] == 0


def test_noisy_bn_ics_uses_the_steps_own_draw_and_reports_the_noise_apart():
    model = _toy("noisy_bn")
    opt, x, y = _trained(model)
    torch.manual_seed(3)
    rng = torch.get_rng_state()
    ref = _reference_ics(model, opt, x, y, rng)
    torch.set_rng_state(rng)
    rows = _probe(model, opt, x, y).query("depth >= 0").pivot_table(index="depth", columns="quantity", values="value")
    for d, (l2, _) in ref.items():
        assert rows.loc[d, "l2"] == pytest.approx(l2, abs=1e-5 * rows.loc[d, "grad_norm"])
    assert rows.loc[0, "l2"] == 0.0
    # another draw changes every gradient, the first layer's too: that is noise, not ICS
    assert (rows["noise_l2"] > 0).all() and (rows["l2_fresh_draw"] > 0).all()
    assert torch.equal(torch.get_rng_state(), rng)  # the runner restores the generator


def test_deterministic_nets_get_no_noise_rows():
    model = _toy("bn")
    opt, x, y = _trained(model)
    q = set(_probe(model, opt, x, y).quantity)
    assert q == {"l2", "cos", "grad_norm", "step_lr"}


def test_ics_layers_before_i_are_the_ones_upstream_of_its_input_in_a_resnet():
    """In a ResNet "before layer i" is every parameter conv i's input depends on: the earlier
    blocks (their shortcuts included) and, for a block's second conv, its first conv and norm;
    not conv i's own norm, nor a parallel path (a block's branch for its projection shortcut)."""
    model = build_model(bnlib.validate(arch="resnet18", width=0.125, norm="bn"))
    convs = {n: m for _, n, m in conv_layers(model)}
    inputs = {}
    hooks = [m.register_forward_hook(lambda _m, inp, _o, n=n: inputs.__setitem__(n, inp[0])) for n, m in convs.items()]
    model(torch.rand(2, 3, 32, 32))
    for h in hooks:
        h.remove()
    names = {id(p): n for n, p in model.named_parameters()}

    def up(conv):
        return {names[i] for i in _upstream(inputs[conv])}

    assert up("stem.0") == set()
    b = "stages.1.0"  # a block with a projection shortcut
    conv2 = up(f"{b}.conv2")
    assert {f"{b}.conv1.weight", f"{b}.bn1.weight", f"{b}.bn1.bias", "stem.0.weight"} <= conv2
    assert not {f"{b}.bn2.weight", f"{b}.conv2.weight", f"{b}.shortcut.0.weight"} & conv2
    short = up(f"{b}.shortcut.0")
    assert f"{b}.conv1.weight" not in short and "stages.0.1.conv2.weight" in short
    assert up(f"{b}.conv1") == short  # both read the block's input
    assert "stages.2.0.shortcut.1.bias" in up("stages.3.0.conv1")  # earlier shortcuts' norms are upstream


def _upstream_by_hand(name: str) -> bool:
    """resnet8's parameters upstream of conv stages.2.0.conv2's input, written out: the stem,
    the first two stages (shortcut included), and the block's own conv1 and bn1."""
    return name.startswith(("stem.", "stages.0.", "stages.1.", "stages.2.0.conv1.", "stages.2.0.bn1."))


def test_replayed_update_is_the_real_step_and_leaves_the_optimizer_alone():
    """With bnlib's optimizer (parameter groups, momentum, weight decay) and an lr scheduler
    that wraps opt.step: the probe's G' for a conv of the last stage equals the gradient after
    the run's own optimizer takes its step, and the run's optimizer and weights are untouched."""
    cfg = bnlib.validate(arch="resnet8", width=0.25, norm="bn", probes=["ics"], lr=0.1, probe_ics_layers=[7])
    torch.manual_seed(0)
    model = build_model(cfg)
    opt = make_optimizer(param_groups(model, cfg), cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
    for _ in range(2):
        opt.zero_grad()
        _loss(model(x), y).backward()
        opt.step()
        sched.step()
    opt.zero_grad(set_to_none=True)
    state = copy.deepcopy(opt.state_dict())
    before = copy.deepcopy(model)
    rows = _probe(model, opt, x, y, **cfg)
    for k, v in state["state"].items():
        assert torch.equal(v["momentum_buffer"], opt.state_dict()["state"][k]["momentum_buffer"])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before.parameters()))
    assert all(p.grad is None for p in model.parameters())

    def grad_w(m):
        m.zero_grad()
        _loss(m(x), y).backward()
        return m.stages[2][0].conv2.weight.grad.detach().clone()

    G = grad_w(copy.deepcopy(before))
    _loss(model(x), y).backward()
    opt.step()  # the run's real step: this test's model is the run
    moved = copy.deepcopy(before)
    with torch.no_grad():
        for (n, p), q in zip(moved.named_parameters(), model.parameters()):
            if _upstream_by_hand(n):
                p.copy_(q)
    G2 = grad_w(moved)
    got = rows[(rows.depth == 7) & (rows.quantity == "l2")].value.item()
    assert got > 0 and got == pytest.approx(float((G - G2).double().norm()), rel=1e-4)


def test_probe_ics_lr_replays_the_update_at_that_step_keeping_each_groups_ratio():
    """probe_ics_lr = 0.3 on a run at lr 0.1 (scheduled down to 0.025) with γ at a quarter of
    the weights' rate: G' is the gradient after a real step of the run's optimizer (its momentum
    state) with the weights at 0.3 and γ at 0.075, and step_lr records 0.3; unset, the step is
    the scheduled one."""
    cfg = bnlib.validate(arch="resnet8", width=0.25, norm="bn", probes=["ics"], lr=0.1, gamma_lr_mult=0.25,
                         probe_ics_layers=[7], probe_ics_lr=0.3)
    torch.manual_seed(0)
    model = build_model(cfg)
    opt = make_optimizer(param_groups(model, cfg), cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
    for _ in range(2):
        opt.zero_grad()
        _loss(model(x), y).backward()
        opt.step()
        sched.step()
    opt.zero_grad(set_to_none=True)
    rows = _probe(model, opt, x, y, **cfg)
    assert rows.loc[rows.quantity == "step_lr", "value"].tolist() == [0.3]

    def grad_w(m):
        m.zero_grad()
        _loss(m(x), y).backward()
        return m.stages[2][0].conv2.weight.grad.detach().clone()

    G = grad_w(copy.deepcopy(model))
    m2, o2 = copy.deepcopy((model, opt))  # the run's model and optimizer, stepped at the probe's rates
    for group in o2.param_groups:
        group["lr"] = {"weight": 0.3, "scale": 0.075}.get(group["name"], 0.3)
    _loss(m2(x), y).backward()
    o2.step()
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for (n, p), q in zip(moved.named_parameters(), m2.parameters()):
            if _upstream_by_hand(n):
                p.copy_(q)
    got = rows[(rows.depth == 7) & (rows.quantity == "l2")].value.item()
    assert got > 0 and got == pytest.approx(float((G - grad_w(moved)).double().norm()), rel=1e-4)
    sched_rows = _probe(model, opt, x, y, **{**cfg, "probe_ics_lr": None})
    assert sched_rows.loc[sched_rows.quantity == "step_lr", "value"].item() == pytest.approx(0.025)
    assert sched_rows[(sched_rows.depth == 7) & (sched_rows.quantity == "l2")].value.item() < got / 2


RUN = dict(arch="resnet8", width=0.25, synthetic_size=200, val_fraction=0.2, n_test=40, batch_size=16, epochs=1,
           progress=False, log_every=2, precision="fp32", norm="bn", probes=["ics"], probe_ics_layers=[0, 4, 7],
           probe_every=4)


def _ics_rows(tmp_path, name, **kw):
    bnlib.run({**RUN, **kw, "out_dir": str(tmp_path / name)})
    return bnlib.load_runs(tmp_path / name).probes


def test_ics_at_step_0_is_identical_for_two_runs_that_differ_only_in_their_lr_when_probe_ics_lr_is_fixed(tmp_path):
    """Two real runs at lr 0.02 and 0.2 with probe_ics_lr = 0.05: the same initial weights and
    batch, and the same replayed step, so ICS at step 0 is bit-identical; afterwards the
    trajectories differ. Without probe_ics_lr each replays its own rate and step 0 differs."""
    def table(p):
        return p.set_index(["step", "depth", "quantity"])["value"].sort_index()

    a = table(_ics_rows(tmp_path, "a", lr=0.02, probe_ics_lr=0.05))
    b = table(_ics_rows(tmp_path, "b", lr=0.2, probe_ics_lr=0.05))
    pd.testing.assert_series_equal(a.loc[0], b.loc[0], check_exact=True)
    assert (a.xs("step_lr", level="quantity") == 0.05).all() and (b.xs("step_lr", level="quantity") == 0.05).all()
    assert a.loc[(0, 7, "l2")] > 0
    assert a.loc[(4, 7, "l2")] != b.loc[(4, 7, "l2")]  # different trajectories after step 0
    c = table(_ics_rows(tmp_path, "c", lr=0.02))
    d = table(_ics_rows(tmp_path, "d", lr=0.2))
    assert c.loc[(0, -1, "step_lr")] == 0.02 and d.loc[(0, -1, "step_lr")] == 0.2
    assert d.loc[(0, 7, "l2")] > 2 * c.loc[(0, 7, "l2")]  # ICS grows with the step


def test_a_zero_step_is_not_a_measurement_and_p3_counts_the_times_after_init(tmp_path):
    """Cosine schedule to 0 with probe_ics_lr unset: at the last epoch end the replayed step is
    0 (G' = G), so the probe writes only step_lr = 0 there; P3's summary counts the probe times
    after init with a nonzero step. At α₀ = 0 (SkipInit) the branch convs have zero gradient at
    step 0, which the summary leaves out with the rest of step 0; older records holding ICS rows
    at a zero step do not count either."""
    from bnlib.studies import p3
    p = _ics_rows(tmp_path, "z", lr=0.1, residual_gain=True, alpha0=0.0)
    last = int(p.step.max())
    end = p[p.step == last]
    assert end.quantity.tolist() == ["step_lr"] and end.value.item() == 0.0
    g0 = p[(p.step == 0) & (p.quantity == "grad_norm")].set_index("depth").value
    assert g0[4] == 0 and g0[7] == 0 and g0[0] > 0  # branch convs (stages.*.conv2) behind α = 0
    mid = p[(p.step > 0) & (p.step < last) & (p.depth >= 0)].pivot_table(index=["step", "depth"], columns="quantity",
                                                                         values="value")
    want = (mid.l2 / mid.grad_norm)[mid.grad_norm > 0].mean()
    s = p3.probe_summary(p)
    assert s.ics.item() == pytest.approx(want) and math.isnan(s.ics_step.item())  # the scheduled rate varies
    old = pd.concat([p, pd.DataFrame([{**end.iloc[0].to_dict(), "depth": d, "quantity": q, "value": v}
                                      for d in (0, 4, 7) for q, v in (("l2", 0.0), ("cos", 1.0), ("grad_norm", 1.0))])])
    assert p3.probe_summary(old).ics.item() == pytest.approx(want)
    fixed = _ics_rows(tmp_path, "f", lr=0.1, probe_ics_lr=0.1, residual_gain=True, alpha0=0.0)
    assert (fixed[fixed.step == last].quantity == "l2").sum() == 3  # a fixed step measures the end too
    assert p3.probe_summary(fixed).ics_step.item() == 0.1


def test_landscape_matches_the_closed_form_on_a_linear_model():
    """L(W) = mean((XWᵀ − Y)²) has a constant Hessian H: ∇L(θ − ηg) = g − ηHg, so
    grad_diff = η‖Hg‖, β-smoothness = ‖Hg‖/‖g‖, and L(θ − ηg) = L − η‖g‖² + η²/2 gᵀHg."""
    torch.manual_seed(0)
    lin = nn.Linear(5, 3, bias=False)
    X, Y = torch.randn(40, 5), torch.randn(40, 3)
    mse = lambda o, t: ((o - t) ** 2).mean()  # noqa: E731
    W = lin.weight.detach().clone()
    g = (2 / (40 * 3)) * (X @ W.T - Y).T @ X  # dL/dW, (3, 5)
    Hg = (2 / (40 * 3)) * (X @ g.T).T @ X  # the Hessian applied to g
    opt = torch.optim.SGD(lin.parameters(), lr=0.05)
    runner = ProbeRunner({"probes": ["landscape"], "probe_landscape_steps": [0.5, 1.0, 2.0, 4.0], "lr": 0.05},
                         lin, opt, mse, (X, Y), steps_per_epoch=1)
    runner.at(0, X, Y)
    r = runner.frame().set_index(["quantity", "x"]).value
    L0 = float(mse(X @ W.T, Y))
    assert r[("loss_before", np.nan)] == pytest.approx(L0, rel=1e-5)
    for k in (0.5, 1.0, 2.0, 4.0):
        eta = k * 0.05
        assert r[("grad_diff", eta)] == pytest.approx(eta * float(Hg.norm()), rel=1e-4)
        want = L0 - eta * float((g * g).sum()) + eta ** 2 / 2 * float((g * Hg).sum())
        assert r[("loss", eta)] == pytest.approx(want, rel=1e-4)
    assert r[("beta_smoothness", np.nan)] == pytest.approx(float(Hg.norm() / g.norm()), rel=1e-4)
    assert r[("grad_diff_max", np.nan)] == pytest.approx(4 * 0.05 * float(Hg.norm()), rel=1e-4)


def test_landscape_with_absolute_step_sizes_is_the_same_for_any_lr():
    """probe_landscape_etas: the η themselves, whatever the run's lr (recorded: eta_absolute = 1);
    [] keeps η = probe_landscape_steps × lr (eta_absolute = 0)."""
    torch.manual_seed(0)
    lin = nn.Linear(5, 3, bias=False)
    X, Y = torch.randn(40, 5), torch.randn(40, 3)
    mse = lambda o, t: ((o - t) ** 2).mean()  # noqa: E731

    def frame(**cfg):
        cfg = {"probes": ["landscape"], "probe_landscape_steps": [0.5, 2.0], "probe_landscape_etas": [], **cfg}
        runner = ProbeRunner(cfg, lin, torch.optim.SGD(lin.parameters(), lr=cfg["lr"]), mse, (X, Y), 1)
        runner.at(0, X, Y)
        return runner.frame().set_index(["quantity", "x"]).value

    a, b = frame(lr=0.05, probe_landscape_etas=[0.01, 0.3]), frame(lr=5.0, probe_landscape_etas=[0.01, 0.3])
    assert sorted(a.loc["loss"].index) == [0.01, 0.3] and a[("eta_absolute", np.nan)] == 1.0
    pd.testing.assert_series_equal(a.sort_index().drop("lr"), b.sort_index().drop("lr"))
    rel = frame(lr=0.05)
    assert sorted(rel.loc["loss"].index) == [0.025, 0.1] and rel[("eta_absolute", np.nan)] == 0.0
    assert rel[("grad_diff", 0.1)] != a[("grad_diff", 0.3)]


@pytest.mark.parametrize("params, needle", [
    ({"probe_ics_lr": 0.0}, "probe_ics_lr=0.0: out of range; must be > 0"),
    ({"probe_ics_lr": -0.1}, "probe_ics_lr=-0.1"),
    ({"probe_ics_lr": "0.1"}, "probe_ics_lr='0.1' (str): must be a number or None"),
    ({"probe_landscape_etas": [0.1, 0.0]}, "probe_landscape_etas=[0.1, 0.0]: each step size must be a finite number > 0"),
    ({"probe_landscape_etas": [-1]}, "probe_landscape_etas=[-1]"),
])
def test_bad_probe_step_sizes_are_config_errors_naming_the_parameter(params, needle):
    from bnlib.config import ConfigError
    with pytest.raises(ConfigError) as e:
        bnlib.validate(params)
    assert needle in str(e.value)


@pytest.mark.parametrize("norm", norm_names())
def test_p3_probes_leave_training_bit_identical_for_every_norm(norm, tmp_path):
    """Every norm of the registry, the stateful (batch_renorm, ics_free) and stochastic
    (noisy_bn) ones included: a run with both P3 probes every 2 steps trains exactly as one
    without."""
    base = dict(arch="resnet8", width=0.25, synthetic_size=200, val_fraction=0.2, n_test=40, batch_size=16,
                epochs=1, progress=False, log_every=2, precision="fp32", norm=norm, lr=0.02)
    if "ghost_batch_size" in NORMS[norm].options:
        base["ghost_batch_size"] = 8
    if "norm_groups" in NORMS[norm].options:
        base["norm_groups"] = 2  # resnet8 at width 1/4 has 4-channel layers
    plain = bnlib.run({**base, "out_dir": str(tmp_path / "a")})
    probed = bnlib.run({**base, "out_dir": str(tmp_path / "b"), "probes": ["ics", "landscape"], "probe_every": 2,
                        "probe_ics_layers": [0, 4, 8]})
    for t, drop in (("epochs", ["seconds", "img_per_s"]), ("steps", [])):
        a = pd.read_parquet(plain.run_dir / f"{t}.parquet").drop(columns=drop)
        b = pd.read_parquet(probed.run_dir / f"{t}.parquet").drop(columns=drop)
        pd.testing.assert_frame_equal(a, b, check_exact=True)
    p = bnlib.load_runs(tmp_path / "b").probes
    assert set(p.probe) == {"ics", "landscape"}
    assert set(p.loc[p.probe == "ics", "depth"]) == {-1, 0, 4, 8}  # -1: the step_lr row of each time
    assert (p.loc[(p.probe == "ics") & (p.quantity == "l2") & (p.depth == 0), "value"] == 0).all()


# ----------------------------------------------------------------------------------------------
# the rank-correlation helper (bnlib.stats) and the P3 study
# ----------------------------------------------------------------------------------------------

def test_rank_correlation_is_spearman_over_unit_means_with_an_interval():
    from scipy.stats import spearmanr

    from bnlib import stats
    rng = np.random.default_rng(0)
    rows = [{"arm": a, "seed": s, "x": a + rng.normal(0, 0.3), "y": -2 * a + rng.normal(0, 0.3)}
            for a in range(8) for s in range(3)]
    t = pd.DataFrame(rows)
    e = stats.rank_correlation(t, "x", "y", unit="arm", replicate="seed", alternative="less")
    m = t.groupby("arm")[["x", "y"]].mean()
    assert e.mean == pytest.approx(spearmanr(m.x, m.y).statistic) and e.n == 8
    assert e.lo <= e.mean <= e.hi and e.hi < 0 and e.p < 0.05
    noise = t.assign(y=rng.normal(0, 1, len(t)))
    e0 = stats.rank_correlation(noise, "x", "y", unit="arm", replicate="seed")
    assert e0.lo < 0 < e0.hi
    d = stats.rank_correlation_difference(t.assign(z=rng.normal(0, 1, len(t))), "x", "z", "y", unit="arm",
                                          replicate="seed", sign_a=-1, sign_b=-1)
    assert d.lo > 0 and "ρ(x, y)" in d.name  # x tracks y (negatively) far better than noise z


ARMS8 = ["bn", "bn_minus", "affine", "none", "noisy_bn", "ics_free", "group_norm", "layer_norm"]


# SGD steps per run: the paper preset's (21 060, a long-run budget) or the quick preset's (64)
BUDGETS = {"paper": dict(dataset="cifar10", epochs=60, batch_size=128),
           "quick": dict(dataset="fashion_mnist", n_train=2048, val_fraction=0.02, epochs=2, batch_size=64)}


def _world(acc, ics, beta, seeds=(0, 1, 2), lrs=(0.01, 0.05, 0.25), noise=0.003, best=None, budget="paper",
           ics_step=0.04, etas=(0.02, 0.08)):
    """Runs and probes tables over the arms in ARMS8: acc[arm] at the arm's best validation rate
    (best[arm], default 0.05: inside the ladder), 0.05 less at the other rates; ics[arm] =
    ‖G − G'‖/‖G‖, beta[arm] = β-smoothness, measured with the replayed step `ics_step` (a number,
    or "scheduled": the run's rate decaying over training) and the landscape's step sizes `etas`
    (or a dict arm -> etas), at probe steps 0, 10, 40; runs of `budget`'s length."""
    rng = np.random.default_rng(1)
    best = {**{a: 0.05 for a in ARMS8}, **(best or {})}
    rows, probes = [], []
    for arm in ARMS8:
        for lr in lrs:
            for seed in seeds:
                rid = f"{arm}-{lr}-{seed}"
                a = acc[arm] - (0.0 if lr == best[arm] else 0.05) + rng.normal(0, noise)
                rows.append({"run_id": rid, "norm": arm, "lr": lr, "seed": seed, "status": "completed",
                             "best_val_acc": a, "test_acc_at_best_val": a, **BUDGETS[budget]})
                for step in (0, 10, 40):
                    base = {"run_id": rid, "norm": arm, "seed": seed, "lr": lr, "step": step, "x": np.nan}
                    st = lr * (1 - step / 50) if ics_step == "scheduled" else ics_step
                    probes.append({**base, "probe": "ics", "depth": -1, "quantity": "step_lr", "value": st})
                    for depth in (2, 6):
                        for q, v in (("l2", ics[arm] * (1 + rng.normal(0, 0.02))), ("grad_norm", 1.0), ("cos", 0.9)):
                            probes.append({**base, "probe": "ics", "depth": depth, "quantity": q, "value": v})
                    for q, v in (("beta_smoothness", beta[arm] * (1 + rng.normal(0, 0.02))), ("grad_diff_max", 1.0),
                                 ("grad_norm", 2.0), ("loss_max", 2.0), ("loss_min", 1.5)):
                        probes.append({**base, "probe": "landscape", "depth": -1, "quantity": q, "value": v})
                    for eta in (etas.get(arm, (0.02, 0.08)) if isinstance(etas, dict) else etas):
                        probes.append({**base, "probe": "landscape", "depth": -1, "quantity": "loss", "x": eta,
                                       "value": 1.8})
    return SimpleNamespace(runs=pd.DataFrame(rows), probes=pd.DataFrame(probes))


ACC = dict(zip(ARMS8, [0.85, 0.84, 0.70, 0.60, 0.846, 0.75, 0.80, 0.78]))


def test_verdicts_support_p3_when_less_ics_goes_with_accuracy():
    from bnlib.studies import p3
    ics = {a: 1.0 - v for a, v in ACC.items()}  # perfectly anti-ranked with accuracy
    beta = {a: 10.0 for a in ARMS8}
    beta.update({"bn": 30.0, "none": 5.0})  # unrelated to accuracy
    vs = {v.claim: v for v in p3.verdicts(_world(ACC, ics, beta))}
    assert vs["Reference: BN learns and beats no normalization (each at its validated rate)"].outcome == "supported"
    assert vs["P3: across arms, less ICS goes with higher accuracy"].outcome == "supported"
    assert vs["Santurkar: β-smoothness tracks accuracy better than ICS does"].outcome == "contradicted"
    icsfree = vs["P3: the ICS-free scheme (BN without ICS reduction) is less accurate than BN"]
    assert icsfree.outcome == "supported"  # more ICS (0.25 vs 0.15) and less accurate (0.75 vs 0.85)
    noisy = [v for c, v in vs.items() if c.startswith("Santurkar: noisy BN")][0]
    assert noisy.outcome == "supported"  # 0.83 vs 0.85: within 2 points


ICS_FREE = "P3: the ICS-free scheme (BN without ICS reduction) is less accurate than BN"


def test_ics_measures_compare_only_at_one_common_step_on_each_arms_own_trajectory():
    """ICS and β grow with the step: measured at each run's scheduled rate (probe_ics_lr unset)
    or at arm-specific step sizes, ranks and the ICS-free check would compare learning rates, so
    they say inconclusive (step size); at one common step (probe_ics_lr, probe_landscape_etas)
    they are decided, on each arm's runs at its own chosen rate."""
    from bnlib.studies import p3
    ics = {a: 1.0 - v for a, v in ACC.items()}  # ICS-free 0.25 vs BN 0.15
    beta = {a: 10 ** (3 * (1 - v)) for a, v in ACC.items()}
    vs = {v.claim: v for v in p3.verdicts(_world(ACC, ics, beta))}
    check = [v for v in vs[ICS_FREE].sentence.split(". ") if "more ICS" in v][0]
    assert "(both at step 0.04): SUPPORTED" in check and vs[ICS_FREE].outcome == "supported"
    assert vs[P3_CORR[0]].outcome == "supported" and not [c for c in P3_CORR if "step size" in vs[c].causes]
    vs = {v.claim: v for v in p3.verdicts(_world(ACC, ics, beta, ics_step="scheduled"))}
    for claim in P3_CORR:
        assert vs[claim].outcome == "inconclusive" and "step size" in vs[claim].label, vs[claim].sentence
    assert vs[ICS_FREE].outcome == "inconclusive" and "not measured at one step size" in vs[ICS_FREE].sentence
    assert "probe_ics_lr" in vs[P3_CORR[0]].sentence
    # the landscape at another step size for one arm: β's claim only
    vs = {v.claim: v for v in p3.verdicts(_world(ACC, ics, beta, etas={"none": (0.005, 0.02)}))}
    assert vs[P3_CORR[1]].label == "inconclusive (step size)" and "probe_landscape_etas" in vs[P3_CORR[1]].sentence
    assert vs[P3_CORR[0]].outcome == "supported"


def test_an_arm_at_an_end_of_its_ladder_makes_every_claim_comparing_it_inconclusive():
    """bnlib.stats.edge_guard: BN chosen at the top rung of its ladder (its optimum may lie
    beyond) makes the reference, the correlations (BN is ranked), the ICS-free comparison and
    noisy BN's inconclusive (ladder edge), naming it; the arms still differ, so no other guard
    fires."""
    from bnlib.studies import p3
    ics = {a: 1.0 - v for a, v in ACC.items()}
    vs = p3.verdicts(_world(ACC, ics, {a: 10.0 for a in ARMS8}, best={"bn": 0.25}))
    assert len(vs) == 6
    for v in vs:
        assert v.outcome == "inconclusive" and "ladder edge" in v.causes, v.label
        assert "bn at lr 0.25" in v.sentence and "no BN gain" not in v.causes
    # the same world with BN inside its ladder decides the reference
    v0 = p3.verdicts(_world(ACC, ics, {a: 10.0 for a in ARMS8}))[0]
    assert v0.outcome == "supported" and v0.short == "BN > none"


def test_accuracy_claims_are_inconclusive_budget_on_short_runs_and_keep_their_statistics():
    """The quick preset's 64 steps are under a tenth of PAPER_STEPS: every claim about accuracy
    is inconclusive (budget), its outcome at this budget in the sentence and in at_budget; the
    ICS manipulation check (ICS during training) is decided as before."""
    from bnlib.studies import p3
    assert p3.PAPER_STEPS == 21060  # 60 CIFAR-10 epochs at batch 128 (45 000 training images)
    ics = {a: 1.0 - v for a, v in ACC.items()}
    vs = {v.claim: v for v in p3.verdicts(_world(ACC, ics, {a: 10.0 for a in ARMS8}, budget="quick"))}
    for claim in ("Reference: BN learns and beats no normalization (each at its validated rate)", P3_CORR[0]):
        v = vs[claim]
        assert v.label == "inconclusive (budget)" and v.at_budget == "supported", v.label
        assert "at 64 of the paper's 21 060 steps:" in v.sentence and "(supported at this budget)" in v.sentence
    assert "bn − none +0.25" in vs["Reference: BN learns and beats no normalization (each at its validated rate)"].sentence
    v4 = vs[ICS_FREE]  # the check decided, the accuracy part held back by the budget alone
    assert v4.label == "inconclusive (budget)" and v4.at_budget == "supported"
    assert "BN is more accurate than the ICS-free scheme: INCONCLUSIVE" in v4.sentence
    assert "the ICS-free scheme has more ICS than BN (both at step 0.04): SUPPORTED" in v4.sentence
    assert all(v.short for v in vs.values())
    # the same runs at the paper preset's length decide
    vs = {v.claim: v for v in p3.verdicts(_world(ACC, ics, {a: 10.0 for a in ARMS8}))}
    assert vs[P3_CORR[0]].outcome == "supported" and vs[ICS_FREE].outcome == "supported"


def test_verdicts_side_with_santurkar_when_smoothness_tracks_accuracy_and_ics_does_not():
    from bnlib.studies import p3
    ics = {a: v for a, v in ACC.items()}  # more ICS with higher accuracy (Santurkar's BN finding)
    beta = {a: 10 ** (3 * (1 - v)) for a, v in ACC.items()}  # smoother with higher accuracy
    vs = {v.claim: v for v in p3.verdicts(_world(ACC, ics, beta))}
    assert vs["P3: across arms, less ICS goes with higher accuracy"].outcome == "contradicted"
    assert vs["Santurkar: β-smoothness tracks accuracy better than ICS does"].outcome == "supported"
    assert vs["P3: the ICS-free scheme (BN without ICS reduction) is less accurate than BN"].outcome != "supported"


def test_verdicts_are_inconclusive_when_the_runs_cannot_carry_them():
    from bnlib.studies import p3
    flat = {a: 0.11 for a in ARMS8}  # nothing learns
    vs = p3.verdicts(_world(flat, {a: 0.2 for a in ARMS8}, {a: 10.0 for a in ARMS8}))
    assert {v.outcome for v in vs} == {"inconclusive"}
    w = _world(ACC, {a: 1 - v for a, v in ACC.items()}, {a: 10.0 for a in ARMS8})
    w.probes = w.probes[w.probes.norm.isin(["bn", "none", "affine"])]  # ICS of three arms only
    vs = {v.claim: v for v in p3.verdicts(w)}
    assert vs["P3: across arms, less ICS goes with higher accuracy"].outcome == "inconclusive"
    assert p3.verdicts(SimpleNamespace(runs=pd.DataFrame(), probes=pd.DataFrame()))[0].outcome == "inconclusive"


P3_CORR = ["P3: across arms, less ICS goes with higher accuracy",
           "Santurkar: β-smoothness tracks accuracy better than ICS does",
           "Santurkar / P4: the largest stable learning rate tracks accuracy better than ICS does"]


def test_correlation_verdicts_are_inconclusive_when_an_arm_sits_at_chance_and_name_it():
    """Arms at chance (not learning at their chosen rate) would make the ranks sort learners from
    non-learners: claims 1-3 say inconclusive and name them, even with ICS perfectly anti-ranked
    with accuracy; the reference (BN beats none) is still decided."""
    from bnlib.studies import p3
    acc = {**ACC, "none": 0.10, "affine": 0.11}
    ics = {a: 1.0 - v for a, v in acc.items()}
    beta = {a: 10.0 for a in ARMS8}
    vs = {v.claim: v for v in p3.verdicts(_world(acc, ics, beta))}
    assert vs["Reference: BN learns and beats no normalization (each at its validated rate)"].outcome == "supported"
    for claim in P3_CORR:
        v = vs[claim]
        assert v.outcome == "inconclusive", claim
        why = [w for w in v.reasons if "do not beat chance" in w]
        assert len(why) == 1 and "2 arm(s)" in why[0] and "none (" in why[0] and "affine (" in why[0], v.reasons
        assert "bn (" not in why[0]
    # the same world with every arm learning: the guard is silent and claim 1 is decided
    vs = {v.claim: v for v in p3.verdicts(_world(ACC, {a: 1.0 - v for a, v in ACC.items()}, beta))}
    assert vs[P3_CORR[0]].outcome == "supported"
    assert not [w for c in P3_CORR for w in vs[c].reasons if "chance" in w]


def test_an_arm_that_diverged_at_every_rate_is_left_out_of_the_ranks_not_a_block():
    """A diverged arm is a result: an arm that diverged in every run (every rate, every seed) does
    not make the correlations inconclusive; it is left out of the ranks (accuracy, ICS, lr* and
    the censoring count) and named. An arm at chance that diverged at only some rates still blocks."""
    from bnlib.studies import p3
    ics = {a: 1.0 - v for a, v in ACC.items()}
    ics["ics_free"] = 50.0  # what a blowing-up run measures; it must not enter the ranks
    beta = {a: 10.0 for a in ARMS8}
    w = _world(ACC, ics, beta)
    div = w.runs["norm"] == "ics_free"
    w.runs.loc[div, ["status", "best_val_acc", "test_acc_at_best_val"]] = ["diverged", np.nan, np.nan]
    vs = {v.claim: v for v in p3.verdicts(w)}
    v1 = vs[P3_CORR[0]]
    assert v1.outcome == "supported", v1.sentence
    assert "left out: ics_free" in v1.sentence and not [w_ for w_ in v1.reasons if "chance" in w_]
    assert v1.effects[0]["n"] == len(ARMS8) - 1  # ranked over the 7 arms that train
    for claim in P3_CORR[1:]:
        assert "left out: ics_free" in vs[claim].sentence
        assert not [w_ for w_ in vs[claim].reasons if "chance" in w_ or "ics_free" in w_], vs[claim].reasons
    # the ICS-free verdict still reads the divergence (its own guard)
    assert vs["P3: the ICS-free scheme (BN without ICS reduction) is less accurate than BN"].outcome == "inconclusive"
    # `none` at chance at every rate, diverged only at its largest: not a result, a block
    acc = {**ACC, "none": 0.10}
    w = _world(acc, {a: 1.0 - v for a, v in acc.items()}, beta)
    top = (w.runs["norm"] == "none") & (w.runs["lr"] == 0.25)
    w.runs.loc[top, ["status", "best_val_acc", "test_acc_at_best_val"]] = ["diverged", np.nan, np.nan]
    vs = {v.claim: v for v in p3.verdicts(w)}
    for claim in P3_CORR:
        assert vs[claim].outcome == "inconclusive"
        assert [w_ for w_ in vs[claim].reasons if "do not beat chance" in w_ and "none (" in w_]
        assert "left out" not in vs[claim].sentence


def test_p3_grid_is_one_network_and_every_run_probes_ics_and_landscape():
    from bnlib.studies import get_study, p3
    s = get_study("p3")
    for preset in ("quick", "paper"):
        pts = s.points(preset)
        assert {p["norm"] for p in pts} == set(p3.ARMS) and set(p3.ARMS) <= set(norm_names())
        layers = p3.QUICK_ICS_LAYERS if preset == "quick" else p3.ICS_LAYERS
        for p in pts:
            assert p["probes"] == ["ics", "landscape"] and p["probe_ics_layers"] == layers
            assert ("ghost_batch_size" in p) == (p["norm"] == "ghost_bn")
            assert p["lr"] in p3.LR_LADDERS[preset][p["norm"]]  # each arm on its own ladder
        for arm in p3.ARMS:  # every rung of every arm's ladder is run
            assert {p["lr"] for p in pts if p["norm"] == arm} == set(p3.LR_LADDERS[preset][arm])
        shared = [{k: v for k, v in p.items() if k not in ("norm", "ghost_batch_size", "lr")} for p in pts]
        by_arm = {}
        for p, rest in zip(pts, shared):
            by_arm.setdefault(p["norm"], []).append(rest)
        first = {repr(sorted(d.items())) for d in by_arm[p3.ARMS[0]]}
        # every arm: the same points except norm and lr (ladders may differ in length)
        assert all({repr(sorted(d.items())) for d in v} == first for v in by_arm.values())
        if preset == "quick":  # the recipe (SkipInit, warm-up) is a recorded parameter of every arm's runs
            assert all(p[k] == v for p in pts for k, v in p3.QUICK_RECIPE.items())
        # one step size for every arm's probes, below every arm's top rung
        assert {p["probe_ics_lr"] for p in pts} == {p3.PROBE_LR}
        assert len({tuple(p["probe_landscape_etas"]) for p in pts}) == 1 and pts[0]["probe_landscape_etas"]
        assert all(p3.PROBE_LR < max(p3.LR_LADDERS[preset][a]) for a in p3.ARMS)
    quick = s.points("quick")
    assert len(quick) == sum(len(p3.LR_LADDERS["quick"][a]) for a in p3.ARMS) * 3
    assert len({tuple(sorted((k, repr(v)) for k, v in p.items())) for p in quick}) == len(quick)  # no duplicates
    for p in quick:
        bnlib.validate(p)
    n = len(conv_layers(build_model(bnlib.validate(quick[0]))))
    assert max(p3.ICS_LAYERS) < n


def test_p3_notebook_runs_on_a_tiny_study(tmp_path):
    """The analysis notebook end to end through papermill on a 4-run study: no cell fails, the
    figures are drawn, the verdicts are written and say inconclusive (4 arms, 1 seed)."""
    import json

    from bnlib.grid import run_study
    from bnlib.stats import read_verdicts
    from bnlib.studies import Preset, Study, p3

    tiny = Study(name="p3tiny", title="P3 smoke", notebook="studies/p3_ics.ipynb", derive=p3._derive,
                 presets={"smoke": Preset(
                     base=dict(arch="resnet8", width=0.25, synthetic_size=300, val_fraction=0.2, n_test=60,
                               batch_size=32, epochs=2, log_every=2, probes=p3.PROBES, probe_ics_layers=[2, 7]),
                     grid=dict(norm=["bn", "none", "noisy_bn", "ics_free"], lr=[0.05], seed=[0]))})
    counts = run_study(tiny, "smoke", tmp_path, progress=False)
    assert counts["failed"] == 0 and counts["completed"] + counts["diverged"] == 4
    nb = json.loads((tmp_path / "studies" / "p3tiny" / "p3tiny.ipynb").read_text())
    outputs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o["output_type"] == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 5
    vs = read_verdicts(tmp_path)
    assert vs and {v.outcome for v in vs if not v.claim.startswith("Reference")} == {"inconclusive"}


def test_quick_preset_takes_three_rung_ladders_for_every_arm():
    """The generated ladders (bnlib/ladders.py: 3 rungs per arm) drop into LR_LADDERS["quick"]:
    the preset then runs every rung of every arm, the same points otherwise, each valid."""
    from bnlib.studies import Study, p3
    three = {a: (0.01 * (i + 1), 0.04 * (i + 1), 0.16 * (i + 1)) for i, a in enumerate(p3.ARMS)}  # not real ladders
    base = p3.STUDY.presets["quick"].base
    pts = Study("p3x", "", None, {"q": p3._ladder_preset(base, three, seeds=[0, 1, 2])}, p3._derive).points("q")
    assert len(pts) == 3 * 3 * len(p3.ARMS)
    for a in p3.ARMS:
        assert sorted({p["lr"] for p in pts if p["norm"] == a}) == list(three[a])
    assert all("lr_rung" not in p for p in pts)
    bnlib.validate(pts[-1])
