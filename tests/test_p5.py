"""The P5 study: the signal_propagation probe against P5's three curves, the grid and its
derived α = 1/√d, and the verdicts on constructed tables whose answer is known."""
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import bnlib
from bnlib.models import num_blocks
from bnlib.probes import ProbeRunner
from bnlib.studies import Preset, Study, get_study, p5
from bnlib.train import build_model, make_optimizer, param_groups


def _signal(arch, variant, width=1.0, stem="cifar", n=32, size=16, seed=0):
    """The probe's wide table (one row per block) at init for one variant of `arch`."""
    cfg = bnlib.validate(arch=arch, width=width, stem=stem, probes=["signal_propagation"], probe_batch_size=n,
                         **p5.VARIANTS[variant].params(arch))
    torch.manual_seed(seed)
    model = build_model(cfg, mean=(0.5,), std=(0.25,))
    g = torch.Generator().manual_seed(seed)
    x, y = torch.rand(n, 1, size, size, generator=g), torch.arange(n) % 10
    runner = ProbeRunner(cfg, model, make_optimizer(param_groups(model, cfg), cfg),
                         lambda o, t: F.cross_entropy(o, t), (x, y), 1)
    runner.at(0, x, y)
    rows = runner.frame()
    wide = rows.pivot_table(index="depth", columns="quantity", values="value").reset_index()
    return wide.assign(variant=variant, net_depth=int(arch[3:].split("_")[0])), rows


def test_signal_propagation_shows_p5s_three_curves():
    """WRN-76-1 (12 identity-skip blocks in its first stage, 16 channels): with BN the skip
    path's mean square grows linearly, by the branch's ~1 per block; without normalization it
    doubles per block; with SkipInit (α₀ = 0) every branch is exactly 0 and the skip path flat."""
    sig = {v: _signal("wrn76_1", v)[0] for v in ("bn", "none", "skipinit")}
    fit = p5.growth(pd.concat(sig.values())).set_index("variant")
    assert (fit["blocks_fitted"] == 12).all()
    bn, none = fit.loc["bn"], fit.loc["none"]
    assert 0.6 < bn["added_per_block"] < 1.6 and bn["linear_r2"] > 0.95
    first = sig["bn"][sig["bn"]["depth"] < 12]
    assert first["branch_ms"].between(0.5, 2.0).all()  # the branch stays at unit scale
    assert (first["branch_to_skip"].iloc[-1] < first["branch_to_skip"].iloc[1] / 3)  # down-weighted ~1/l
    assert 0.75 < none["log2_per_block"] < 1.25 and bn["log2_per_block"] < 0.4
    s = sig["skipinit"]
    assert (s["branch_ms"] == 0).all() and fit.loc["skipinit", "branch_ms_max"] == 0
    assert s.loc[s["depth"] < 12, "skip_ms"].nunique() == 1  # the identity, exactly
    assert set(s["identity_skip"]) == {0.0, 1.0} and (s["identity_skip"] == 0).sum() == 2  # two stage starts


def test_signal_propagation_covers_every_block_of_a_1000_layer_net():
    """The 1000-layer net of the quick preset builds and the probe measures all 498 blocks, in
    float64: the unnormalized net's growth is recorded, not overflowed to inf."""
    for variant in ("bn", "none"):
        wide, rows = _signal("wrn1000_1", variant, width=0.25, stem="imagenet", n=8, size=28)
        assert len(wide) == num_blocks("wrn1000_1") == 498
        assert set(rows["quantity"]) == {"skip_ms", "branch_ms", "branch_to_skip", "identity_skip"}
        assert np.isfinite(wide[["skip_ms", "branch_ms"]].to_numpy()).all()
    assert wide["skip_ms"].max() > 1e30  # 'none': far beyond what fp32 activations could square


def test_preset_subgrids_are_a_union_of_products():
    s = Study("sub", "subgrids", None, {"x": Preset(base=dict(epochs=1), grid=dict(seed=[0, 1]), subgrids=(
        dict(norm=["bn", "none"]), dict(norm=["bn"], epochs=[1, 2])))})
    pts = s.points("x")
    # (2 seeds × 2 norms) + (2 seeds × 1 norm × 2 epochs) − the 2 points both sub-grids hold
    assert len(pts) == 6 and len({tuple(sorted(p.items())) for p in pts}) == 6
    assert s.axes("x") == ["seed", "norm", "epochs"]
    assert len(get_study("p1").points("quick")) == 5 * 2 * 3 * 3  # no sub-grids: arms × batch sizes × rungs × seeds


