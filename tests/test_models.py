"""bnlib.models: the ResNet factory against torchvision and against its documented options."""
import math

import pytest
import torch
import torchvision
from torch import nn

from bnlib.models import BasicBlock, Bottleneck, ResNet, create_model, parse_arch
from bnlib.norms import NORMS

GAMMA_NORMS = [n for n, s in NORMS.items() if s.has_gamma]
NO_GAMMA_NORMS = [n for n, s in NORMS.items() if not s.has_gamma]
TINY = [("resnet8", 0.25), ("resnet18", 0.125)]


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
def test_param_count_matches_torchvision(depth):
    # on the meta device: same parameter shapes, no time spent initializing 45M weights
    with torch.device("meta"):
        ours = create_model(f"resnet{depth}", num_classes=1000, stem="imagenet", norm="bn", width=1.0)
        ref = getattr(torchvision.models, f"resnet{depth}")()
    assert _n_params(ours) == _n_params(ref)
    # and the same multiset of parameter shapes (not just an equal total)
    shapes = lambda m: sorted(tuple(p.shape) for p in m.parameters())  # noqa: E731
    assert shapes(ours) == shapes(ref)


@pytest.mark.parametrize("norm", sorted(NORMS))
@pytest.mark.parametrize("arch, width", TINY)
def test_forward_backward_every_norm(norm, arch, width):
    torch.manual_seed(0)
    model = create_model(arch, width=width, norm=norm, stem="cifar")
    x = torch.rand(4, 3, 32, 32)
    y = torch.randint(0, 10, (4,))
    out = model(x)
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    nn.functional.cross_entropy(out, y).backward()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert params
    for n, p in params:
        assert p.grad is not None, n
        assert torch.isfinite(p.grad).all(), n
    assert any(p.grad.abs().sum() > 0 for _, p in params)


def test_forward_with_skipinit_and_input_bn_backward():
    model = create_model("resnet8", width=0.25, norm="none", residual_gain=True, input_norm="bn")
    model(torch.rand(4, 3, 32, 32)).sum().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert model.input_norm.bias.grad is None  # frozen β


@pytest.mark.parametrize("arch, n", [("resnet8", 1), ("resnet20", 3), ("resnet32", 5), ("resnet56", 9),
                                     ("resnet110", 18), ("cifar_resnet50", 8), ("cifar_resnet20", 3)])
def test_cifar_family_parse(arch, n):
    block, layers, widths = parse_arch(arch)
    assert (block, layers, widths) == ("basic", (n, n, n), (16, 32, 64))


def test_cifar_family_model_structure():
    model = create_model("resnet20", width=1.0)
    assert len(model.stages) == 3
    assert [len(s) for s in model.stages] == [3, 3, 3]
    assert all(isinstance(b, BasicBlock) for b in model.blocks())
    # 6n+2 weighted layers: stem conv + 2 per block + fc (projection shortcuts not counted)
    convs = [m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and "shortcut" not in n]
    assert len(convs) + 1 == 20
    assert [b.conv2.out_channels for b in model.blocks()][::3] == [16, 32, 64]


@pytest.mark.parametrize("depth, layers", [(18, (2, 2, 2, 2)), (34, (3, 4, 6, 3)), (50, (3, 4, 6, 3)),
                                           (101, (3, 4, 23, 3)), (152, (3, 8, 36, 3))])
def test_imagenet_family_parse(depth, layers):
    block, got_layers, widths = parse_arch(f"resnet{depth}")
    assert got_layers == layers and widths == (64, 128, 256, 512)
    assert block == ("basic" if depth < 50 else "bottleneck")


def test_resnet50_is_bottleneck_but_cifar_resnet50_is_not():
    assert parse_arch("resnet50")[0] == "bottleneck"
    assert parse_arch("cifar_resnet50")[:2] == ("basic", (8, 8, 8))
    m = create_model("resnet50", width=0.0625)
    assert all(isinstance(b, Bottleneck) for b in m.blocks())
    m = create_model("cifar_resnet50", width=0.25)
    assert len(m.blocks()) == 24 and all(isinstance(b, BasicBlock) for b in m.blocks())


@pytest.mark.parametrize("arch", ["resnet21", "resnet2", "resnet9", "cifar_resnet18", "resnet0"])
def test_bad_depth_raises_naming_6n_plus_2(arch):
    with pytest.raises(ValueError, match=r"6n\+2") as ei:
        parse_arch(arch)
    assert repr(arch) in str(ei.value)
    with pytest.raises(ValueError, match=r"6n\+2"):
        create_model(arch)


@pytest.mark.parametrize("arch", ["vgg11", "resnet", "ResNet18", "resnet18x", ""])
def test_unknown_arch_raises(arch):
    with pytest.raises(ValueError, match="valid choices"):
        parse_arch(arch)


def _block_inputs(model, x):
    """Each block's real input during a forward pass, captured with forward pre-hooks."""
    inputs = {}
    hooks = [b.register_forward_pre_hook(lambda mod, args, i=i: inputs.__setitem__(i, args[0].detach().clone()))
             for i, b in enumerate(model.blocks())]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    assert sorted(inputs) == list(range(len(model.blocks())))
    return [inputs[i] for i in range(len(inputs))]


