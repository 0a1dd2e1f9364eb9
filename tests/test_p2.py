"""The P2 study: the recipe's options (γ₀, optimizer groups, zero bias, the absolute lr floor, the
kept last batch), the max_normalized probe, the paired t-test against a hand computation, and the
verdicts on constructed tables whose answer is known."""
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import bnlib
from bnlib import stats
from bnlib.config import ConfigError
from bnlib.data import steps_per_epoch
from bnlib.models import norm_layers
from bnlib.probes import PROBES, ProbeContext
from bnlib.studies import get_study, p2
from bnlib.train import NormTracker, build_model, lr_at, make_optimizer, param_groups

SIGMA_ACT = math.sqrt(0.5 - 1 / (2 * math.pi))  # ≈ 0.58: the input BN's γ is γ₀ times this


def _cfg(**kw):
    return bnlib.validate({"width": 0.125, "gamma0": 0.1, "input_norm": "bn", "gamma_lr_mult": 0.01,
                           "weight_decay": 1e-4, "zero_bias": True, **kw})


# ----------------------------------------------------------------------------------------------
# γ₀ and the optimizer groups of the recipe
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnet20"])
def test_gamma0_survives_construction_in_every_norm_layer(arch):
    model = build_model(_cfg(arch=arch))
    layers = dict(norm_layers(model))
    assert "input_norm" in layers and any(".shortcut." in n for n in layers)  # the two easy ones to miss
    for name, m in layers.items():
        want = 0.1 * SIGMA_ACT if name == "input_norm" else 0.1
        assert torch.allclose(m.weight, torch.full_like(m.weight, want)), name
        assert torch.count_nonzero(m.bias) == 0, name
    # ... and the γ/β table at epoch 0 says so, layer by layer
    rows = pd.DataFrame(NormTracker(model).snapshot(0))
    g = rows[rows.param == "gamma"].set_index("layer")
    assert set(g.index) == set(layers)
    assert g.loc["input_norm", "mean"] == pytest.approx(0.1 * SIGMA_ACT)
    others = g.drop(index="input_norm")
    assert np.allclose(others[["mean", "min", "max"]].to_numpy(), 0.1) and (others["std"] < 1e-6).all()


def test_gamma0_in_the_recorded_table_of_a_real_run(tmp_path):
    res = bnlib.run(dataset="synthetic", synthetic_size=300, val_fraction=0.2, n_test=60, arch="resnet8", width=0.5,
                    gamma0=0.1, input_norm="bn", gamma_lr_mult=0.01, batch_size=64, epochs=1, log_every=2,
                    out_dir=str(tmp_path), progress=False)
    t = pd.read_parquet(res.run_dir / "norm_params.parquet")
    g0 = t[(t.epoch == 0) & (t.param == "gamma")].set_index("layer")["mean"]
    assert g0["input_norm"] == pytest.approx(0.1 * SIGMA_ACT)
    assert g0.drop("input_norm").tolist() == pytest.approx([0.1] * (len(g0) - 1))
    assert any(".shortcut." in n for n in g0.index)
    b0 = t[(t.epoch == 0) & (t.param == "beta")].set_index("layer")["mean"]
    assert "input_norm" in b0.index and (b0 == 0).all()
    # the frozen input β is still 0 after training; every other β has moved
    b1 = t[(t.epoch == 1) & (t.param == "beta")].set_index("layer")
    assert b1.loc["input_norm", "mean_abs_delta"] == 0 and (b1.drop("input_norm")["mean_abs_delta"] > 0).all()