def test_p5_points_derive_alpha_from_the_arch_and_map_back_to_their_variant():
    s = get_study("p5")
    for preset in ("quick", "paper"):
        pts = s.points(preset)
        df = p5.annotate(pd.DataFrame(pts).assign(run_id=range(len(pts))))
        assert (df["variant"] != "other").all()
        assert set(df["experiment"]) == {"depth", "batch"}
        dep = df[df["experiment"] == "depth"]
        assert set(dep["net_depth"]) == {16, 100, 1000}
        assert {v for v, nd in zip(dep["variant"], dep["net_depth"]) if nd == 1000} >= set(p5.DEPTH_VARIANTS)
        inv = dep[dep["variant"] == "skipinit_inv_sqrt_d"]
        assert np.allclose(inv["alpha0"], 1 / np.sqrt(inv["arch"].map(num_blocks)))
        assert math.isclose(inv.loc[inv["arch"] == "wrn1000_1", "alpha0"].iloc[0], 1 / math.sqrt(498))
        fixed = dep[dep["variant"] == "fixed_inv_sqrt2"]
        assert (~fixed["alpha_learnable"].astype(bool)).all() and np.allclose(fixed["alpha0"], 2 ** -0.5)
        assert (dep.loc[dep["variant"] == "none", "residual_gain"].fillna(False) == False).all()  # noqa: E712
        bat = df[df["experiment"] == "batch"]
        assert set(bat["variant"]) >= {"bn", "skipinit"} and bat["batch_size"].nunique() >= 3
        # the batch-size study's rates: powers of 2 of base_lr·B/128; the paper's one grid at every
        # batch size, the quick preset's a 3-rung ladder (×4) per variant and batch size (the sweep's)
        assert np.allclose(np.log2(bat["lr"]) % 1, 0)
        if preset == "paper":
            per_b = bat.groupby("batch_size")["lr"].apply(lambda s: tuple(sorted({v * 128 / s.name for v in s})))
            assert per_b.nunique() == 1
        else:
            rungs = bat.groupby(["variant", "batch_size"])["lr"].apply(lambda s: sorted(set(s)))
            assert all(len(r) == 3 and np.allclose(np.diff(np.log2(r)), 2) for r in rungs)
        bnlib.validate({**pts[0], "device": "cpu"})
    quick = s.points("quick")
    for p in quick:
        bnlib.validate(p)
    assert all(p.get("probes") == ["signal_propagation"] for p in quick if p["arch"] != p5.BATCH_ARCH)
    assert {p["dataset"] for p in quick} == {"fashion_mnist"}


# ----------------------------------------------------------------------------------------------
# verdicts on constructed tables
# ----------------------------------------------------------------------------------------------

def _runs(depth_acc, batch_acc, seeds=(0, 1, 2), noise=0.004):
    """A runs table over the quick preset's points: depth_acc(variant, net_depth, lr) and
    batch_acc(variant, batch_size, lr) -> test accuracy, or None for a diverged run."""
    rng = np.random.default_rng(0)
    pts = get_study("p5").points("quick")
    rows = []
    for i, p in enumerate(pts):
        if p["seed"] not in seeds:
            continue
        row = {**p, "run_id": f"r{i}"}
        v = p5.variant_of(row)
        a = (batch_acc(v, p["batch_size"], p["lr"]) if p["arch"] == p5.BATCH_ARCH
             else depth_acc(v, int(p["arch"][3:].split("_")[0]), p["lr"]))
        val = np.nan if a is None else a + rng.normal(0, noise)
        rows.append({**row, "status": "diverged" if a is None else "completed", "best_val_acc": val,
                     "test_acc_at_best_val": np.nan if a is None else val + rng.normal(0, noise)})
    for s in seeds:  # seeds beyond the preset's (its batch-size study has 3): seed 0's points again
        have = {r["arch"] for r in rows if r["seed"] == s}
        rows += [{**r, "seed": s, "run_id": r["run_id"] + f"-{s}",
                  "best_val_acc": r["best_val_acc"] + rng.normal(0, noise),
                  "test_acc_at_best_val": r["test_acc_at_best_val"] + rng.normal(0, noise)}
                 for r in rows if r["seed"] == 0 and r["arch"] not in have]
    return SimpleNamespace(runs=pd.DataFrame(rows), probes=pd.DataFrame())


