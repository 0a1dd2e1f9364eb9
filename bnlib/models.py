"""ResNet factory with the normalization injected by registry name.

Architectures are data (torchvision's stage tables, He et al. 2016); the norm is a callable
`norm_layer(num_features)` from `bnlib.norms`, as in torchvision's resnet.py. Every choice that
confounds BN studies is an explicit argument, recorded in each run's config:

- `zero_init_last_gamma`: γ of the last norm in each residual branch starts at 0 (Goyal et al.
  2017). Off by default: it makes BN arms and no-γ arms different networks at init.
- `residual_gain`: P5 SkipInit (De & Smith 2020): one learnable scalar α at the end of each
  residual branch, x_{l+1} = relu(shortcut(x_l) + α·f(x_l)), α initialized to `alpha0` (0).
- Pre-activation nets (`wrn{6n+4}_{k}`, Wide-ResNets, P5's networks): x_{l+1} = skip + α·f(x_l),
  nothing after the sum (`bnlib.blocks.PreActBlock`). `dropout` (between a block's two 3x3 convs, WRN),
  `fc_dropout` (before the classifier) and `conv_bias` (a zero-initialized bias in every conv)
  are the pieces of P5's "regularized SkipInit"; `checkpoint_blocks` recomputes each block in
  the backward pass (memory at depth 1000). All off by default: the networks are unchanged.
- `conv_init`: "kaiming_fan_in" (Kaiming normal, fan-in, ReLU gain, as in P2's code) by default.
- `fc_init`: the classifier's weights, PyTorch's default by default, or "kaiming_uniform_relu"
  (P2's code: Kaiming uniform with the ReLU gain).
- `input_norm`: how pixels in [0, 1] are normalized before conv1: "dataset" (true dataset
  mean/std), "raw" (none), "bn" (P2's online BN input normalization).
- `zero_bias`: the classifier bias starts at 0 (P2's code zeroes every bias) instead of
  PyTorch's uniform(±1/√fan_in); the only other biases, norm β, start at 0 anyway.
"""
from __future__ import annotations

import functools
import math
import re
from typing import NamedTuple

import torch
import torch.utils.checkpoint
from torch import nn

from .blocks import (BLOCKS, SHORTCUTS, BasicBlock, Bottleneck, PadShortcut, PreActBlock, ResidualGain,  # noqa: F401
                     checkpoint_contexts, dropout_layer)
from .norms import NORMS, get_norm, tag_norm

__all__ = ["ResNet", "BasicBlock", "Bottleneck", "PreActBlock", "create_model", "arch_names", "parse_arch",
           "arch_spec", "ArchSpec", "num_blocks", "CONV_INITS", "FC_INITS", "INPUT_NORMS", "SHORTCUTS", "conv_layers",
           "middle_conv", "norm_layers", "param_roles"]

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


class ArchSpec(NamedTuple):
    """An architecture as data: block kind, blocks per stage, stage widths, stem width."""
    block: str  # "basic", "bottleneck" (post-activation) or "preact" (pre-activation basic)
    layers: tuple[int, ...]
    widths: tuple[int, ...]
    stem_width: int