def test_optimizer_groups_hold_exactly_the_recipe():
    cfg = _cfg()
    model = build_model(cfg)
    opt = make_optimizer(param_groups(model, cfg), cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    got = {g["name"]: ({names[id(p)] for p in g["params"]}, g["lr"], g["weight_decay"]) for g in opt.param_groups}
    # the authors' own rule (weight_decay_and_learning_rate.py), applied to bnlib's names: a 1-D parameter
    # named '...weight' is a BN scale, any other 1-D one a bias, the rest weights; frozen ones are skipped
    scale, bias, weight = set(), set(), set()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (scale if p.ndim == 1 and n.endswith("weight") else bias if p.ndim == 1 else weight).add(n)
    assert got["scale"] == (scale, pytest.approx(0.1 / 100), 0.0)
    assert got["bias"] == (bias, pytest.approx(0.1), 0.0)
    assert got["weight"] == (weight, pytest.approx(0.1), 1e-4)
    assert set(got) == {"scale", "bias", "weight"}
    assert "input_norm.weight" in scale and "fc.bias" in bias and "fc.weight" in weight
    # the input BN's β is frozen and in no group; every trainable parameter is in exactly one
    assert not model.input_norm.bias.requires_grad
    grouped = [names[id(p)] for g in opt.param_groups for p in g["params"]]
    assert "input_norm.bias" not in grouped and len(grouped) == len(set(grouped))
    assert set(grouped) == {n for n, p in model.named_parameters() if p.requires_grad}
    # the classifier bias starts at 0 (the authors zero every bias)
    assert torch.count_nonzero(model.fc.bias) == 0


# ----------------------------------------------------------------------------------------------
# zero_bias, final_lr, drop_last: each changes what it says and nothing else
# ----------------------------------------------------------------------------------------------

def test_zero_bias_changes_the_classifier_bias_and_nothing_else():
    states = []
    for zb in (False, True):
        torch.manual_seed(3)
        states.append(build_model(bnlib.validate(width=0.125, zero_bias=zb)).state_dict())
    plain, zeroed = states
    assert torch.count_nonzero(plain["fc.bias"]) > 0 and torch.count_nonzero(zeroed["fc.bias"]) == 0
    assert plain.keys() == zeroed.keys()
    for k in plain:
        if k != "fc.bias":
            assert torch.equal(plain[k], zeroed[k]), k


def test_absolute_lr_floor_matches_torchs_cosine_annealing_per_group():
    # P2's code: CosineAnnealingLR(eta_min=1e-8) anneals each group from its own start to 1e-8
    cfg = bnlib.validate(final_lr=1e-8, gamma_lr_mult=0.01)
    total = 50
    starts = [0.1, 0.001, 0.1]
    ref_opt = torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))], "lr": s} for s in starts], lr=0.1)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=total, eta_min=1e-8)
    for step in range(total):
        ours = [s * lr_at(step, total, cfg, 10, s) for s in starts]
        assert ours == pytest.approx([g["lr"] for g in ref_opt.param_groups], rel=1e-9, abs=1e-15), step
        ref_opt.step()
        ref.step()
    # at the end every group sits at the absolute floor, whatever its start
    assert [s * lr_at(total, total, cfg, 10, s) for s in starts] == pytest.approx([1e-8] * 3, rel=1e-9)


def test_lr_floor_zero_and_none_give_the_old_schedule():
    old = bnlib.validate(schedule="cosine", warmup_epochs=1.0)
    for new in (bnlib.validate(schedule="cosine", warmup_epochs=1.0, final_lr=0.0), old):
        assert [lr_at(s, 100, new, 10, 0.5) for s in range(101)] == [lr_at(s, 100, old, 10) for s in range(101)]
    frac = bnlib.validate(final_lr_frac=0.1)
    assert lr_at(100, 100, frac, 10) == pytest.approx(0.1)  # relative: a tenth of each start lr
    with pytest.raises(ValueError, match="start_lr"):
        lr_at(5, 100, bnlib.validate(final_lr=1e-8), 10)


