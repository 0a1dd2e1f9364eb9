"""ResNet factory with the normalization injected by registry name.

Architectures are data (torchvision's stage tables, He et al. 2016); the norm is a callable
`norm_layer(num_features)` from `bnlib.norms`, as in torchvision's resnet.py. Every choice that
confounds BN studies is an explicit argument, recorded in each run's config:

- `zero_init_last_gamma`: γ of the last norm in each residual branch starts at 0 (Goyal et al.
  2017). Off by default: it makes BN arms and no-γ arms different networks at init.
- `residual_gain`: P5 SkipInit (De & Smith 2020): one learnable scalar α at the end of each
  residual branch, x_{l+1} = relu(shortcut(x_l) + α·f(x_l)), α initialized to `alpha0` (0).
- `conv_init`: "kaiming_fan_in" (Kaiming normal, fan-in, ReLU gain, as in P2's code) by default.
- `input_norm`: how pixels in [0, 1] are normalized before conv1: "dataset" (true dataset
  mean/std), "raw" (none), "bn" (P2's online BN input normalization).
"""
from __future__ import annotations

import math
import re

import torch
from torch import nn

from .norms import NORMS, get_norm, tag_norm

__all__ = ["ResNet", "create_model", "arch_names", "parse_arch", "CONV_INITS", "INPUT_NORMS", "SHORTCUTS",
           "conv_layers", "middle_conv", "norm_layers", "param_roles"]

# torchvision's stage tables: name -> (block, blocks per stage)
IMAGENET_FAMILY = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
IMAGENET_WIDTHS = (64, 128, 256, 512)
CIFAR_WIDTHS = (16, 32, 64)  # He et al. 2016, Sec. 4.2: 6n+2 layers, 3 stages of n basic blocks


def parse_arch(arch: str) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
    """'resnet18' -> ('basic', (2,2,2,2), (64,128,256,512)); 'resnet56' -> CIFAR family.

    `resnet{d}` is torchvision's net for d in {18, 34, 50, 101, 152}; any other d = 6n+2 is the
    CIFAR family. `cifar_resnet{d}` always names the CIFAR family (e.g. cifar_resnet50).
    """
    m = re.fullmatch(r"(cifar_)?resnet(\d+)", arch or "")
    if m is None:
        raise ValueError(f"arch={arch!r} is not a known architecture; valid choices: {arch_names()}")
    cifar, depth = bool(m.group(1)), int(m.group(2))
    if not cifar and depth in IMAGENET_FAMILY:
        block, layers = IMAGENET_FAMILY[depth]
        return block, layers, IMAGENET_WIDTHS
    if depth >= 8 and (depth - 2) % 6 == 0:
        n = (depth - 2) // 6
        return "basic", (n, n, n), CIFAR_WIDTHS
    raise ValueError(f"arch={arch!r}: depth {depth} is neither one of torchvision's "
                     f"{sorted(IMAGENET_FAMILY)} nor of the CIFAR form 6n+2 with n >= 1 "
                     f"(20, 32, 44, 56, 110, ...); valid choices: {arch_names()}")


def arch_names() -> list[str]:
    return [f"resnet{d}" for d in IMAGENET_FAMILY] + ["resnet{6n+2} (e.g. resnet20, resnet56, resnet110)",
                                                     "cifar_resnet{6n+2}"]


class ResidualGain(nn.Module):
    """SkipInit's α (P5): a scalar multiplying the residual branch; learnable unless fixed."""

    def __init__(self, alpha0: float, learnable: bool = True):
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(float(alpha0)), requires_grad=learnable)
        self._bnlib_roles = {"alpha": "alpha"}  # its own optimizer group (alpha_lr_mult, alpha_wd)

    def forward(self, x):
        return x * self.alpha


SHORTCUTS = ("A", "B")


