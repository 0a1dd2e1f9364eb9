"""P5's architectures: pre-activation Wide-ResNets (wrn{6n+4}_{k}), residual-gain variants, the
regularized-SkipInit pieces (conv_bias, fc_dropout), in-block dropout, activation checkpointing,
and the parts(x) -> (skip, branch) interface of every residual block."""
import copy
import json
import time

import pandas as pd
import pytest
import torch
from torch import nn

import bnlib
from bnlib.config import ConfigError
from bnlib.models import (BasicBlock, Bottleneck, PreActBlock, arch_spec, conv_layers, create_model, norm_layers,
                          num_blocks, param_roles, parse_arch)
from bnlib.norms import NORMS
from bnlib.train import build_model, make_optimizer, param_groups

TINY = dict(arch="resnet8", width=0.25, synthetic_size=300, val_fraction=0.2, n_test=60, batch_size=32,
            epochs=1, progress=False, log_every=2, precision="fp32")


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------
# the family
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch, exact, published", [("wrn16_4", 2_748_890, 2.7), ("wrn28_10", 36_479_194, 36.5)])
def test_wrn_has_the_published_size(arch, exact, published):
    # Zagoruyko & Komodakis 2016, Table 1 / Sec. 3 (CIFAR-10): WRN-16-4 2.7M, WRN-28-10 36.5M
    with torch.device("meta"):
        model = create_model(arch, width=1.0, norm="bn", num_classes=10, in_channels=3)
    n = _n_params(model)
    assert round(n / 1e6, 1) == published
    assert n == exact  # to the parameter: what the common PyTorch WRN implementations build


def test_wrn_structure():
    spec = arch_spec("wrn28_10")
    assert spec == ("preact", (4, 4, 4), (160, 320, 640), 16) and parse_arch("wrn28_10") == spec[:3]
    model = create_model("wrn16_4", width=1.0, norm="bn")
    assert [len(s) for s in model.stages] == [2, 2, 2]
    assert all(isinstance(b, PreActBlock) for b in model.blocks())
    assert model.stem[0].out_channels == 16 and len(model.stem) == 1  # bare conv, k does not widen it
    assert [b.conv2.out_channels for b in model.blocks()] == [64, 64, 128, 128, 256, 256]
    # a projection shortcut where the shape changes (16 -> 64 too), an identity elsewhere
    assert [type(b.shortcut).__name__ for b in model.blocks()] == ["Conv2d", "Identity"] * 3
    assert isinstance(model.final[0], nn.BatchNorm2d) and isinstance(model.final[1], nn.ReLU)
    assert model.fc.in_features == 256
    # d = 6n+4 counts the stem, 6n branch convs, the classifier and 2 projection shortcuts
    assert len(conv_layers(model)) + 1 == 16 + 1  # with k = 4 the first group projects too: one more


@pytest.mark.parametrize("width, stem, groups", [(1.0, 16, (16, 32, 64)), (0.25, 4, (4, 8, 16)),
                                                 (0.5, 8, (8, 16, 32))])
def test_width_scales_stem_and_groups_of_wrn_k1(width, stem, groups):
    # the width multiplier scales every conv, the 16-channel stem included: at width 0.25 the
    # stem has 4 channels and wrn{d}_1 is 4/8/16 channels wide
    model = create_model("wrn22_1", width=width)
    assert model.stem[0].out_channels == stem
    assert tuple(s[0].conv1.out_channels for s in model.stages) == groups
    assert isinstance(model.blocks()[0].shortcut, nn.Identity)  # k = 1: stem width = first group width


@pytest.mark.parametrize("arch, d", [("wrn16_4", 6), ("wrn28_10", 12), ("wrn1000_1", 498), ("resnet20", 9),
                                     ("resnet18", 8), ("resnet50", 16), ("cifar_resnet50", 24)])
def test_num_blocks_is_the_number_of_residual_blocks(arch, d):
    assert num_blocks(arch) == d
    assert len(create_model(arch, width=0.125).blocks()) == d