@pytest.mark.parametrize("kw, needle", [
    (dict(final_lr=1e-8, final_lr_frac=0.1), "give one floor"),
    (dict(final_lr=1e-8, schedule="step"), "schedule='step'"),
    (dict(final_lr=0.01, gamma_lr_mult=0.01), "above the start lr 0.001"),
    (dict(final_lr=-1.0), "final_lr=-1.0: out of range"),
    (dict(drop_last=False, synthetic_size=1000, val_fraction=0.1, batch_size=899), "last batch of 1 image"),
    (dict(drop_last=False, norm="none", input_norm="bn", synthetic_size=1000, val_fraction=0.1, batch_size=899),
     "input_norm='bn'"),
])
def test_bad_recipe_options_are_refused_by_name(kw, needle):
    with pytest.raises(ConfigError, match=None) as e:
        bnlib.validate(**kw)
    assert needle in str(e.value)


def test_kept_last_batch_with_a_statistics_free_net_is_allowed():
    bnlib.validate(drop_last=False, norm="none", synthetic_size=1000, val_fraction=0.1, batch_size=899)


def test_drop_last_changes_the_step_count_and_nothing_else(tmp_path):
    assert steps_per_epoch(4000, 128) == 31 and steps_per_epoch(4000, 128, drop_last=False) == 32
    assert steps_per_epoch(4096, 128, drop_last=False) == 32
    common = dict(dataset="synthetic", synthetic_size=250, val_fraction=0.2, n_test=40, arch="resnet8", width=0.25,
                  batch_size=64, epochs=1, log_every=1, out_dir=str(tmp_path), progress=False, precision="fp32",
                  schedule="constant")  # a cosine's length would follow the step count
    runs = {dl: bnlib.run(drop_last=dl, **common) for dl in (True, False)}
    steps = {dl: pd.read_parquet(r.run_dir / "steps.parquet") for dl, r in runs.items()}
    ep = {dl: pd.read_parquet(r.run_dir / "epochs.parquet") for dl, r in runs.items()}
    assert len(steps[True]) == 200 // 64 and len(steps[False]) == -(-200 // 64)  # 3 vs 4 steps
    assert ep[True].step.iloc[-1] == 3 and ep[False].step.iloc[-1] == 4
    # the same data order, the same first steps: the kept batch only adds the last one, of 200 mod 64 images
    assert steps[True].loss.tolist() == steps[False].loss.tolist()[:3]


def test_recorded_lr_follows_the_absolute_floor_in_a_real_run(tmp_path):
    res = bnlib.run(dataset="synthetic", synthetic_size=250, val_fraction=0.2, n_test=40, arch="resnet8", width=0.25,
                    batch_size=50, epochs=2, log_every=1, lr=0.1, final_lr=0.02, out_dir=str(tmp_path),
                    progress=False)
    st = pd.read_parquet(res.run_dir / "steps.parquet")
    total = len(st)  # lr_now: the weight group's lr before the update of that step
    want = [0.02 + (0.1 - 0.02) * 0.5 * (1 + math.cos(math.pi * s / total)) for s in st.step]
    assert st.lr_now.tolist() == pytest.approx(want, rel=1e-6)


# ----------------------------------------------------------------------------------------------
# the probe
# ----------------------------------------------------------------------------------------------