def _p5_depth(v, depth, lr):  # the paper's picture: SkipInit ≈ BN at depth 1000, α = 1 and 1/√2 diverge
    if v in ("none", "fixed_inv_sqrt2") and depth >= 100:
        return None
    # each variant runs at one rate per depth (fixed by the ladder sweep): no choice, no edge
    return {"bn": 0.80, "skipinit": 0.79, "skipinit_inv_sqrt_d": 0.78, "none": 0.75, "fixed_inv_sqrt2": 0.76}[v]


def _rung(v, b, lr) -> int:
    """Which rung of the quick preset's (variant, batch size) ladder a batch-study run is on."""
    return [round(x * b / 128, 10) for x in p5.LR_LADDERS["quick"][v, b]].index(round(lr, 10))


def _p5_batch(v, b, lr):  # equal at batch 16; at 256 BN wins; each optimum at its ladder's middle rung
    top = 0.85 if (b < 256 or v == "bn") else 0.72
    return top - 0.025 * abs(_rung(v, b, lr) - 1)


def _outcomes(vs):
    """Each claim's outcome as the statistics decide it at these runs' budget (the quick
    preset's runs are far shorter than the paper's: every accuracy claim is 'inconclusive
    (budget)' with this outcome beside it)."""
    return {v.claim: v.at_budget or v.outcome for v in vs}


def test_verdicts_support_p5_when_the_runs_show_it():
    # 5 seeds: with 3, an equivalence within ±0.02 needs a spread of differences below ~0.008
    vs = p5.verdicts(_runs(_p5_depth, _p5_batch, seeds=range(5), noise=0.002))
    out = _outcomes(vs)
    assert out == {"BN trains the depth-1000 net (reference)": "supported",
                   "SkipInit (α₀ = 0, no normalization) recovers BN's trainability at depth 1000": "supported",
                   "SkipInit beats α = 1 and fixed α = 1/√2 at depth 1000": "supported",
                   "BN's advantage over SkipInit is confined to large batch sizes": "supported"}, out
    table = p5.batch_table(_runs(_p5_depth, _p5_batch).runs).set_index(["variant", "batch_size"])
    # the middle rungs: base_lr 0.25 (bn) and 0.5 (skipinit) at batch 256, lr = base_lr·256/128
    assert table.loc[("bn", 256), "lr"] == 0.5 and table.loc[("skipinit", 256), "lr"] == 1.0
    tr = p5.trainability(_runs(_p5_depth, _p5_batch).runs).set_index(["variant", "net_depth"])
    assert not tr.loc[("none", 1000), "trains"] and tr.loc[("skipinit", 1000), "trains"]
    assert p5.trainability_grid(tr.reset_index()).loc["none (α = 1)", 1000] == "diverged"


def test_verdicts_contradict_when_skipinit_fails_at_depth_and_bn_leads_at_every_batch_size():
    def depth(v, d, lr):
        a = _p5_depth(v, d, lr)
        return a - 0.25 if (v == "skipinit" and d == 1000 and a is not None) else a

    def batch(v, b, lr):
        return 0.85 - 0.025 * abs(_rung(v, b, lr) - 1) - (0.0 if v == "bn" else 0.1)

    out = _outcomes(p5.verdicts(_runs(depth, batch)))
    assert out["SkipInit (α₀ = 0, no normalization) recovers BN's trainability at depth 1000"] == "contradicted"
    assert out["BN's advantage over SkipInit is confined to large batch sizes"] == "contradicted"


def test_verdicts_are_inconclusive_when_the_runs_cannot_carry_them():
    # BN never learns: nothing to recover or compare
    flat = p5.verdicts(_runs(lambda v, d, lr: 0.1, lambda v, b, lr: 0.1))
    assert {v.outcome for v in flat} == {"inconclusive"}
    # two seeds: too few matched pairs for any paired claim
    two = p5.verdicts(_runs(_p5_depth, _p5_batch, seeds=(0, 1)))
    assert {v.outcome for v in two if "reference" not in v.claim} == {"inconclusive"}
    # noisy runs: the intervals straddle the margins
    noisy = _outcomes(p5.verdicts(_runs(_p5_depth, _p5_batch, noise=0.06)))
    assert noisy["SkipInit (α₀ = 0, no normalization) recovers BN's trainability at depth 1000"] == "inconclusive"
    # no runs at all, or no batch-size study
    assert [v.outcome for v in p5.verdicts(pd.DataFrame())] == ["inconclusive"]
    r = _runs(_p5_depth, _p5_batch).runs
    only_depth = p5.verdicts(r[r["arch"] != p5.BATCH_ARCH])
    assert only_depth[-1].outcome == "inconclusive" and "needs batch-size-study runs" in only_depth[-1].sentence