def test_blocks_in_depth_order():
    model = create_model("wrn22_2", width=0.25)
    names = {id(m): n for n, m in model.named_modules()}
    assert [names[id(b)] for b in model.blocks()] == [f"stages.{i}.{j}" for i in range(3) for j in range(3)]
    order = []
    for j, b in enumerate(model.blocks()):
        b.register_forward_pre_hook(lambda m, a, j=j: order.append(j))
    with torch.no_grad():
        model(torch.rand(2, 3, 16, 16))
    assert order == list(range(9))


def test_roles_conv_index_and_norms_of_a_wrn():
    model = create_model("wrn16_2", width=0.5, norm="bn")
    convs = [n for _, n, _ in conv_layers(model)]
    assert convs[:4] == ["stem.0", "stages.0.0.conv1", "stages.0.0.conv2", "stages.0.0.shortcut"]
    assert len(convs) == 1 + 2 * 6 + 3
    norms = [n for n, _ in norm_layers(model)]
    assert norms[:2] == ["stages.0.0.bn1", "stages.0.0.bn2"] and norms[-1] == "final.0" and len(norms) == 13
    roles = param_roles(model)
    assert sum(r == "scale" for _, r, _ in roles) == sum(r == "shift" for _, r, _ in roles) == 13


# ------------------------------------------------------------------------------------------------
# parts(x) -> (skip, branch)
# ------------------------------------------------------------------------------------------------

def _block_inputs(model, x):
    inputs = {}
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].detach().clone()))
             for i, b in enumerate(model.blocks())]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return [inputs[i] for i in range(len(model.blocks()))]


@pytest.mark.parametrize("arch, kw, kind", [
    ("resnet8", dict(norm="bn"), BasicBlock),
    ("resnet8", dict(norm="none", residual_gain=True, alpha0=0.3, shortcut="A"), BasicBlock),
    ("resnet50", dict(norm="bn", width=0.0625), Bottleneck),
    ("wrn16_2", dict(norm="bn"), PreActBlock),
    ("wrn16_1", dict(norm="bn", shortcut="A"), PreActBlock),
    ("wrn10_2", dict(norm="none", residual_gain=True, alpha0=0.5, conv_bias=True, dropout=0.3), PreActBlock),
])
def test_parts_sum_to_the_block_output(arch, kw, kind):
    torch.manual_seed(0)
    model = create_model(arch, **{"width": 0.25, **kw})
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        model(x)  # one train-mode pass: BN running statistics away from their initial values
    model.eval()
    blocks = model.blocks()
    assert all(isinstance(b, kind) for b in blocks)
    for b, xin in zip(blocks, _block_inputs(model, x)):
        with torch.no_grad():
            skip, branch = b.parts(xin)
            out = b(xin)
            assert torch.count_nonzero(branch) > 0
            if kind is PreActBlock:
                assert torch.equal(out, skip + branch)  # nothing after the sum
                h = torch.relu(b.bn1(xin))
                if isinstance(b.shortcut, nn.Identity):
                    assert torch.equal(skip, xin)
                else:  # the projection / padding sees the pre-activated input
                    assert torch.equal(skip, b.shortcut(h))
                    assert not torch.equal(skip, b.shortcut(xin))
            else:
                assert torch.equal(out, torch.relu(skip + branch))
                assert torch.equal(skip, b.shortcut(xin))
            assert torch.equal(branch, b.branch(xin))
            if "residual_gain" in kw:  # the branch carries α
                b.gain.alpha.mul_(2)
                torch.testing.assert_close(b.parts(xin)[1], 2 * branch)
                b.gain.alpha.div_(2)


# ------------------------------------------------------------------------------------------------
# residual gains
# ------------------------------------------------------------------------------------------------

def _branch_params(block):
    """Parameters only the residual branch uses (a pre-activation block's bn1 also feeds its
    projection shortcut, so it is left out; a post-activation shortcut's conv is not in the branch)."""
    names = ["conv1", "conv2", "conv3", "bn2", "bn3"] + (["bn1"] if not isinstance(block, PreActBlock) else [])
    return [p for n in names if hasattr(block, n) for p in getattr(block, n).parameters()]


@pytest.mark.parametrize("arch, norm", [("wrn16_2", "none"), ("wrn16_2", "bn"), ("resnet20", "none"),
                                        ("resnet20", "bn")])
