"""bnlib.norms: every registry entry against its PyTorch / closed-form reference."""
import copy

import pytest
import torch
from torch import nn

from bnlib.models import create_model
from bnlib.norms import NORMS, Affine2d, get_norm, norm_names

GAMMA_NORMS = [n for n, s in NORMS.items() if s.has_gamma]


def _batches(n=4, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    # shifted and scaled so that the batch statistics are far from (0, 1)
    return [torch.randn(n, c, 5, 6, generator=g) * (1.0 + i) + (2.0 - i) for i in range(3)]


def _assert_bn_matches(ours, ref, xs):
    """Train-mode forwards (outputs + running stats), then eval-mode forwards."""
    ours.train(), ref.train()
    for x in xs:
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-5, atol=1e-6)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == len(xs)
    ours.eval(), ref.eval()
    for x in xs:
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gamma0, eps, momentum", [(1.0, 1e-5, 0.1), (0.1, 1e-3, 0.3)])
def test_bn_matches_batchnorm2d(gamma0, eps, momentum):
    ours = get_norm("bn", gamma0=gamma0, eps=eps, momentum=momentum)(3)
    ref = nn.BatchNorm2d(3, eps=eps, momentum=momentum)
    with torch.no_grad():
        ref.weight.fill_(gamma0)
    assert isinstance(ours, nn.BatchNorm2d)
    assert ours.eps == eps and ours.momentum == momentum
    _assert_bn_matches(ours, ref, _batches())


def test_bn_train_mode_closed_form():
    # independent of nn.BatchNorm2d: y = γ (x - μ_B) / sqrt(σ²_B + ε) + β, r <- 0.9 r + 0.1 stat
    ours = get_norm("bn", gamma0=0.5)(3)
    x = _batches()[0]
    mu = x.mean(dim=(0, 2, 3), keepdim=True)
    var_b = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    torch.testing.assert_close(ours.train()(x), 0.5 * (x - mu) / torch.sqrt(var_b + 1e-5), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.running_mean, 0.1 * mu.flatten())
    torch.testing.assert_close(ours.running_var, 0.9 + 0.1 * x.var(dim=(0, 2, 3), unbiased=True))


def test_bn_minus_matches_batchnorm2d_without_affine():
    ours = get_norm("bn_minus", gamma0=0.3)(3)  # gamma0 must be ignored
    ref = nn.BatchNorm2d(3, affine=False)
    assert list(ours.parameters()) == []
    assert ours.weight is None and ours.bias is None
    _assert_bn_matches(ours, ref, _batches(seed=1))


def test_affine_is_gamma_x_plus_beta():
    layer = get_norm("affine")(4)
    assert isinstance(layer, Affine2d)
    assert list(layer.buffers()) == []  # no statistics of any kind
    assert {n for n, _ in layer.named_parameters()} == {"weight", "bias"}
    g = torch.Generator().manual_seed(3)
    gamma, beta = torch.randn(4, generator=g), torch.randn(4, generator=g)
    with torch.no_grad():
        layer.weight.copy_(gamma)
        layer.bias.copy_(beta)
    x = torch.randn(5, 4, 3, 7, generator=g) * 3 + 1
    expected = torch.stack([gamma[c] * x[:, c] + beta[c] for c in range(4)], dim=1)
    y_train = layer.train()(x)
    torch.testing.assert_close(y_train, expected)
    y_eval = layer.eval()(x)
    assert torch.equal(y_train, y_eval)
    # no batch statistics: an image's output does not depend on the rest of the batch
    assert torch.equal(layer.train()(x[:1]), y_train[:1])
    assert list(layer.buffers()) == []  # still nothing accumulated after forwards


def test_affine_at_init_is_identity():
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(get_norm("affine")(3)(x), x)


def test_none_is_identity():
    layer = get_norm("none", gamma0=0.1)(3)
    assert list(layer.parameters()) == [] and list(layer.buffers()) == []
    x = torch.randn(4, 3, 5, 5)
    for mode in (True, False):
        layer.train(mode)
        assert torch.equal(layer(x), x)


@pytest.mark.parametrize("name", sorted(NORMS))
def test_spec_flags_match_built_layer(name):
    spec = NORMS[name]
    assert spec.name == name and spec.doc
    layer = get_norm(name)(3)
    params = dict(layer.named_parameters())
    assert ("weight" in params) == spec.has_gamma
    assert ("bias" in params) == spec.has_beta
    x = torch.randn(6, 3, 4, 4) * 2 + 1
    # a fresh copy per forward (a layer with memory, like ics_free's previous-batch statistics,
    # must not carry the first batch into the second) and the same RNG state (noisy_bn's noise)
    first, second = copy.deepcopy(layer).train(), copy.deepcopy(layer).train()
    torch.manual_seed(0)
    y_full = first(x)[:2]
    torch.manual_seed(0)
    depends_on_batch = not torch.allclose(y_full, second(x[:2]))
    assert depends_on_batch == spec.batch_stats


@pytest.mark.parametrize("name", GAMMA_NORMS)
@pytest.mark.parametrize("gamma0", [0.1, 0.0, 2.5])
def test_gamma0_survives_construction(name, gamma0):
    layer = get_norm(name, gamma0=gamma0)(7)
    assert torch.equal(layer.weight.detach(), torch.full((7,), gamma0))
    assert torch.equal(layer.bias.detach(), torch.zeros(7))


@pytest.mark.parametrize("name", GAMMA_NORMS)
@pytest.mark.parametrize("arch, width", [("resnet8", 0.25), ("resnet18", 0.125), ("resnet50", 0.0625)])
def test_gamma0_survives_create_model(name, arch, width):
    gamma0 = 0.1
    model = create_model(arch, width=width, norm=name, gamma0=gamma0)
    layers = model.norm_layers()
    n_blocks = len(model.blocks())
    assert len(layers) >= 1 + 2 * n_blocks  # stem + at least two per block
    for lname, m in layers:
        assert lname != "input_norm"
        assert torch.equal(m.weight.detach(), torch.full_like(m.weight, gamma0)), lname


@pytest.mark.parametrize("name", GAMMA_NORMS)
def test_gamma0_with_input_bn(name):
    gamma0 = 0.1
    model = create_model("resnet8", width=0.25, norm=name, gamma0=gamma0, input_norm="bn")
    layers = model.norm_layers()
    assert layers[0][0] == "input_norm"  # the P2 input BN comes first, with its own γ
    for lname, m in layers[1:]:
        assert torch.equal(m.weight.detach(), torch.full_like(m.weight, gamma0)), lname


@pytest.mark.parametrize("bad", ["batchnorm", "BN", "", "layernorm"])
def test_unknown_norm_raises_listing_valid_names(bad):
    with pytest.raises(ValueError) as ei:
        get_norm(bad)
    msg = str(ei.value)
    assert repr(bad) in msg
    for valid in norm_names():
        assert repr(valid) in msg
    with pytest.raises(ValueError, match="valid choices"):
        create_model("resnet8", width=0.25, norm=bad)


def test_norm_names_is_the_registry():
    assert norm_names() == sorted(NORMS)
    assert {"bn", "bn_minus", "affine", "none"} <= set(NORMS)