def test_an_ablation_with_too_few_seeds_is_left_to_the_table_not_claimed():
    # the quick preset runs fixed α = 1/√2 at depth 1000 with 3 seeds: both comparisons are tested
    vs = {v.claim: v for v in p5.verdicts(_runs(_p5_depth, _p5_batch))}
    both = vs["SkipInit beats α = 1 and fixed α = 1/√2 at depth 1000"]
    assert (both.at_budget or both.outcome) == "supported" and len(both.effects) == 2 and "Not tested" not in both.sentence
    assert "none (α = 1) does not train" not in both.sentence and "α = 1 does not train" in both.sentence
    # with one seed of fixed α = 1/√2 there, no paired claim rests on it
    w = _runs(_p5_depth, _p5_batch)
    r = w.runs
    one = ~((r["arch"] == "wrn1000_1") & (r["residual_gain"] == True) & (r["alpha_learnable"] == False)  # noqa: E712
            & (r["seed"] > 0))
    w.runs = r[one]
    vs = {v.claim: v for v in p5.verdicts(w)}
    v = vs["SkipInit beats α = 1 at depth 1000"]
    assert (v.at_budget or v.outcome) == "supported" and "Not tested" in v.sentence
    assert "fixed α = 1/√2 (1 seed)" in v.sentence and len(v.effects) == 1 and "n = 3 seeds" in v.sentence
    # when every seed fails, SkipInit vs α = 1 is no longer supported
    fail = p5.verdicts(_runs(lambda v, d, lr: None if v == "skipinit" and d == 1000 else _p5_depth(v, d, lr),
                             _p5_batch))
    assert _outcomes(fail)[
        "SkipInit beats α = 1 and fixed α = 1/√2 at depth 1000"] != "supported"


def test_a_choice_at_the_end_of_the_grid_makes_the_claim_inconclusive():
    def batch(v, b, lr):  # SkipInit's best rate lies below its ladder at batch 256: its lowest rung wins
        return _p5_batch(v, b, lr) - (0.03 * _rung(v, b, lr) if v == "skipinit" and b == 256 else 0)

    v = p5.verdicts(_runs(_p5_depth, batch))[-1]
    assert "skipinit at lr" in v.sentence and "batch_size 256" in v.sentence and "end of its ladder" in v.sentence
    assert "ladder edge" in v.causes and (v.at_budget or v.outcome) == "inconclusive"


def test_p5_notebook_runs_on_a_tiny_study(tmp_path):
    """The analysis notebook end to end through papermill on a 7-run study (both
    sub-experiments, one seed): no cell fails, the figures are drawn, the verdicts are written
    and say inconclusive (one seed cannot carry them)."""
    import json

    from bnlib.grid import run_study
    from bnlib.stats import read_verdicts

    tiny = Study(name="p5tiny", title="P5 smoke", notebook="studies/p5_skipinit.ipynb", derive=p5.derive,
                 presets={"smoke": Preset(
                     base=dict(width=0.125, synthetic_size=300, val_fraction=0.2, n_test=60, epochs=1, log_every=2,
                               probe_batch_size=16, stem="imagenet"),
                     grid=dict(seed=[0]),
                     subgrids=(dict(arch=["wrn10_1"], variant=["bn", "skipinit", "none"], lr=[0.05], batch_size=[32],
                                    probes=[["signal_propagation"]]),
                               dict(arch=[p5.BATCH_ARCH], variant=["bn", "skipinit"], batch_size=[16, 64],
                                    base_lr=[0.25])))})
    counts = run_study(tiny, "smoke", tmp_path, progress=False)
    assert counts["failed"] == 0 and counts["completed"] + counts["diverged"] == 7
    nb = json.loads((tmp_path / "studies" / "p5tiny" / "p5tiny.ipynb").read_text())
    outputs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o["output_type"] == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3
    vs = read_verdicts(tmp_path)
    assert vs and {v.outcome for v in vs if "reference" not in v.claim} == {"inconclusive"}