def arch_spec(arch: str) -> ArchSpec:
    """'resnet18' -> basic (2,2,2,2) (64,128,256,512), stem 64; 'resnet56' -> CIFAR family;
    'wrn28_10' -> preact (4,4,4) (160,320,640), stem 16.

    `resnet{d}` is torchvision's net for d in {18, 34, 50, 101, 152}; any other d = 6n+2 is the
    CIFAR family. `cifar_resnet{d}` always names the CIFAR family (e.g. cifar_resnet50).
    `wrn{d}_{k}` is Zagoruyko & Komodakis's Wide-ResNet WRN-d-k (2016, Table 1): d = 6n+4 (the
    stem conv, 6n convs in 3 groups of n pre-activation basic blocks, and the classifier, plus
    the 2 projection shortcuts; the WRN paper counts them), widths 16k, 32k, 64k, a 16-channel
    stem that k does not widen. wrn{6n+4}_1 is He et al. 2016b's pre-activation CIFAR
    ResNet-(6n+2) with projection shortcuts (or with option A: shortcut='A').
    The `width` multiplier of the factory scales every one of these, the stem included.
    """
    m = re.fullmatch(r"wrn(\d+)_(\d+)", arch or "")
    if m is not None:
        depth, k = int(m.group(1)), int(m.group(2))
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"arch={arch!r}: Wide-ResNet depth {depth} is not of the form 6n+4 with n >= 1 "
                             f"(10, 16, 22, 28, 40, ..., 1000); valid choices: {arch_names()}")
        if k < 1:
            raise ValueError(f"arch={arch!r}: widen factor k={k} must be an integer >= 1 "
                             f"(wrn{{depth}}_{{k}}, e.g. wrn16_4, wrn28_10); valid choices: {arch_names()}")
        n = (depth - 4) // 6
        return ArchSpec("preact", (n, n, n), tuple(w * k for w in CIFAR_WIDTHS), CIFAR_WIDTHS[0])
    m = re.fullmatch(r"(cifar_)?resnet(\d+)", arch or "")
    if m is None:
        raise ValueError(f"arch={arch!r} is not a known architecture; valid choices: {arch_names()}")
    cifar, depth = bool(m.group(1)), int(m.group(2))
    if not cifar and depth in IMAGENET_FAMILY:
        block, layers = IMAGENET_FAMILY[depth]
        return ArchSpec(block, layers, IMAGENET_WIDTHS, IMAGENET_WIDTHS[0])
    if depth >= 8 and (depth - 2) % 6 == 0:
        n = (depth - 2) // 6
        return ArchSpec("basic", (n, n, n), CIFAR_WIDTHS, CIFAR_WIDTHS[0])
    raise ValueError(f"arch={arch!r}: depth {depth} is neither one of torchvision's "
                     f"{sorted(IMAGENET_FAMILY)} nor of the CIFAR form 6n+2 with n >= 1 "
                     f"(20, 32, 44, 56, 110, ...); valid choices: {arch_names()}")


def parse_arch(arch: str) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
    """(block, layers, widths) of `arch_spec(arch)`, e.g. 'resnet18' -> ('basic', (2,2,2,2),
    (64,128,256,512)); unknown names and bad depths raise ValueError naming the valid ones."""
    return tuple(arch_spec(arch)[:3])


def num_blocks(arch: str) -> int:
    """Residual blocks of `arch` (P5's d, e.g. SkipInit's α0 = 1/√d): 166 × 3 = 498 for wrn1000_1."""
    return sum(arch_spec(arch).layers)


def arch_names() -> list[str]:
    return [f"resnet{d}" for d in IMAGENET_FAMILY] + ["resnet{6n+2} (e.g. resnet20, resnet56, resnet110)",
                                                     "cifar_resnet{6n+2}",
                                                     "wrn{6n+4}_{k} (Wide-ResNet, k >= 1, e.g. wrn16_4, wrn28_10)"]


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
# The classifier's weights: PyTorch's default (uniform, bound 1/√fan_in) or P2's authors' Kaiming
# uniform with the ReLU gain (bound √(6/fan_in), √6 ≈ 2.45× larger)
FC_INITS = ("torch_default", "kaiming_uniform_relu")


def model_problems(block: str, *, norm: str, zero_init_last_gamma: bool = False, dropout: float = 0.0,
                   fc_dropout: float = 0.0, shortcut: str = "B", arch: str | None = None) -> list[str]:
    """The rules a network's options must follow together, stated once: error lines (empty when
    the combination can be built). The factory raises them, bnlib.config.validate reports them."""
    kind = {"basic": "basic blocks", "bottleneck": "bottleneck blocks", "preact": "pre-activation blocks"}[block]
    at = f"arch={arch!r} ({kind})" if arch else kind
    out = []
    if shortcut not in SHORTCUTS:
        out.append(f"shortcut={shortcut!r}: not a valid choice; valid choices: {list(SHORTCUTS)}")
    elif shortcut == "A" and block == "bottleneck":
        out.append(f"shortcut='A' with {at}: option A is for basic-block nets; valid choices here: ['B']")
    for name, p in (("dropout", dropout), ("fc_dropout", fc_dropout)):
        if not 0 <= p < 1:
            out.append(f"{name}={p}: a dropout rate must be in [0, 1)")
    if dropout > 0 and block == "bottleneck":
        out.append(f"dropout={dropout} with {at}: in-block dropout sits between two 3x3 convs (WRN), which "
                   f"bottleneck blocks lack; valid here: 0, or a basic-block arch (resnet18/34, resnet{{6n+2}}, "
                   f"wrn{{6n+4}}_{{k}})")
    if zero_init_last_gamma and norm in NORMS and not NORMS[norm].has_gamma:
        out.append(f"zero_init_last_gamma=True: norm={norm!r} has no γ; valid norms for it: "
                   f"{[k for k, s in NORMS.items() if s.has_gamma]}")
    if zero_init_last_gamma and block == "preact":
        out.append(f"zero_init_last_gamma=True with {at}: the last norm of a pre-activation branch feeds relu "
                   f"and a conv, a zero γ there never recovers; valid choices here: [False] (start blocks at the "
                   f"identity with residual_gain=True, alpha0=0)")
    return out


