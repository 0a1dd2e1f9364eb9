"""bnlib.bnstats (initialization from batch statistics, precise evaluation statistics) and the
divergence rules of the training loop."""
import copy
import math

import pytest
import torch

import bnlib
from bnlib import bnstats
from bnlib.models import create_model
from bnlib.train import DIVERGENCE_RULES, divergence


def _pair(arch="resnet8", gamma0=1.0, **kw):
    """The same net twice: with BN, and with affine_bn_init, identical conv/linear weights."""
    torch.manual_seed(0)
    bn = create_model(arch, norm="bn", width=0.5, gamma0=gamma0, **kw)
    torch.manual_seed(0)
    aff = create_model(arch, norm="affine_bn_init", width=0.5, gamma0=gamma0, **kw)
    aff.load_state_dict({k: v for k, v in bn.state_dict().items() if "running" not in k and "num_batches" not in k},
                        strict=False)
    return bn, aff


@pytest.mark.parametrize("arch,gamma0", [("resnet8", 1.0), ("resnet14", 0.1), ("resnet18", 1.0)])
def test_affine_bn_init_computes_bn_at_step_0(arch, gamma0):
    bn, aff = _pair(arch, gamma0)
    x = torch.rand(16, 3, 32, 32)
    assert bnstats.init_from_batch(aff, x) == len([m for m in aff.modules() if getattr(m, "data_init", False)]) > 0
    bn.train()
    aff.train()
    with torch.no_grad():
        yb, ya = bn(x), aff(x)
    torch.testing.assert_close(ya, yb, rtol=1e-4, atol=1e-4)
    # ...on that batch; on another batch it is a fixed affine map, not BN
    x2 = torch.rand(16, 3, 32, 32) * 2
    with torch.no_grad():
        assert not torch.allclose(aff(x2), bn(x2), atol=1e-3)


def test_affine_bn_init_leaves_other_nets_alone():
    torch.manual_seed(0)
    m = create_model("resnet8", norm="affine", width=0.5)
    before = copy.deepcopy(m.state_dict())
    assert bnstats.init_from_batch(m, torch.rand(4, 3, 32, 32)) == 0
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])


def test_affine_bn_init_run_records_its_initial_gamma(tmp_path):
    """In a real run the initial γ/β (epoch 0 of the γ/β table) are the batch-derived ones."""
    res = bnlib.run(norm="affine_bn_init", arch="resnet8", width=0.25, synthetic_size=300, val_fraction=0.2,
                    n_test=60, batch_size=32, epochs=1, progress=False, out_dir=str(tmp_path), precision="fp32")
    assert res["status"] == "completed"
    runs = bnlib.load_runs(tmp_path)
    g0 = runs.norm_params[(runs.norm_params.epoch == 0) & (runs.norm_params.param == "gamma")]
    assert (g0["mean"] != 1.0).all()  # not the default γ=1 of a plain AffineLayer
    ch = runs.channels
    assert len(ch) > 0 and ch.init.ne(1.0).any() and set(ch.param) == {"gamma", "beta"}


def _bn_net():
    torch.manual_seed(1)
    return create_model("resnet8", norm="bn", width=0.5)


def test_precise_bn_equals_the_exact_statistics_over_the_batches():
    m = _bn_net()
    batches = [torch.rand(8, 3, 32, 32) for _ in range(3)]
    stem_bn = m.stem[1]
    # the stem BN's input is the stem conv's output: its exact mean/var over all batches
    with torch.no_grad():
        z = torch.cat([m.stem[0](m.input_norm(b)) for b in batches]).double()
    mean = z.mean(dim=(0, 2, 3))
    var = z.var(dim=(0, 2, 3), unbiased=True)
    with bnstats.precise_bn(m, batches):
        torch.testing.assert_close(stem_bn.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stem_bn.running_var.double(), var, rtol=1e-5, atol=1e-6)


