"""P2 probe (Davis & Frank 2022, "Revisiting Batch Normalization"): the largest normalized value
per norm layer (Sec. 3)."""
from __future__ import annotations

import torch

from ..models import norm_layers
from .registry import ProbeContext, register_probe

__all__ = ["max_normalized"]


@register_probe("max_normalized", doc=(
        "P2 Sec. 3: normalization can produce overly large values, and γ ≈ 1 passes them on. Per norm layer "
        "(bnlib.models.norm_layers; depth = its index there, P2's input BN first when input_norm='bn'), on the "
        "fixed probe batch in train mode: xhat_abs_max, the largest |x̂| (the layer applied to its input with "
        "its scale set to 1 and its shift to 0: for BN, (x − μ_B)/√(σ²_B + ε)), and out_abs_max, the largest "
        "|γ·x̂ + β| (the layer's actual output)."))
@torch.no_grad()
def max_normalized(ctx: ProbeContext) -> list[dict]:
    model, layers = ctx.model, norm_layers(ctx.model)
    seen = {}  # layer name -> (its input, its output) on the probe batch
    handles = [m.register_forward_hook(lambda _m, inp, out, name=name: seen.__setitem__(name, (inp[0], out)))
               for name, m in layers]
    try:
        model(ctx.probe_batch[0])
    finally:
        for h in handles:
            h.remove()
    rows = []
    for depth, (name, m) in enumerate(layers):
        if name not in seen:
            continue
        x, out = seen[name]
        # x̂ from the layer itself with γ = 1, β = 0 (roles from the norm registry), so any norm
        # is measured by its own normalization; the model is the probe's copy, free to change
        for attr, role in m._bnlib_roles.items():
            p = getattr(m, attr, None)
            if isinstance(p, torch.Tensor):
                p.fill_(1.0 if role == "scale" else 0.0)
        top = torch.stack([m(x).float().abs().max(), out.float().abs().max()]).tolist()
        rows += [ctx.row("max_normalized", "xhat_abs_max", top[0], layer=name, depth=depth),
                 ctx.row("max_normalized", "out_abs_max", top[1], layer=name, depth=depth)]
    return rows