class ResNet(nn.Module):
    def __init__(self, block: str, layers, widths, *, num_classes=10, norm="bn", gamma0=1.0,
                 width=1.0, stem="cifar", zero_init_last_gamma=False, residual_gain=False,
                 alpha0=0.0, alpha_learnable=True, conv_init="kaiming_fan_in", fc_init="torch_default",
                 input_norm="dataset", input_mean=(0.0, 0.0, 0.0), input_std=(1.0, 1.0, 1.0),
                 bn_eps=1e-5, bn_momentum=0.1, in_channels=3, shortcut="B", zero_bias=False,
                 dropout=0.0, fc_dropout=0.0, conv_bias=False, checkpoint_blocks=False, stem_width=None,
                 norm_options: dict | None = None):
        super().__init__()
        # norm_options: the norm's own parameters (NormSpec.options, e.g. norm_groups)
        norm_layer = get_norm(norm, gamma0=gamma0, eps=bn_eps, momentum=bn_momentum, **(norm_options or {}))
        Block = BLOCKS[block]
        preact = Block is PreActBlock
        problems = model_problems(block, norm=norm, zero_init_last_gamma=zero_init_last_gamma, dropout=dropout,
                                  fc_dropout=fc_dropout, shortcut=shortcut)
        if problems:
            raise ValueError("; ".join(problems))
        chans = [max(1, round(w * width)) for w in widths]
        self.checkpoint_blocks = checkpoint_blocks

        if input_norm == "bn":
            self.input_norm = _input_bn(gamma0, in_channels)
        elif input_norm == "dataset":
            self.input_norm = InputNorm(input_mean, input_std)
        elif input_norm == "raw":
            self.input_norm = nn.Identity()
        else:
            raise ValueError(f"input_norm={input_norm!r}; valid choices: {list(INPUT_NORMS)}")

        # the stem's width is scaled like the stages' (WRN: 16 channels for every k; x width)
        c = chans[0] if stem_width is None else max(1, round(stem_width * width))
        # pre-activation nets: the stem is a bare conv, the first block's bn1-relu follows it
        post = [] if preact else [norm_layer(c), nn.ReLU()]
        if stem == "cifar":  # 3x3 stride-1 conv, no max-pool (He et al. 2016, Sec. 4.2)
            self.stem = nn.Sequential(nn.Conv2d(in_channels, c, 3, 1, 1, bias=conv_bias), *post)
        elif stem == "imagenet":
            self.stem = nn.Sequential(nn.Conv2d(in_channels, c, 7, 2, 3, bias=conv_bias), *post,
                                      nn.MaxPool2d(3, 2, 1))
        else:
            raise ValueError(f"stem={stem!r}; valid choices: ['cifar', 'imagenet']")

        stages, cin = [], c
        for i, (n, planes) in enumerate(zip(layers, chans)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                gain = ResidualGain(alpha0, alpha_learnable) if residual_gain else None
                blocks.append(Block(cin, planes, stride, norm_layer, gain, shortcut, conv_bias, dropout))
                cin = planes * Block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        # pre-activation nets end with norm-relu before pooling (He et al. 2016b; WRN)
        self.final = nn.Sequential(norm_layer(cin), nn.ReLU()) if preact else nn.Identity()
        self.fc_dropout = dropout_layer(fc_dropout)  # P5's regularized SkipInit: dropout before the classifier
        self.fc = nn.Linear(cin, num_classes)
        if fc_init == "kaiming_uniform_relu":  # P2's code
            nn.init.kaiming_uniform_(self.fc.weight, nonlinearity="relu")
        if zero_bias:  # P2's code zeroes every bias; norm β start at 0, conv biases (conv_bias) below
            nn.init.zeros_(self.fc.bias)

        for m in self.modules():
            if isinstance(m, nn.Conv2d) and conv_init != "torch_default":
                mode = {"kaiming_fan_in": "fan_in", "kaiming_fan_out": "fan_out"}[conv_init]
                nn.init.kaiming_normal_(m.weight, mode=mode, nonlinearity="relu")
            if isinstance(m, nn.Conv2d) and m.bias is not None and (conv_init != "torch_default" or zero_bias):
                # conv_bias: biases start at 0, so at init the net computes what it computes without them
                nn.init.zeros_(m.bias)
        if zero_init_last_gamma:
            for b in self.blocks():
                nn.init.zeros_(b.last_norm.weight)
        if NORMS[norm].attach is not None:  # the norm's model-level part (bnlib.norms.NormSpec.attach)
            NORMS[norm].attach(self)

    def forward(self, x):  # x: (N, in_channels, H, W) pixels in [0, 1]
        x = self.stem(self.input_norm(x))
        if self.checkpoint_blocks and torch.is_grad_enabled():
            # keep only each block's input; recompute the block in backward (same RNG state, so
            # the same dropout masks; running statistics updated once). Hooks on a block and its
            # layers can fire again during the recomputation (which stops early once the saved
            # tensors the backward needs are recomputed), so a hook that also sees a backward must expect it.
            for b in self.blocks():
                x = torch.utils.checkpoint.checkpoint(
                    b, x, use_reentrant=False, context_fn=lambda b=b: checkpoint_contexts(b))
        else:
            x = self.stages(x)
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(self.final(x), 1), 1)
        return self.fc(self.fc_dropout(x))

    def blocks(self) -> list[nn.Module]:
        """Residual blocks in depth order (BasicBlock, Bottleneck or PreActBlock; each has
        parts(x) -> (skip, branch), bnlib.blocks)."""
        return [b for stage in self.stages for b in stage]

    def norm_layers(self) -> list[tuple[str, nn.Module]]:
        """(name, module) of every norm layer with parameters or statistics, in depth order
        (module registration order: stem, then per block bn1, bn2[, bn3], shortcut norm, then a
        pre-activation net's final norm)."""
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


