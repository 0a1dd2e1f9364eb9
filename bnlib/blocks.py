"""Residual blocks: post-activation basic and bottleneck blocks (He et al. 2016), the
pre-activation block of Wide-ResNets (He et al. 2016b; Zagoruyko & Komodakis 2016), their
shortcuts and SkipInit's residual gain (De & Smith 2020). `bnlib.models` assembles them.

Every block has `parts(x) -> (skip, branch)`, the two tensors whose sum is its pre-output (P5
measures both), with the residual gain α inside the branch (branch = α·f(x)): a
post-activation block returns relu(skip + branch), a pre-activation block skip + branch.
Each block takes the norm as a callable `norm_layer(num_features)` (bnlib.norms), as
torchvision's resnet.py does.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

__all__ = ["ResidualGain", "PadShortcut", "BasicBlock", "Bottleneck", "PreActBlock", "BLOCKS", "SHORTCUTS",
           "checkpoint_contexts", "dropout_layer"]


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


def _shortcut(cin: int, cout: int, stride: int, norm_layer, kind: str = "B", bias: bool = False) -> nn.Module:
    """The skip path of a block. Identity when the shape is kept; else option A (PadShortcut) or
    option B, a 1x1 projection followed by `norm_layer`, or by nothing when norm_layer is None
    (pre-activation blocks: the projection's input is already normalized, as in WRN's code)."""
    if stride == 1 and cin == cout:
        return nn.Identity()
    if kind == "A":
        return PadShortcut(cin, cout, stride)
    conv = nn.Conv2d(cin, cout, 1, stride, bias=bias)
    # projection shortcut (option B of He et al.), normalized like torchvision's downsample
    return conv if norm_layer is None else nn.Sequential(conv, norm_layer(cout))


def dropout_layer(p: float) -> nn.Module:
    """nn.Dropout(p), or an Identity at p = 0 (the network then has no dropout layer at all)."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride, norm_layer, gain: nn.Module | None, shortcut: str = "B",
                 conv_bias: bool = False, dropout: float = 0.0):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=conv_bias)
        self.bn1 = norm_layer(planes)
        self.dropout = dropout_layer(dropout)  # WRN's place: between the two 3x3 convs
        self.conv2 = nn.Conv2d(planes, cout, 3, 1, 1, bias=conv_bias)
        self.bn2 = norm_layer(cout)
        self.gain = gain if gain is not None else nn.Identity()
        self.shortcut = _shortcut(cin, cout, stride, norm_layer, shortcut, conv_bias)
        self.last_norm = self.bn2

    def branch(self, x):
        return self.gain(self.bn2(self.conv2(self.dropout(torch.relu(self.bn1(self.conv1(x)))))))

    def parts(self, x):
        return self.shortcut(x), self.branch(x)

    def forward(self, x):
        skip, branch = self.parts(x)
        return torch.relu(skip + branch)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride, norm_layer, gain: nn.Module | None, shortcut: str = "B",
                 conv_bias: bool = False, dropout: float = 0.0):
        super().__init__()  # dropout: the factory's rules (bnlib.models.model_problems) allow only 0 here
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=conv_bias)
        self.bn1 = norm_layer(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=conv_bias)  # stride on 3x3 (v1.5)
        self.bn2 = norm_layer(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=conv_bias)
        self.bn3 = norm_layer(cout)
        self.gain = gain if gain is not None else nn.Identity()
        self.shortcut = _shortcut(cin, cout, stride, norm_layer, shortcut, conv_bias)
        self.last_norm = self.bn3

    def branch(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.gain(self.bn3(self.conv3(x)))

    def parts(self, x):
        return self.shortcut(x), self.branch(x)

    def forward(self, x):
        skip, branch = self.parts(x)
        return torch.relu(skip + branch)


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016b, "Identity mappings in deep residual
    networks"; the block of Zagoruyko & Komodakis's Wide-ResNets, P5's networks):

        h = relu(bn1(x));  f = α·conv2(dropout(relu(bn2(conv1(h)))));  out = skip + f

    Nothing follows the sum, so the skip path is a pure identity from block to block (P5's
    argument: with BN, Var(x_l) grows like l and the branch is down-weighted by ~√l). When the
    block changes shape, the skip is the projection (or option-A padding) of the pre-activated
    h, not of x: bn1-relu is shared by both paths, as in WRN's code and He et al. 2016b; the
    projection has no norm of its own. `last_norm` is None: bn2 is followed by relu and conv2,
    so a zero γ there would stall its own gradient (relu'(0) = 0) rather than start the block at
    the identity; SkipInit's α0 = 0 is the way to do that here.
    """
    expansion = 1

    def __init__(self, cin, planes, stride, norm_layer, gain: nn.Module | None, shortcut: str = "B",
                 conv_bias: bool = False, dropout: float = 0.0):
        super().__init__()
        self.bn1 = norm_layer(cin)
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=conv_bias)
        self.bn2 = norm_layer(planes)
        self.dropout = dropout_layer(dropout)  # WRN: dropout between the two convs (Sec. 2.4)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=conv_bias)
        self.gain = gain if gain is not None else nn.Identity()
        self.shortcut = _shortcut(cin, planes, stride, None, shortcut, conv_bias)
        self.last_norm = None

    def _branch(self, h):  # h: the pre-activated input relu(bn1(x))
        return self.gain(self.conv2(self.dropout(torch.relu(self.bn2(self.conv1(h))))))

    def branch(self, x):
        return self._branch(torch.relu(self.bn1(x)))

    def parts(self, x):
        h = torch.relu(self.bn1(x))
        skip = x if isinstance(self.shortcut, nn.Identity) else self.shortcut(h)
        return skip, self._branch(h)

    def forward(self, x):
        skip, branch = self.parts(x)
        return skip + branch


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck, "preact": PreActBlock}


def checkpoint_contexts(module: nn.Module):
    """(forward, recomputation) contexts for checkpointing `module`: the recomputation in the
    backward pass sees the buffers the first forward saw and leaves them as that forward left
    them. Otherwise, in train mode, it would update BN's running statistics a second time
    (r <- (1-m)^2·r + ...) and count the batch twice, and a layer whose train-mode output reads
    its buffers (ics_free's previous-batch statistics, batch_renorm's running statistics and
    step count: bnlib.bn_variants) would recompute another output than the one differentiated."""
    seen = []

    @contextlib.contextmanager
    def forward():
        seen[:] = [(b, b.detach().clone()) for b in module.buffers()]
        yield

    @contextlib.contextmanager
    def recompute():
        after = [(b, b.detach().clone()) for b, _ in seen]
        with torch.no_grad():
            for b, v in seen:
                b.copy_(v)
        try:
            yield
        finally:
            with torch.no_grad():
                for b, v in after:
                    b.copy_(v)

    return forward(), recompute()
