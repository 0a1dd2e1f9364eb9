"""Parameter roles from the registries (groups, tracking), CIFAR option-A shortcuts, the conv index."""
import pytest
import torch
from torch import nn

import bnlib
from bnlib.config import ConfigError
from bnlib.models import PadShortcut, conv_layers, create_model, middle_conv, norm_layers, param_roles
from bnlib.norms import NORMS, register_norm
from bnlib.train import NormTracker, build_model, param_groups


@pytest.mark.parametrize("arch, n_params", [("resnet20", 269_722), ("resnet56", 853_018), ("resnet110", 1_727_962)])
def test_option_a_cifar_resnets_have_the_published_sizes(arch, n_params):
    # He et al. 2016, Table 6: 0.27M, 0.85M, 1.7M parameters
    with torch.device("meta"):
        model = create_model(arch, width=1.0, norm="bn", shortcut="A")
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert all(not list(b.shortcut.parameters()) for b in model.blocks())


def test_option_a_is_strided_identity_with_zero_padded_channels():
    sc = PadShortcut(16, 32, 2)
    x = torch.randn(2, 16, 8, 8)
    out = sc(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert not out[:, :8].any() and not out[:, 24:].any()
    model = create_model("resnet20", width=0.5, shortcut="A")
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_conv_index_is_stem_then_branch_convs_then_shortcut():
    names = [n for _, n, _ in conv_layers(create_model("resnet20", width=0.25, shortcut="B"))]
    assert names[0] == "stem.0"
    i = names.index("stages.1.0.conv1")
    assert names[i:i + 4] == ["stages.1.0.conv1", "stages.1.0.conv2", "stages.1.0.shortcut.0", "stages.1.1.conv1"]
    a = conv_layers(create_model("resnet110", width=0.25, shortcut="A"))
    assert [i for i, _, _ in a] == list(range(109))  # stem + 2 × 54 branch convs, no projection
    assert middle_conv(create_model("resnet110", width=0.25, shortcut="A"))[:2] == (54, "stages.1.8.conv2")


def test_shortcut_parameter_is_validated():
    assert bnlib.validate(arch="resnet20", shortcut="A")["shortcut"] == "A"
    with pytest.raises(ConfigError, match=r"shortcut='A' with arch='resnet50'.*valid choices here: \['B'\]"):
        bnlib.validate(arch="resnet50", shortcut="A")
    with pytest.raises(ConfigError, match=r"shortcut='C'.*valid choices: \['A', 'B'\]"):
        bnlib.validate(shortcut="C")


def test_alpha_has_its_own_group():
    cfg = bnlib.validate(arch="resnet8", norm="bn", residual_gain=True, gamma_lr_mult=0.5, alpha_lr_mult=0.01,
                         alpha_wd=1e-3)
    model = build_model(cfg)
    groups = {g["name"]: g for g in param_groups(model, cfg)}
    alphas = {id(p) for _, p in model.residual_gains()}
    assert {id(p) for p in groups["alpha"]["params"]} == alphas and len(alphas) == 3
    assert groups["alpha"]["lr"] == pytest.approx(0.1 * 0.01) and groups["alpha"]["weight_decay"] == 1e-3
    assert groups["scale"]["lr"] == pytest.approx(0.1 * 0.5)
    assert not alphas & {id(p) for p in groups["scale"]["params"]}


def test_input_bn_gamma_is_a_scale():
    cfg = bnlib.validate(arch="resnet8", norm="none", input_norm="bn")
    model = build_model(cfg)
    groups = {g["name"]: g for g in param_groups(model, cfg)}
    assert [id(p) for p in groups["scale"]["params"]] == [id(model.input_norm.weight)]
    assert [n for n, _ in norm_layers(model)] == ["input_norm"]


class _GN(nn.GroupNorm):
    pass


class _Scaled(nn.Module):
    """A made-up norm whose parameters are not called weight/bias."""

    def __init__(self, c):
        super().__init__()
        self.g, self.b = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))

    def forward(self, x):
        return x * self.g.view(1, -1, 1, 1) + self.b.view(1, -1, 1, 1)


@pytest.fixture
def extra_norms():
    register_norm("gn_test", has_gamma=True, has_beta=True, batch_stats=False, doc="GroupNorm, test only")(
        lambda c, gamma0=1.0, eps=1e-5, momentum=0.1: _GN(min(4, c), c, eps=eps))
    register_norm("scaled_test", has_gamma=True, has_beta=True, batch_stats=False, doc="renamed γ/β, test only",
                  param_roles={"g": "scale", "b": "shift"})(lambda c, gamma0=1.0, eps=1e-5, momentum=0.1: _Scaled(c))
    yield
    del NORMS["gn_test"], NORMS["scaled_test"]


@pytest.mark.parametrize("norm, gamma, beta", [("gn_test", "weight", "bias"), ("scaled_test", "g", "b")])
def test_a_new_norm_is_grouped_and_tracked_with_no_other_edit(extra_norms, norm, gamma, beta):
    cfg = bnlib.validate(arch="resnet8", width=0.25, norm=norm, gamma_lr_mult=0.5, bias_lr_mult=0.25)
    model = build_model(cfg)
    layers = norm_layers(model)
    assert len(layers) == 9  # stem + 2 per block × 3 blocks + 2 projection shortcuts
    groups = {g["name"]: g for g in param_groups(model, cfg)}
    assert {id(p) for p in groups["scale"]["params"]} == {id(getattr(m, gamma)) for _, m in layers}
    assert {id(getattr(m, beta)) for _, m in layers} <= {id(p) for p in groups["bias"]["params"]}
    assert groups["scale"]["lr"] == pytest.approx(0.05) and groups["bias"]["lr"] == pytest.approx(0.025)
    rows = NormTracker(model).snapshot(0)
    assert sorted({r["param"] for r in rows}) == ["beta", "gamma"] and len(rows) == 18
    assert {r["param"]: r["mean"] for r in rows if r["layer"] == layers[0][0]} == {"gamma": 1.0, "beta": 0.0}
    roles = {r for _, r, _ in param_roles(model)}
    assert roles == {"scale", "shift"}


def test_bad_role_in_a_registry_entry_is_refused():
    with pytest.raises(ValueError, match="valid roles"):
        register_norm("bad_test", has_gamma=True, has_beta=False, batch_stats=False, doc="x",
                      param_roles={"weight": "gamma"})(lambda c, **kw: nn.Identity())
    assert "bad_test" not in NORMS