def test_alpha_zero_output_does_not_depend_on_the_branches(arch, norm):
    torch.manual_seed(0)
    x = torch.rand(4, 3, 32, 32)
    outs = {}
    for alpha0 in (0.0, 0.25):
        model = create_model(arch, width=0.25, norm=norm, residual_gain=True, alpha0=alpha0)
        before = model(x).detach()
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for b in model.blocks():
                for p in _branch_params(b):
                    p.add_(torch.randn(p.shape, generator=g))
        outs[alpha0] = (before, model(x).detach())
    assert torch.equal(*outs[0.0])  # SkipInit at init: every block is its skip path
    assert not torch.allclose(*outs[0.25])  # control: a nonzero α lets the branches through


def test_fixed_alpha_gets_no_gradient_and_no_group():
    cfg = bnlib.validate(arch="wrn10_2", width=0.25, norm="none", residual_gain=True, alpha0=2 ** -0.5,
                         alpha_learnable=False)
    model = build_model(cfg)
    alphas = [p for _, p in model.residual_gains()]
    assert len(alphas) == 3 and all(a.item() == pytest.approx(2 ** -0.5) and not a.requires_grad for a in alphas)
    grouped = {id(p) for g in param_groups(model, cfg) for p in g["params"]}
    assert not grouped & {id(a) for a in alphas}
    assert "alpha" not in {g["name"] for g in param_groups(model, cfg)}
    opt = make_optimizer(param_groups(model, cfg), cfg)
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert all(a.grad is None and a.item() == pytest.approx(2 ** -0.5) for a in alphas)
    # control: a learnable α gets a gradient and its own group
    cfg = bnlib.validate(arch="wrn10_2", width=0.25, norm="none", residual_gain=True, alpha0=0.1)
    model = build_model(cfg)
    nn.functional.cross_entropy(model(x), y).backward()
    assert all(p.grad is not None and p.grad.abs() > 0 for _, p in model.residual_gains())
    groups = {g["name"]: g for g in param_groups(model, cfg)}
    assert {id(p) for p in groups["alpha"]["params"]} == {id(p) for _, p in model.residual_gains()}


# ------------------------------------------------------------------------------------------------
# regularized SkipInit's pieces, dropout
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["resnet8", "wrn10_2", "resnet50"])
def test_bias_and_dropout_only_when_asked(arch):
    model = create_model(arch, width=0.0625 if arch == "resnet50" else 0.25)
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    kw = dict(conv_bias=True, fc_dropout=0.2) | ({} if arch == "resnet50" else dict(dropout=0.3))
    model = create_model(arch, width=0.0625 if arch == "resnet50" else 0.25, norm="none", **kw)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(m.bias is not None and not m.bias.any() for m in convs)  # biases start at 0
    assert isinstance(model.fc_dropout, nn.Dropout) and model.fc_dropout.p == 0.2
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    if arch != "resnet50":
        assert all(isinstance(b.dropout, nn.Dropout) and b.dropout.p == 0.3 for b in model.blocks())
        assert len(drops) == len(model.blocks()) + 1
    # the conv biases are biases: the 'bias' group (bias_lr_mult, bias_wd), not decayed weights
    cfg = bnlib.validate(arch=arch, norm="none", conv_bias=True)
    model = build_model(cfg)
    groups = {g["name"]: {id(p) for p in g["params"]} for g in param_groups(model, cfg)}
    assert {id(m.bias) for m in model.modules() if isinstance(m, nn.Conv2d)} <= groups["bias"]


def test_conv_bias_and_dropout_do_not_change_the_net_at_init_in_eval():
    torch.manual_seed(0)
    a = create_model("wrn10_2", width=0.5, norm="none", residual_gain=True, alpha0=0.5)
    torch.manual_seed(0)
    b = create_model("wrn10_2", width=0.5, norm="none", residual_gain=True, alpha0=0.5, conv_bias=True,
                     dropout=0.3, fc_dropout=0.5)
    # the same weights (bias init draws random numbers, so the seeds alone do not give them)
    missing, unexpected = b.load_state_dict(a.state_dict(), strict=False)
    assert not unexpected and missing and all(k.endswith(".bias") for k in missing)
    a.eval(), b.eval()
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(a(x), b(x))
    b.train()  # dropout active in training
    assert not torch.equal(a(x), b(x))


