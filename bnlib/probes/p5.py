"""P5 probe (De & Smith 2020, "Batch Normalization Biases Residual Blocks Towards the Identity
Function in Deep Networks"): signal propagation through the residual blocks (Fig. 2)."""
from __future__ import annotations

import math

import torch
from torch import nn

from .registry import ProbeContext, register_probe

__all__ = ["signal_propagation"]

_ABSENT = object()


@register_probe("signal_propagation", doc=(
        "P5 Fig. 2: per residual block (depth = block index in model.blocks(), layer = its name), on the fixed "
        "probe batch in train mode, the mean squared activation of the two tensors the block adds, from its "
        "parts(x) -> (skip, branch): skip_ms (the skip path), branch_ms (the residual branch, SkipInit's α "
        "included), branch_to_skip = branch_ms / skip_ms, and identity_skip (1 where the skip is the identity, "
        "0 where a projection or padding resets it at a stage start). Computed in float64, so an unnormalized "
        "net's ~2^l growth is measured rather than overflowed (fp32 ends at 2^128, a few hundred blocks)."))
@torch.no_grad()
def signal_propagation(ctx: ProbeContext) -> list[dict]:
    # P5's argument: with BN at the start of each branch, Var(x_{l+1}) ≈ Var(x_l) + 1, so the
    # skip path's mean square grows ~linearly in l while the branch's stays ~1 (the branch is
    # down-weighted by ~√l); without normalization (He init) both double per block; SkipInit's
    # α = 0 makes every branch exactly 0 at init, so the skip path stays flat.
    model = ctx.model.double()  # the probe's own copy: free to change precision
    names = {id(m): n for n, m in model.named_modules()}
    blocks = model.blocks() if hasattr(model, "blocks") else []
    seen: dict[int, tuple] = {}

    def record(j: int, b: nn.Module, skip: torch.Tensor, branch: torch.Tensor) -> None:
        ms = torch.stack([skip.pow(2).mean(), branch.pow(2).mean()])
        seen[j] = (ms, isinstance(getattr(b, "shortcut", None), nn.Identity))

    def through_parts(j, b, parts):
        def wrapped(x):  # every block's forward is parts + its combine: one forward measures all
            skip, branch = parts(x)
            record(j, b, skip, branch)
            return skip, branch
        return wrapped

    def fallback(j, parts):  # a block whose forward does not call parts: measure its input again
        def hook(b, inp, _out):
            if j not in seen:
                record(j, b, *parts(inp[0]))
        return hook

    handles, wrapped = [], []
    try:
        for j, b in enumerate(blocks):
            parts = getattr(b, "parts", None)  # bnlib.models: every residual block has it
            if parts is None:
                continue
            # an instance attribute over the class's method; the closure refers to the block, a
            # cycle that would keep the float64 copy alive until a full GC: undone below
            own = b.__dict__.get("parts", _ABSENT)
            b.parts = through_parts(j, b, parts)
            wrapped.append((b, own))
            handles.append(b.register_forward_hook(fallback(j, parts)))
        model(ctx.probe_batch[0].to(torch.float64))
    finally:
        for h in handles:
            h.remove()
        for b, own in wrapped:
            if own is _ABSENT:
                del b.parts
            else:
                b.parts = own
    if not seen:
        return []
    ms = torch.stack([seen[j][0] for j in sorted(seen)]).tolist()  # one read-back for every block
    rows = []
    for (skip, branch), j in zip(ms, sorted(seen)):
        name = names[id(blocks[j])]
        ratio = branch / skip if skip > 0 else math.nan
        rows += [ctx.row("signal_propagation", q, v, layer=name, depth=j)
                 for q, v in (("skip_ms", skip), ("branch_ms", branch), ("branch_to_skip", ratio),
                              ("identity_skip", float(seen[j][1])))]
    return rows