# the run parameters the factory reads (besides arch and the norm's own options)
MODEL_KEYS = ("norm", "gamma0", "width", "stem", "zero_init_last_gamma", "residual_gain", "alpha0",
              "alpha_learnable", "conv_init", "fc_init", "input_norm", "bn_eps", "bn_momentum", "shortcut", "zero_bias",
              "dropout", "fc_dropout", "conv_bias", "checkpoint_blocks")


def build_model(cfg: dict, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), num_classes: int = 10) -> ResNet:
    """The run's network from its config; the input channel count follows the data set's (len(mean))."""
    return create_model(cfg["arch"], num_classes=num_classes, input_mean=mean, input_std=std,
                        in_channels=len(mean), **{k: cfg[k] for k in MODEL_KEYS},
                        norm_options={k: cfg[k] for k in NORMS[cfg["norm"]].options})


def _key(cfg: dict) -> tuple:
    keys = ("arch", *MODEL_KEYS, *(NORMS[cfg["norm"]].options if cfg.get("norm") in NORMS else ()))
    return tuple((k, cfg.get(k)) for k in keys)  # scalars: hashable


@functools.lru_cache(maxsize=32)
def _meta_model(key: tuple, in_channels: int) -> ResNet:
    with torch.device("meta"):
        return build_model(dict(key), mean=(0.0,) * in_channels, std=(1.0,) * in_channels)


def meta_model(cfg: dict, in_channels: int = 3) -> ResNet:
    """The run's network on PyTorch's meta device: shapes only, nothing allocated or initialized
    (what validation counts: conv layers, channels, parameters, activations). Cached per model
    configuration; treat it as read-only. ValueError when the config cannot be built."""
    return _meta_model(_key(cfg), in_channels)


def create_model(arch: str | ArchSpec = "resnet18", **kw) -> ResNet:
    """Build a ResNet by name, e.g. create_model('resnet56', norm='none', residual_gain=True),
    create_model('wrn16_4', width=1.0, dropout=0.3), or from an ArchSpec."""
    spec = arch if isinstance(arch, ArchSpec) else arch_spec(arch)
    return ResNet(spec.block, spec.layers, spec.widths, stem_width=spec.stem_width, **kw)