def test_skipinit_alpha0_zero_blocks_are_relu_shortcut():
    torch.manual_seed(0)
    model = create_model("resnet20", width=0.25, norm="none", residual_gain=True, alpha0=0.0)
    blocks = model.blocks()
    assert len(blocks) == 9
    real_inputs = _block_inputs(model, torch.rand(2, 3, 32, 32))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for b, xin in zip(blocks, real_inputs):
            for x in (xin, torch.randn(xin.shape, generator=g)):
                assert torch.equal(b(x), torch.relu(b.shortcut(x)))
                assert torch.count_nonzero(b.branch(x)) == 0


def test_skipinit_alpha0_one_is_not_identity_branch():
    torch.manual_seed(0)
    model = create_model("resnet20", width=0.25, norm="none", residual_gain=True, alpha0=1.0)
    real_inputs = _block_inputs(model, torch.rand(2, 3, 32, 32))
    with torch.no_grad():
        for b, x in zip(model.blocks(), real_inputs):
            assert torch.count_nonzero(b.branch(x)) > 0
            assert not torch.equal(b(x), torch.relu(b.shortcut(x)))
            torch.testing.assert_close(b(x), torch.relu(b.shortcut(x) + b.branch(x)))


@pytest.mark.parametrize("learnable", [True, False])
def test_residual_gains_one_per_block_in_depth_order(learnable):
    model = create_model("resnet20", width=0.25, norm="bn", residual_gain=True, alpha0=0.5,
                         alpha_learnable=learnable)
    gains = model.residual_gains()
    blocks = model.blocks()
    assert len(gains) == len(blocks) == 9
    assert [n for n, _ in gains] == [f"stages.{i}.{j}.gain.alpha" for i in range(3) for j in range(3)]
    for (_, a), b in zip(gains, blocks):
        assert a is b.gain.alpha
        assert a.shape == () and a.item() == 0.5 and a.requires_grad == learnable
    assert create_model("resnet20", width=0.25).residual_gains() == []


@pytest.mark.parametrize("norm", GAMMA_NORMS)
@pytest.mark.parametrize("arch, width", TINY + [("resnet50", 0.0625)])
def test_zero_init_last_gamma(norm, arch, width):
    model = create_model(arch, width=width, norm=norm, gamma0=0.7, zero_init_last_gamma=True)
    last = {id(b.last_norm) for b in model.blocks()}
    for b in model.blocks():
        assert b.last_norm is (b.bn3 if isinstance(b, Bottleneck) else b.bn2)
        assert torch.count_nonzero(b.last_norm.weight) == 0
    # every other norm keeps γ0
    others = [(n, m) for n, m in model.norm_layers() if id(m) not in last]
    assert others
    for n, m in others:
        assert torch.equal(m.weight.detach(), torch.full_like(m.weight, 0.7)), n
    # with the last γ at 0 (and β at 0) each branch outputs zero: blocks are relu(shortcut)
    model.eval()
    real_inputs = _block_inputs(model, torch.rand(2, 3, 32, 32))
    with torch.no_grad():
        for b, x in zip(model.blocks(), real_inputs):
            assert torch.count_nonzero(b.branch(x)) == 0


@pytest.mark.parametrize("norm", NO_GAMMA_NORMS)
def test_zero_init_last_gamma_needs_gamma(norm):
    with pytest.raises(ValueError, match="zero_init_last_gamma") as ei:
        create_model("resnet8", width=0.25, norm=norm, zero_init_last_gamma=True)
    assert repr(norm) in str(ei.value)


def test_norm_layers_depth_order_resnet8():
    model = create_model("resnet8", width=0.25, norm="bn")
    names = [n for n, _ in model.norm_layers()]
    assert names == ["stem.1",
                     "stages.0.0.bn1", "stages.0.0.bn2",
                     "stages.1.0.bn1", "stages.1.0.bn2", "stages.1.0.shortcut.1",
                     "stages.2.0.bn1", "stages.2.0.bn2", "stages.2.0.shortcut.1"]


@pytest.mark.parametrize("norm", ["bn", "bn_minus", "affine"])
def test_norm_layers_depth_order_resnet18(norm):
    model = create_model("resnet18", width=0.125, norm=norm)
    layers = model.norm_layers()
    names = [n for n, _ in layers]
    assert names[0] == "stem.1"
    # all of the model's norm modules, each once
    kind = type(NORMS[norm].build(4))
    assert len(layers) == sum(isinstance(m, kind) for m in model.modules()) == 1 + 8 * 2 + 3
    # (stage, block) never decreases along the list
    keys = [tuple(int(t) for t in n.split(".")[1:3]) for n in names[1:]]
    assert keys == sorted(keys)
    # actual forward order agrees: hooks fire in list order
    order = []
    for n, m in layers:
        m.register_forward_hook(lambda mod, a, out, n=n: order.append(n))
    with torch.no_grad():
        model(torch.rand(2, 3, 32, 32))
    # within a block the shortcut norm may run after bn2; compare per (stage, block) groups
    group = lambda n: n.split(".")[:3] if n.startswith("stages") else ["stem"]  # noqa: E731
    assert [group(n) for n in order] == [group(n) for n in names]