def test_precise_bn_leaves_the_training_state_untouched():
    m = _bn_net()
    m.train()
    for _ in range(2):  # some real running statistics and counters
        m(torch.rand(8, 3, 32, 32))
    state = copy.deepcopy(m.state_dict())
    momenta = [b.momentum for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d)]
    batches = [torch.rand(8, 3, 32, 32)]
    rng = torch.get_rng_state()
    with bnstats.precise_bn(m, batches):
        assert not torch.equal(m.stem[1].running_mean, state["stem.1.running_mean"])
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert [b.momentum for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d)] == momenta
    assert m.training
    assert torch.equal(torch.get_rng_state(), rng)


def test_precise_bn_restores_state_on_error():
    m = _bn_net()
    state = copy.deepcopy(m.state_dict())
    with pytest.raises(RuntimeError, match="boom"):
        with bnstats.precise_bn(m, [torch.rand(4, 3, 32, 32)]):
            raise RuntimeError("boom")
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k])


def test_short_run_records_both_evaluation_statistics(tmp_path):
    res = bnlib.run(norm="bn", arch="resnet8", width=0.25, synthetic_size=300, val_fraction=0.2, n_test=60,
                    batch_size=32, epochs=1, progress=False, out_dir=str(tmp_path), bn_eval_stats="precise",
                    precise_batches=2, precision="fp32")
    m = res["metrics"]
    assert m["final_test_acc"] == m["final_test_acc_precise"]  # the run's own choice is the headline
    assert 0 <= m["final_test_acc_running"] <= 1
    assert res["status"] == "completed"


# ----------------------------------------------------------------------------------------------
# divergence rules
# ----------------------------------------------------------------------------------------------

K = 10
LN_K = math.log(K)


def test_divergence_nonfinite_names_the_step():
    assert divergence([2.0, float("nan"), 2.0], 2.3, False, K, 10) == ("nonfinite", 1)
    assert divergence([2.0, float("inf")], 2.3, False, K, 10) == ("nonfinite", 1)


def test_divergence_blowup_after_training():
    # trained to 0.1, then the smoothed loss jumps above 10 × ln K
    assert divergence([30.0, 30.0], 0.1, True, K, 10) == ("blowup", 1)
    # a spike to 2.0 after 0.1 is not a divergence (below 10 × ln K)
    assert divergence([2.0, 2.0], 0.1, True, K, 10) == (None, -1)


def test_divergence_deep_unnormalized_net_with_a_huge_initial_loss():
    # a no-norm ResNet-101 starts near 3e5: relative to its initial loss alone only NaN could fire
    assert divergence([3e5, 2.9e5], 3e5, False, K, 10) == (None, -1)  # first epoch: it may still come down
    assert divergence([3e6, 3.1e6], 3e5, False, K, 10) == ("blowup", 1)  # grows 10x: blew up
    assert divergence([1e4, 1e4], 3e5, True, K, 10) == ("stuck_above_chance", 1)  # never near ln K


def test_divergence_quiet_on_a_normal_run():
    assert divergence([2.3, 2.1, 1.9], 2.3, False, K, 10) == (None, -1)
    assert divergence([0.5, 0.4], 0.6, True, K, 10) == (None, -1)
    assert set(DIVERGENCE_RULES) == {"nonfinite", "blowup", "stuck_above_chance"}


def test_a_diverged_run_records_its_rule(tmp_path):
    res = bnlib.run(norm="none", arch="resnet8", width=0.25, synthetic_size=300, val_fraction=0.2, n_test=60,
                    batch_size=32, epochs=3, lr=50.0, schedule="constant", progress=False, out_dir=str(tmp_path),
                    log_every=2)
    assert res["status"] == "diverged"
    assert res["diverged_rule"] in DIVERGENCE_RULES
    assert res["diverged_meaning"] == DIVERGENCE_RULES[res["diverged_rule"]]