class PadShortcut(nn.Module):
    """He et al. 2016's option A (Sec. 4.2, CIFAR): identity subsampled with the stride, the
    extra channels zero-padded (half before, half after); no parameters, so the CIFAR ResNets
    have their published sizes (ResNet-20: 0.27M, ResNet-110: 1.7M)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        if cout < cin:
            raise ValueError(f"option-A shortcut cannot shrink channels ({cin} -> {cout}); use shortcut='B'")
        self.cin, self.cout, self.stride = cin, cout, stride

    def forward(self, x):
        x = x[:, :, ::self.stride, ::self.stride] if self.stride > 1 else x
        pad = self.cout - self.cin
        return nn.functional.pad(x, (0, 0, 0, 0, pad // 2, pad - pad // 2)) if pad else x

    def extra_repr(self) -> str:
        return f"{self.cin}->{self.cout}, stride={self.stride}"


def _shortcut(cin: int, cout: int, stride: int, norm_layer, kind: str = "B") -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    if kind == "A":
        return PadShortcut(cin, cout, stride)
    # projection shortcut (option B of He et al.), normalized like torchvision's downsample
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm_layer(cout))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride, norm_layer, gain: nn.Module | None, shortcut: str = "B"):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = norm_layer(planes)
        self.conv2 = nn.Conv2d(planes, cout, 3, 1, 1, bias=False)
        self.bn2 = norm_layer(cout)
        self.gain = gain if gain is not None else nn.Identity()
        self.shortcut = _shortcut(cin, cout, stride, norm_layer, shortcut)
        self.last_norm = self.bn2

    def branch(self, x):
        return self.gain(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))

    def forward(self, x):
        return torch.relu(self.shortcut(x) + self.branch(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride, norm_layer, gain: nn.Module | None, shortcut: str = "B"):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = norm_layer(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # stride on 3x3 (v1.5)
        self.bn2 = norm_layer(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = norm_layer(cout)
        self.gain = gain if gain is not None else nn.Identity()
        self.shortcut = _shortcut(cin, cout, stride, norm_layer, shortcut)
        self.last_norm = self.bn3

    def branch(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.gain(self.bn3(self.conv3(x)))

    def forward(self, x):
        return torch.relu(self.shortcut(x) + self.branch(x))


class InputNorm(nn.Module):
    """Fixed per-channel (x - mean)/std on pixels in [0, 1]; mean=0, std=1 leaves them raw."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("inv_std", 1.0 / torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) * self.inv_std


def _input_bn(gamma0: float, channels: int = 3) -> nn.Module:
    # P2 Sec. 3.3: a BN over the image channels fed raw [0,1] pixels; γ starts at γ0·0.58
    # (≈ √(1/2 − 1/(2π)), the std of ReLU of a unit Gaussian) and stays learnable; β is frozen at 0.
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.weight.fill_(gamma0 * math.sqrt(0.5 - 1 / (2 * math.pi)))
    bn.bias.requires_grad_(False)
    return tag_norm(bn, NORMS["bn"])  # a BN: its γ is grouped and tracked as a scale


INPUT_NORMS = ("dataset", "raw", "bn")
CONV_INITS = ("kaiming_fan_in", "kaiming_fan_out", "torch_default")