def test_norm_layers_none_is_empty_and_input_bn_listed():
    assert create_model("resnet8", width=0.25, norm="none").norm_layers() == []
    layers = create_model("resnet8", width=0.25, norm="none", input_norm="bn").norm_layers()
    assert [n for n, _ in layers] == ["input_norm"]


@pytest.mark.parametrize("arch, width, expected", [("resnet18", 0.25, (16, 32, 64, 128)),
                                                   ("resnet18", 0.5, (32, 64, 128, 256)),
                                                   ("resnet20", 0.5, (8, 16, 32)),
                                                   ("resnet50", 0.125, (8, 16, 32, 64))])
def test_width_multiplier_scales_channels(arch, width, expected):
    model = create_model(arch, width=width)
    assert model.stem[0].out_channels == expected[0]
    expansion = type(model.blocks()[0]).expansion
    assert [s[-1].conv1.out_channels for s in model.stages] == list(expected)
    assert model.fc.in_features == expected[-1] * expansion


def test_width_never_rounds_to_zero_channels():
    model = create_model("resnet8", width=0.01)
    assert model.stem[0].out_channels == 1
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("conv_init, fan", [("kaiming_fan_in", "in"), ("kaiming_fan_out", "out")])
def test_conv_init_std(conv_init, fan):
    torch.manual_seed(0)
    model = create_model("resnet8", width=4.0, conv_init=conv_init)  # widths 64, 128, 256
    w = model.stages[2][0].conv1.weight  # 128 -> 256, 3x3: fan_in 1152 != fan_out 2304
    assert w.shape == (256, 128, 3, 3)
    fan_n = 128 * 9 if fan == "in" else 256 * 9
    expected = math.sqrt(2.0 / fan_n)
    assert abs(w.std().item() - expected) / expected < 0.1
    assert abs(w.mean().item()) < 0.1 * expected


def test_conv_init_torch_default_differs():
    torch.manual_seed(0)
    model = create_model("resnet8", width=4.0, conv_init="torch_default")
    w = model.stages[2][0].conv1.weight
    # torch default: kaiming_uniform(a=sqrt(5)) -> U(-1/sqrt(fan_in), 1/sqrt(fan_in)), std 1/sqrt(3 fan_in)
    expected = 1 / math.sqrt(3 * 128 * 9)
    assert abs(w.std().item() - expected) / expected < 0.1


@pytest.mark.parametrize("gamma0", [1.0, 0.1])
def test_input_bn(gamma0):
    model = create_model("resnet8", width=0.25, input_norm="bn", gamma0=gamma0)
    bn = model.input_norm
    assert type(bn) is nn.BatchNorm2d and bn.num_features == 3
    expected = gamma0 * math.sqrt(0.5 - 1 / (2 * math.pi))
    torch.testing.assert_close(bn.weight.detach(), torch.full((3,), expected))
    assert abs(math.sqrt(0.5 - 1 / (2 * math.pi)) - 0.5838) < 1e-3
    assert bn.weight.requires_grad and not bn.bias.requires_grad
    assert torch.equal(bn.bias.detach(), torch.zeros(3))


def test_input_norm_dataset_and_raw():
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    m = create_model("resnet8", width=0.25, input_norm="dataset", input_mean=mean, input_std=std)
    x = torch.rand(2, 3, 4, 4)
    ref = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(m.input_norm(x), ref)
    assert list(m.input_norm.parameters()) == []
    raw = create_model("resnet8", width=0.25, input_norm="raw")
    assert torch.equal(raw.input_norm(x), x)
    with pytest.raises(ValueError, match="input_norm"):
        create_model("resnet8", width=0.25, input_norm="whiten")


@pytest.mark.parametrize("stem, hw", [("cifar", 32), ("imagenet", 8)])
def test_stem_output_resolution(stem, hw):
    m = create_model("resnet8", width=0.25, stem=stem)
    with torch.no_grad():
        s = m.stem(torch.rand(1, 3, 32, 32))
    assert s.shape[-2:] == (hw, hw)
    with pytest.raises(ValueError, match="stem"):
        create_model("resnet8", width=0.25, stem="tiny")


@pytest.mark.parametrize("norm", ["bn", "bn_minus"])
def test_bn_eps_momentum_reach_every_norm(norm):
    m = create_model("resnet8", width=0.25, norm=norm, bn_eps=1e-3, bn_momentum=0.01)
    layers = m.norm_layers()
    assert layers and all(l.eps == 1e-3 and l.momentum == 0.01 for _, l in layers)


def test_create_model_returns_resnet_with_num_classes():
    m = create_model("resnet8", width=0.25, num_classes=7)
    assert isinstance(m, ResNet) and m.fc.out_features == 7