def test_dropout_in_training_masks_between_the_convs():
    torch.manual_seed(0)
    model = create_model("wrn10_1", width=0.5, norm="none", dropout=0.5)
    seen = []
    blk = model.blocks()[0]
    blk.conv2.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    model(torch.rand(4, 3, 16, 16))
    zeros = (seen[0] == 0).float().mean().item()  # relu zeros (~half) plus the dropout zeros (half the rest)
    assert zeros > 0.6


# ------------------------------------------------------------------------------------------------
# depth 1000 and activation checkpointing
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [dict(norm="bn"), dict(norm="none", residual_gain=True, alpha0=0.0)])
def test_depth_1000_builds_and_takes_a_training_step(kw):
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = create_model("wrn1000_1", width=0.25, **kw)
    assert len(model.blocks()) == 498 and len(conv_layers(model)) == 1 + 996 + 2
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.rand(4, 3, 16, 16), torch.randint(0, 10, (4,))
    deepest = model.blocks()[-1]
    w_before = deepest.conv2.weight.detach().clone()
    for step in range(2):  # SkipInit (α = 0): the first step moves α only, the second the convs too
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        if step == 0 and kw.get("residual_gain"):
            assert torch.equal(w_before, deepest.conv2.weight) and deepest.gain.alpha.item() != 0
    assert not torch.equal(w_before, deepest.conv2.weight)  # the deepest block learned
    assert time.perf_counter() - t0 < 60  # ~2 s on one loaded CPU core


@pytest.mark.parametrize("arch, kw", [("wrn16_2", dict(norm="bn", dropout=0.3)),
                                      ("wrn10_2", dict(norm="none", residual_gain=True, alpha0=0.1, conv_bias=True)),
                                      ("resnet8", dict(norm="bn", residual_gain=True, alpha0=0.5))])
def test_checkpoint_blocks_gives_the_same_gradients_and_statistics(arch, kw):
    torch.manual_seed(0)
    ref = create_model(arch, width=0.25, **kw)
    ckp = copy.deepcopy(ref)
    ckp.checkpoint_blocks = True
    x, y = torch.rand(4, 3, 16, 16), torch.randint(0, 10, (4,))
    calls = {}
    for model in (ref, ckp):
        for b in model.blocks():
            b.register_forward_pre_hook(lambda *_, m=model: calls.__setitem__(id(m), calls.get(id(m), 0) + 1))
        torch.manual_seed(1)  # the same dropout masks in both, if the recomputation keeps them
        nn.functional.cross_entropy(model(x), y).backward()
    n = len(ref.blocks())
    assert calls == {id(ref): n, id(ckp): 2 * n}  # checkpointed: every block ran again in the backward
    for (n, p), q in zip(ref.named_parameters(), ckp.parameters()):
        assert p.grad is not None and torch.equal(p.grad, q.grad), n
    # BN's running statistics are updated once per forward, not again by the recomputation
    for (n, b), c in zip(ref.named_buffers(), ckp.buffers()):
        assert torch.equal(b, c), n
    with torch.no_grad():  # no recomputation without a backward: the plain path
        assert torch.equal(ref.eval()(x), ckp.eval()(x))


@pytest.mark.parametrize("norm", sorted(NORMS))
def test_every_norm_in_a_wrn_checkpointed_or_not(norm):
    # every registry norm builds into the pre-activation family, and checkpointing gives the
    # same gradients and buffers with each (some norms read their buffers in train mode)
    torch.manual_seed(0)
    ref = create_model("wrn10_2", width=0.5, norm=norm)
    ckp = copy.deepcopy(ref)
    ckp.checkpoint_blocks = True
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 10, (8,))
    for model in (ref, ckp):
        for _ in range(2):  # the second step sees buffers the first one changed
            torch.manual_seed(1)
            model.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
    grads = [(n, p.grad, q.grad) for (n, p), q in zip(ref.named_parameters(), ckp.parameters())]
    assert grads and all(g is not None and torch.isfinite(g).all() for _, g, _ in grads)
    for n, g, h in grads:
        assert torch.equal(g, h), n
    for (n, b), c in zip(ref.named_buffers(), ckp.buffers()):
        assert torch.equal(b, c), n