def test_max_normalized_matches_a_hand_computed_layer():
    torch.manual_seed(0)
    cfg = _cfg(arch="resnet8", width=0.5)
    model = build_model(cfg).train()
    x = torch.rand(32, 3, 32, 32)
    ctx = ProbeContext(model, x, torch.zeros(32, dtype=torch.long), None, None, 0, 0.0, cfg,
                       (x, torch.zeros(32, dtype=torch.long)))
    seen = {}
    h = model.stem[0].register_forward_hook(lambda m, i, o: seen.__setitem__("conv", o.detach()))
    rows = pd.DataFrame(PROBES["max_normalized"].fn(ctx))
    h.remove()
    c = seen["conv"]  # the stem conv's output, the stem BN's input: (N, C, H, W)
    mu, var = c.mean((0, 2, 3), keepdim=True), c.var((0, 2, 3), unbiased=False, keepdim=True)
    xhat = ((c - mu) / torch.sqrt(var + 1e-5)).abs().max().item()
    v = rows.set_index(["layer", "quantity"])["value"]
    assert v["stem.1", "xhat_abs_max"] == pytest.approx(xhat, rel=1e-4)
    # at init β = 0, so every output is γ₀ times its x̂ (input BN: 0.58·γ₀)
    for layer in rows.layer.unique():
        g = 0.1 * SIGMA_ACT if layer == "input_norm" else 0.1
        assert v[layer, "out_abs_max"] == pytest.approx(g * v[layer, "xhat_abs_max"], rel=1e-4)
    assert rows.depth.tolist()[::2] == list(range(len(norm_layers(model))))
    # input BN: per channel over N·H·W values, |x̂| <= sqrt(m − 1)
    assert v["input_norm", "xhat_abs_max"] <= math.sqrt(32 * 32 * 32 - 1)


# ----------------------------------------------------------------------------------------------
# statistics: the one-sided paired t-test against a hand computation
# ----------------------------------------------------------------------------------------------

PAPER_LENGTH = dict(dataset="cifar10", n_train=None, val_fraction=0.1, epochs=180, batch_size=128, drop_last=False)


def _table(acc: dict, seeds, **cfg) -> pd.DataFrame:
    """acc[(γ₀, c, input_norm)] -> list of accuracies per seed; runs of the paper's length
    unless `cfg` says otherwise (the budget rule then does not apply)."""
    rows = [{"run_id": f"{a}-{s}", "status": "completed", "gamma0": a[0], "gamma_lr_mult": 1 / a[1],
             "input_norm": a[2], "seed": s, "best_val_acc": v, "test_acc_at_best_val": v, **PAPER_LENGTH, **cfg}
            for a, vals in acc.items() for s, v in zip(seeds, vals)]
    return pd.DataFrame(rows)


def test_one_sided_paired_t_test_against_a_hand_computation():
    # 3 pairs, differences 0.01, 0.03, 0.02: mean 0.02, sd 0.01, se 0.01/√3, t = 2√3, df = 2.
    # For df = 2 the t distribution has a closed form: P(T > t) = 1/2 − t / (2 √(2 + t²)).
    base = [0.80, 0.85, 0.90]
    runs = _table({p2.REFERENCE: base, (0.1, 1, "dataset"): [b + d for b, d in zip(base, (0.01, 0.03, 0.02))]},
                  seeds=[0, 1, 2])
    e = p2.compare(runs, (0.1, 1, "dataset"), p2.REFERENCE)
    t = 0.02 / (0.01 / math.sqrt(3))
    assert t == pytest.approx(2 * math.sqrt(3))
    assert e.p == pytest.approx(0.5 - t / (2 * math.sqrt(2 + t * t)), rel=1e-9)  # = 0.0371
    assert e.p == pytest.approx(0.037089, abs=1e-6)
    # the 95% interval: mean ± t_{0.975, 2} · se, with t_{0.975, 2} = 4.302653 (tables)
    assert (e.mean, e.lo, e.hi) == pytest.approx((0.02, 0.02 - 4.302653 * 0.01 / math.sqrt(3),
                                                  0.02 + 4.302653 * 0.01 / math.sqrt(3)), rel=1e-6)
    assert e.n == 3 and e.alternative == "greater"
    # the authors' call gives the same p
    from scipy.stats import ttest_rel
    assert e.p == pytest.approx(ttest_rel([b + d for b, d in zip(base, (0.01, 0.03, 0.02))], base,
                                          alternative="greater").pvalue)
    # and in the table: significant at p <= 0.05 (the paper's criterion), with the difference and interval
    row = p2.table(runs).set_index("arm").loc[p2.arm_name(0.1, 1, "dataset")]
    assert row.significant and row.p_one_sided == pytest.approx(e.p) and row.vs == p2.arm_name(*p2.REFERENCE)


