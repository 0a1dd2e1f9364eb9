"""The optimizer and its schedule: parameter groups with their own learning rate and weight
decay (γ, β, SkipInit's α, weights: P2 Sec. 3.2, P5), and the learning rate at each step."""
from __future__ import annotations

import math

import torch

from .models import param_roles

__all__ = ["param_groups", "lr_at", "make_optimizer"]


def param_groups(model: torch.nn.Module, cfg: dict) -> list[dict]:
    """Four groups, each with its own lr multiplier and weight decay (P2 Sec. 3.2): 'scale' =
    norm γ; 'bias' = norm β and all other biases; 'alpha' = SkipInit residual gains (P5);
    'weight' = conv/linear weights. Roles come from the norm registry entry that built each
    layer and from the factory (bnlib.models.param_roles), so a new norm needs no edit here. By
    default only weights are decayed: decay on γ/β is a confound in BN studies."""
    role = {id(p): r for _, r, p in param_roles(model)}
    groups = {"scale": [], "bias": [], "alpha": [], "weight": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        r = role.get(id(p))
        kind = {"scale": "scale", "shift": "bias", "alpha": "alpha"}[r] if r else "bias" if p.ndim <= 1 else "weight"
        groups[kind].append(p)
    lr = cfg["lr"]
    spec = {"scale": (lr * cfg["gamma_lr_mult"], cfg["gamma_wd"]),
            "bias": (lr * cfg["bias_lr_mult"], cfg["bias_wd"]),
            "alpha": (lr * cfg["alpha_lr_mult"], cfg["alpha_wd"]),
            "weight": (lr, cfg["weight_decay"])}
    return [{"name": k, "params": ps, "lr": spec[k][0], "weight_decay": spec[k][1]}
            for k, ps in groups.items() if ps]


def lr_at(step: int, total: int, cfg: dict, steps_per_epoch: int, start_lr: float | None = None) -> float:
    """Multiplier of a group's start lr `start_lr` at `step` (0-based): linear warm-up, then
    constant, step or cosine. Every group is annealed from its own start lr; the cosine ends at
    final_lr_frac × start_lr, or at the absolute final_lr when that is set (P2's code anneals every
    group to 1e-8, as torch's CosineAnnealingLR(eta_min) does; validate() allows one of the two),
    which is why the multiplier needs the group's `start_lr`."""
    warm = round(cfg["warmup_epochs"] * steps_per_epoch)
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(1, total - warm)  # progress after warm-up in [0, 1)
    if cfg["schedule"] == "constant":
        return 1.0
    if cfg["schedule"] == "step":
        return cfg["step_gamma"] ** sum(t >= m for m in cfg["step_milestones"])
    if cfg.get("final_lr") is not None:
        if not start_lr:
            raise ValueError("lr_at: an absolute final_lr needs the group's start_lr")
        f = cfg["final_lr"] / start_lr
    else:
        f = cfg["final_lr_frac"]
    return f + (1 - f) * 0.5 * (1 + math.cos(math.pi * t))


def make_optimizer(groups, cfg):
    if cfg["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=cfg["lr"], momentum=cfg["momentum"], nesterov=cfg["nesterov"])
    return torch.optim.AdamW(groups, lr=cfg["lr"], betas=(cfg["momentum"], 0.999))