def test_a_checkpointed_run_records_what_a_plain_run_records(tmp_path):
    # same parameters but checkpoint_blocks: the same losses, metrics and probe values, bit for
    # bit (BN statistics, dropout masks and the RNG streams are not disturbed by recomputation)
    kw = {**TINY, "arch": "wrn10_1", "norm": "bn", "dropout": 0.2, "probes": ["layer_grads", "channel_moments"],
          "probe_batch_size": 16}
    a = bnlib.run({**kw, "out_dir": str(tmp_path / "a")})
    b = bnlib.run({**kw, "checkpoint_blocks": True, "out_dir": str(tmp_path / "b")})
    assert a["metrics"] == b["metrics"] and a["status"] == b["status"] == "completed"
    for table in ("steps", "probes"):
        ta, tb = (getattr(bnlib.load_runs(tmp_path / d), table) for d in "ab")
        cols = [c for c in ("step", "loss", "grad_norm", "probe", "quantity", "layer", "depth", "x", "value")
                if c in ta.columns]
        assert len(ta) > 0
        pd.testing.assert_frame_equal(ta[cols].reset_index(drop=True), tb[cols].reset_index(drop=True))


def test_new_parameters_reach_the_model_through_build_model():
    cfg = bnlib.validate(arch="wrn16_2", norm="none", residual_gain=True, dropout=0.2, fc_dropout=0.1,
                         conv_bias=True, checkpoint_blocks=True)
    model = build_model(cfg)
    assert model.checkpoint_blocks and model.fc_dropout.p == 0.1
    assert all(b.dropout.p == 0.2 and b.conv1.bias is not None for b in model.blocks())


def test_a_wrn_run_trains(tmp_path):
    res = bnlib.run({**TINY, "arch": "wrn10_1", "norm": "none", "residual_gain": True, "conv_bias": True,
                     "fc_dropout": 0.2, "checkpoint_blocks": True, "out_dir": str(tmp_path)})
    assert res["status"] == "completed"
    params = json.loads((res.run_dir / "config.json").read_text())["params"]  # recorded with the run
    assert params["arch"] == "wrn10_1" and params["checkpoint_blocks"] is True and params["fc_dropout"] == 0.2
    assert params["conv_bias"] is True and params["dropout"] == 0.0


# ------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("params, match", [
    (dict(arch="wrn17_4"), r"arch='wrn17_4'.*6n\+4"),
    (dict(arch="wrn4_1"), r"arch='wrn4_1'.*6n\+4"),
    (dict(arch="wrn16_0"), r"arch='wrn16_0'.*widen factor k=0 must be an integer >= 1"),
    (dict(arch="wrn16"), r"arch='wrn16'.*valid choices.*wrn\{6n\+4\}_\{k\}"),
    (dict(dropout=1.0), r"dropout=1.0: out of range; must be >= 0 and < 1"),
    (dict(dropout=-0.1), r"dropout=-0.1: out of range"),
    (dict(fc_dropout=1.5), r"fc_dropout=1.5: out of range; must be >= 0 and < 1"),
    (dict(arch="resnet50", dropout=0.3), r"dropout=0.3 with arch='resnet50'.*valid here: 0"),
    (dict(arch="wrn16_4", zero_init_last_gamma=True), r"zero_init_last_gamma=True with arch='wrn16_4'.*\[False\]"),
    (dict(conv_bias=1), r"conv_bias=1 \(int\): must be true/false"),
])
def test_bad_values_are_rejected_naming_the_parameter(params, match):
    with pytest.raises(ConfigError, match=match):
        bnlib.validate(**params)


def test_good_wrn_values_validate():
    cfg = bnlib.validate(arch="wrn40_1", width=0.25, dropout=0.0, fc_dropout=0.5, shortcut="A")
    assert cfg["arch"] == "wrn40_1" and cfg["checkpoint_blocks"] is False and cfg["conv_bias"] is False
    assert bnlib.validate(arch="wrn28_10", dropout=0.3)["dropout"] == 0.3