# ----------------------------------------------------------------------------------------------
# verdicts on constructed tables
# ----------------------------------------------------------------------------------------------

def _world(effects: dict, seeds=range(8), base=0.85, noise=0.003, seed_sd=0.01, **cfg):
    """Every arm of the grid; arm accuracy = base + a per-seed offset (shared by the arms: the
    pairing) + effects.get(arm, 0) + noise."""
    rng = np.random.default_rng(0)
    offset = rng.normal(0, seed_sd, len(seeds))
    acc = {a: [base + o + effects.get(a, 0.0) + rng.normal(0, noise) for o in offset] for a in p2.ARMS}
    return SimpleNamespace(runs=_table(acc, list(seeds), **cfg))


def _out(vs):
    return [v.outcome for v in vs]


def test_verdicts_support_the_claims_when_the_runs_show_them():
    w = _world({(0.1, 1, "dataset"): 0.01, p2.RECIPE: 0.02, p2.INPUT_BN: 0.03})
    assert _out(p2.verdicts(w)) == ["supported"] * 4
    t = p2.table(w.runs).set_index("arm")
    assert t.loc[p2.arm_name(*p2.INPUT_BN), "vs"] == p2.arm_name(*p2.RECIPE)
    assert t.loc[p2.arm_name(*p2.RECIPE), "significant"] and not t.loc[p2.arm_name(0.5, 1, "dataset"), "significant"]
    cells = p2.paper_table(p2.table(w.runs))
    assert cells.shape == (5, 2) and cells.loc["γ₀ = 0.1", "c = 100"].endswith("*")


def test_verdicts_contradict_when_the_arm_is_worse():
    w = _world({(0.1, 1, "dataset"): -0.02, p2.RECIPE: -0.03, p2.INPUT_BN: -0.05})
    assert _out(p2.verdicts(w)) == ["contradicted", "contradicted", "contradicted", "contradicted"]


def test_verdicts_inconclusive_without_an_effect_or_a_learning_reference():
    null = p2.verdicts(_world({}, noise=0.01))
    assert set(_out(null)) <= {"inconclusive", "contradicted"} and "inconclusive" in _out(null)
    chance = p2.verdicts(_world({p2.RECIPE: 0.05}, base=0.1, noise=0.001, seed_sd=0.001))
    assert _out(chance) == ["inconclusive"] * 4 and "does not clearly learn" in chance[2].sentence
    two = p2.verdicts(_world({p2.RECIPE: 0.05}, seeds=range(2)))
    assert _out(two) == ["inconclusive"] * 4 and "only 2 seeds" in two[2].sentence
    assert _out(p2.verdicts(pd.DataFrame())) == ["inconclusive"] * 4


def test_resolution_says_what_the_seeds_can_resolve():
    res = p2.resolution(_world({}, seeds=range(5), noise=0.01).runs)
    assert len(res) == 4 and (res.pairs == 5).all()
    # (t_{0.95,4} + t_{0.8,4}) · sd / √5
    row = res.iloc[0]
    assert row.detectable_effect_80pct_power == pytest.approx((2.131847 + 0.940965) * row.sd_of_differences / math.sqrt(5),
                                                              rel=1e-5)


# ----------------------------------------------------------------------------------------------
# the grid
# ----------------------------------------------------------------------------------------------