class ResNet(nn.Module):
    def __init__(self, block: str, layers, widths, *, num_classes=10, norm="bn", gamma0=1.0,
                 width=1.0, stem="cifar", zero_init_last_gamma=False, residual_gain=False,
                 alpha0=0.0, alpha_learnable=True, conv_init="kaiming_fan_in",
                 input_norm="dataset", input_mean=(0.0, 0.0, 0.0), input_std=(1.0, 1.0, 1.0),
                 bn_eps=1e-5, bn_momentum=0.1, in_channels=3, shortcut="B"):
        super().__init__()
        norm_layer = get_norm(norm, gamma0=gamma0, eps=bn_eps, momentum=bn_momentum)
        Block = {"basic": BasicBlock, "bottleneck": Bottleneck}[block]
        if shortcut not in SHORTCUTS or (shortcut == "A" and block != "basic"):
            raise ValueError(f"shortcut={shortcut!r} with {block} blocks; valid choices: "
                             f"{list(SHORTCUTS) if block == 'basic' else ['B']} (option A is for basic-block nets)")
        chans = [max(1, round(w * width)) for w in widths]

        if input_norm == "bn":
            self.input_norm = _input_bn(gamma0, in_channels)
        elif input_norm == "dataset":
            self.input_norm = InputNorm(input_mean, input_std)
        elif input_norm == "raw":
            self.input_norm = nn.Identity()
        else:
            raise ValueError(f"input_norm={input_norm!r}; valid choices: {list(INPUT_NORMS)}")

        c = chans[0]
        if stem == "cifar":  # 3x3 stride-1 conv, no max-pool (He et al. 2016, Sec. 4.2)
            self.stem = nn.Sequential(nn.Conv2d(in_channels, c, 3, 1, 1, bias=False), norm_layer(c), nn.ReLU())
        elif stem == "imagenet":
            self.stem = nn.Sequential(nn.Conv2d(in_channels, c, 7, 2, 3, bias=False), norm_layer(c), nn.ReLU(),
                                      nn.MaxPool2d(3, 2, 1))
        else:
            raise ValueError(f"stem={stem!r}; valid choices: ['cifar', 'imagenet']")

        stages, cin = [], c
        for i, (n, planes) in enumerate(zip(layers, chans)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                gain = ResidualGain(alpha0, alpha_learnable) if residual_gain else None
                blocks.append(Block(cin, planes, stride, norm_layer, gain, shortcut))
                cin = planes * Block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d) and conv_init != "torch_default":
                mode = {"kaiming_fan_in": "fan_in", "kaiming_fan_out": "fan_out"}[conv_init]
                nn.init.kaiming_normal_(m.weight, mode=mode, nonlinearity="relu")
        if zero_init_last_gamma:
            if not NORMS[norm].has_gamma:
                raise ValueError(f"zero_init_last_gamma=True needs a norm with γ; norm={norm!r} has "
                                 f"none; valid choices: {[k for k, s in NORMS.items() if s.has_gamma]}")
            for b in self.blocks():
                nn.init.zeros_(b.last_norm.weight)

    def forward(self, x):  # x: (N, in_channels, H, W) pixels in [0, 1]
        x = self.stages(self.stem(self.input_norm(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    def blocks(self) -> list[nn.Module]:
        """Residual blocks in depth order."""
        return [b for stage in self.stages for b in stage]

    def norm_layers(self) -> list[tuple[str, nn.Module]]:
        """(name, module) of every norm layer with parameters or statistics, in depth order
        (module registration order: stem, then per block bn1, bn2[, bn3], shortcut norm)."""
        return norm_layers(self)

    def residual_gains(self) -> list[tuple[str, nn.Parameter]]:
        """(name, α) of each SkipInit residual gain, in depth order."""
        return [(n + ".alpha", m.alpha) for n, m in self.named_modules() if isinstance(m, ResidualGain)]

    def conv_layers(self) -> list[tuple[int, str, nn.Conv2d]]:
        return conv_layers(self)


# ----------------------------------------------------------------------------------------------
# layers by role, for any module built from the registries (not by isinstance on layer types)
# ----------------------------------------------------------------------------------------------

def norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every layer the norm registry built (bnlib.norms.tag_norm) that has
    parameters or statistics ('none' builds parameterless identities: left out), in module
    registration order."""
    return [(n, m) for n, m in model.named_modules()
            if hasattr(m, "_bnlib_norm") and (any(True for _ in m.parameters(recurse=False))
                                              or any(True for _ in m.buffers(recurse=False)))]


def param_roles(model: nn.Module) -> list[tuple[str, str, nn.Parameter]]:
    """(parameter name, role, parameter) for every parameter with a role: "scale" (norm γ),
    "shift" (norm β) from the norm registry entry that built its layer, "alpha" (SkipInit
    residual gain) from the factory. Parameters without a role are weights or plain biases."""
    out = []
    for n, m in model.named_modules():
        for attr, role in getattr(m, "_bnlib_roles", {}).items():
            p = getattr(m, attr, None)
            if isinstance(p, nn.Parameter):
                out.append((f"{n}.{attr}" if n else attr, role, p))
    return out


def conv_layers(model: nn.Module) -> list[tuple[int, str, nn.Conv2d]]:
    """(index, name, conv) of every conv layer, indexed in depth order: the stem conv is 0, then
    block by block its branch convs (conv1, conv2[, conv3]) and, after them, its projection
    shortcut's conv when it has one (option B; option A has none). This is module
    registration order, so "layer 55 of ResNet-110" means one conv: with option A the net has
    109 convs (stem + 2 x 54), index 0..108, and layer 55 (1-based) is index 54, the middle one
    (Bjorck et al. 2018, Fig. 3)."""
    return [(i, n, m) for i, (n, m) in enumerate((n, m) for n, m in model.named_modules()
                                                 if isinstance(m, nn.Conv2d))]


def middle_conv(model: nn.Module) -> tuple[int, str, nn.Conv2d]:
    """The conv at index len // 2 of conv_layers: P4's default layer for gradient histograms."""
    convs = conv_layers(model)
    return convs[len(convs) // 2]


def create_model(arch: str = "resnet18", **kw) -> ResNet:
    """Build a ResNet by name, e.g. create_model('resnet56', norm='none', residual_gain=True)."""
    block, layers, widths = parse_arch(arch)
    return ResNet(block, layers, widths, **kw)
