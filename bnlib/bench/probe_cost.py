"""What each registered probe (bnlib.probes) costs per call on the bench model, through the
training loop's hook, so users can choose a probe cadence: a probe every k steps adds about
ms_per_call / k to each step."""
from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F

from ..config import validate
from ..data import to_input
from ..probes import PROBES, ProbeRunner, probe_names
from ..train import build_model, make_optimizer, param_groups
from .meters import summarize, sync
from .workload import BATCH

__all__ = ["probe_costs"]


def probe_costs(params: dict, data, device: torch.device, calls: int) -> dict:
    """ms per call of every registered probe on the bench model, through the loop's hook
    (ProbeRunner.at: model copy, RNG save/restore, fp32), after one untimed call each."""
    cfg = validate(params, probes=probe_names())
    torch.manual_seed(0)
    model = build_model(cfg, data.mean, data.std, data.num_classes).to(device)
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(param_groups(model, cfg), cfg)
    x, y = to_input(data.x_train[:BATCH], cfg["channels_last"]), data.y_train[:BATCH]
    k = min(cfg["probe_batch_size"], len(data.y_train))
    pb = (to_input(data.x_train[:k], cfg["channels_last"]), data.y_train[:k])
    runner = ProbeRunner(cfg, model, opt, lambda o, t: F.cross_entropy(o.float(), t), pb, len(data.y_train) // BATCH)
    out, step = {}, 0
    for name in probe_names():
        runner.every = {name: None}
        ms = []
        for c in range(calls + 1):
            sync(device)
            t0 = time.perf_counter()
            runner.at(step, x, y, epoch_end=True)
            sync(device)
            if c > 0:
                ms.append(1000 * (time.perf_counter() - t0))
            step += 1
        out[name] = {**summarize(ms), "default_every": PROBES[name].default_every}
    copies = []
    for _ in range(max(3, calls)):
        t0 = time.perf_counter()
        copy.deepcopy(model)
        sync(device)
        copies.append(1000 * (time.perf_counter() - t0))
    return {"ms_per_call": out, "model_copy_ms": summarize(copies), "calls": calls,
            "probe_batch_size": k, "train_batch_size": BATCH,
            "note": ("wall ms per call of ProbeRunner.at with one probe due (model deep copy, RNG save/restore, "
                     "the probe in fp32), median/min/max over the timed calls; model_copy_ms: the deep copy "
                     "alone. A probe every k steps costs about ms_per_call / k per step.")}