def test_p2_grid_is_the_papers_and_arms_differ_only_in_what_is_varied():
    s = get_study("p2")
    # quick: the 4 arms its claims compare; paper: the whole γ₀ × c table and the input BN
    for preset, n_seeds, want in (("quick", len(p2.QUICK_SEEDS), {p2.REFERENCE, (0.1, 1, "dataset"), p2.RECIPE,
                                                                  p2.INPUT_BN}), ("paper", 15, set(p2.ARMS))):
        pts = s.points(preset)
        assert len(pts) == len(want) * n_seeds and len(set(p2.ARMS)) == 11 and n_seeds >= 3
        arms = {(p["gamma0"], round(1 / p["gamma_lr_mult"]), p["input_norm"]) for p in pts}
        assert arms == want
        varied = {"gamma0", "gamma_lr_mult", "input_norm", "probes", "seed"}
        shared = [{k: v for k, v in p.items() if k not in varied} for p in pts]
        assert all(x == shared[0] for x in shared)
        assert {p["seed"] for p in pts} == set(range(n_seeds))
        for p in pts[:: n_seeds]:
            bnlib.validate(p)
    paper = s.points("paper")[0]
    for k, v in dict(dataset="cifar10", arch="resnet18", stem="cifar", width=1.0, epochs=180, batch_size=128, lr=0.1,
                     momentum=0.9, weight_decay=1e-4, schedule="cosine", final_lr=1e-8, crop_pad=0, flip=True,
                     val_fraction=0.1, zero_bias=True, drop_last=False, precision="fp32", gamma_wd=0.0,
                     bias_wd=0.0).items():
        assert paper[k] == v, k
    assert all(p["probes"] == ["max_normalized"] for p in s.points("paper"))
    quick = s.points("quick")
    assert {p["dataset"] for p in quick} == {"fashion_mnist"}
    assert {p2.arm_name(p["gamma0"], round(1 / p["gamma_lr_mult"]), p["input_norm"]) for p in quick if p["probes"]} \
        == {p2.arm_name(*a) for a in p2.PROBED}


def test_p2_notebook_runs_on_a_tiny_study(tmp_path):
    """The analysis notebook end to end through papermill on a tiny study (the reference, γ₀ = 0.1
    at c = 1 and 100, and the input BN; one seed): no cell fails, the figures are drawn, the
    verdicts are written and say inconclusive (one seed cannot carry them)."""
    import json

    from bnlib.grid import run_study
    from bnlib.stats import read_verdicts
    from bnlib.studies import Preset, Study

    idx = [p2.ARMS.index(a) for a in (p2.REFERENCE, (0.1, 1, "dataset"), p2.RECIPE, p2.INPUT_BN)]
    tiny = Study(name="p2tiny", title="P2 smoke", notebook="studies/p2_revisiting_bn.ipynb", derive=p2._arm_params,
                 presets={"smoke": Preset(
                     base=dict(p2.RECIPE_PARAMS, arch="resnet8", width=0.25, synthetic_size=300, val_fraction=0.2,
                               n_test=60, batch_size=32, epochs=2, log_every=2, probe_batch_size=32),
                     grid=dict(arm=idx, seed=[0]))})
    counts = run_study(tiny, "smoke", tmp_path, progress=False)
    assert counts["failed"] == 0 and counts["completed"] + counts["diverged"] == 4
    nb = json.loads((tmp_path / "studies" / "p2tiny" / "p2tiny.ipynb").read_text())
    outputs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o["output_type"] == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 4
    vs = read_verdicts(tmp_path)
    assert len(vs) == 4 and {v.outcome for v in vs} == {"inconclusive"}


def test_a_short_budget_makes_every_claim_inconclusive_and_keeps_its_statistics():
    """The quick preset's 64 of the paper's 63 360 steps: each claim is 'inconclusive (budget)',
    and the sentence still gives the effect at this budget with what it would decide."""
    quick = get_study("p2").presets["quick"].base
    w = _world({p2.RECIPE: 0.02}, seeds=range(5), **{k: quick[k] for k in PAPER_LENGTH if k in quick})
    vs = p2.verdicts(w)
    assert all(v.outcome == "inconclusive" and "budget" in v.causes for v in vs)
    v = vs[2]
    assert v.label == "inconclusive (budget)"
    assert v.at_budget == "supported" and "at 64 of the paper's 63 360 steps:" in v.sentence
    assert "(supported at this budget)" in v.sentence
    assert p2.PAPER_STEPS == 180 * 352
