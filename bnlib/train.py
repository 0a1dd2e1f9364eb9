"""The training loop: one function that reads top to bottom, small pure helpers around it.

`run(params)` validates the parameters, makes the run directory, trains, and writes the
records (bnlib.records) after every epoch. A diverging run is a result: it stops, and its
status says `diverged` with the step. Data lives on the device (bnlib.data); the step has no
host synchronisation except every `log_every` steps, where the logged losses are read back
once to check for divergence.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import socket
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from filelock import Timeout
from tqdm import tqdm

from .config import validate
from .errors import RunLocked
from .checkpoint import checkpoint_problem, load_checkpoint, save_checkpoint, set_rng_states
from .device import configure_backends
import bnlib.bnstats as bnstats
from .bnstats import fixed_batches
from .data import augment, check_data, load_data, steps_per_epoch, to_input
from .models import build_model, create_model, norm_layers, param_roles
from .norms import NORMS
from .optim import lr_at, make_optimizer, param_groups
from .probes import ProbeRunner
from .records import FINISHED, RunDir, check_writable, config_record, run_id

__all__ = ["run", "train", "RunLocked", "check_writable", "lr_at", "param_groups", "make_optimizer", "NormTracker",
           "build_model", "RunResult"]


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

class NormTracker:
    """γ/β drift (P2 Sec. 3: after standard training γ and β barely move from 1 and 0): per
    norm layer and residual gain, summary statistics and mean |Δ| from the initial values."""

    KINDS = {"scale": "gamma", "shift": "beta"}  # registry role -> the `param` column

    def __init__(self, model):
        self.params = []  # (depth index, layer name, kind, parameter)
        # the roles of each norm layer's parameters come from its registry entry (tag_norm)
        for i, (name, m) in enumerate(norm_layers(model)):
            for attr, r in sorted(m._bnlib_roles.items(), key=lambda a: list(self.KINDS).index(a[1])):
                p = getattr(m, attr, None)
                if isinstance(p, torch.Tensor):
                    self.params.append((i, name, self.KINDS[r], p))
        for j, (name, _, p) in enumerate(x for x in param_roles(model) if x[1] == "alpha"):
            self.params.append((j, name, "alpha", p))
        self.init = [p.detach().float().clone() for *_, p in self.params]

    @torch.no_grad()
    def snapshot(self, epoch: int) -> list[dict]:
        if not self.params:
            return []
        ps = [p.detach().float() for *_, p in self.params]
        # one stacked transfer instead of 6 .item() calls per layer
        stats = torch.stack([torch.stack([p.mean(), p.std() if p.numel() > 1 else p.new_zeros(()),
                                          p.min(), p.max(), (p - p0).abs().mean()])
                             for p, p0 in zip(ps, self.init)]).cpu().tolist()
        return [{"epoch": epoch, "depth": i, "layer": name, "param": kind, "mean": s[0], "std": s[1],
                 "min": s[2], "max": s[3], "mean_abs_delta": s[4]}
                for (i, name, kind, _), s in zip(self.params, stats)]

    @torch.no_grad()
    def channels(self) -> dict:
        """Every channel's current and initial value, per layer (P1's figure of the learned γ/β
        distributions needs the per-channel values, not per-layer means): a column table."""
        cols = {"depth": [], "layer": [], "param": [], "channel": [], "value": [], "init": []}
        for (i, name, kind, p), p0 in zip(self.params, self.init):
            v, v0 = p.detach().float().flatten().cpu().tolist(), p0.flatten().cpu().tolist()
            cols["depth"] += [i] * len(v)
            cols["layer"] += [name] * len(v)
            cols["param"] += [kind] * len(v)
            cols["channel"] += list(range(len(v)))
            cols["value"] += v
            cols["init"] += v0
        return cols


@torch.no_grad()
def evaluate(model, x_u8, y, cfg, autocast) -> tuple[float, float]:
    """(mean loss, accuracy) in eval mode (BN uses the statistics it holds: the running ones, or
    inside bnstats.precise_bn the recomputed ones)."""
    model.eval()
    loss = torch.zeros((), device=y.device)
    correct = torch.zeros((), device=y.device, dtype=torch.long)
    for s in range(0, len(y), cfg["eval_batch_size"]):
        xb, yb = to_input(x_u8[s:s + cfg["eval_batch_size"]], cfg["channels_last"]), y[s:s + cfg["eval_batch_size"]]
        with autocast():
            out = model(xb).float()
        loss += F.cross_entropy(out, yb, reduction="sum")
        correct += (out.argmax(1) == yb).sum()
    model.train()
    if len(y) == 0:  # validate() rules this out; never report 0/0 as an accuracy of 0
        return math.nan, math.nan
    return loss.item() / len(y), correct.item() / len(y)


# Which rule declared a run diverged (status.json: diverged_rule), and what it usually means.
DIVERGENCE_RULES = {
    "nonfinite": "a training loss was NaN or infinite: the weights overflowed, typically an unnormalized "
                 "net at a learning rate tuned for BN (P4)",
    "blowup": "the smoothed loss rose above diverge_factor × max(ln K, its lowest value so far): the loss "
              "blew up after training had started, typically a learning rate too large for this net",
    "stuck_above_chance": "after the first epoch the smoothed loss was still above diverge_factor × ln K: "
                          "the net never came near chance-level loss, typically a deep unnormalized net whose "
                          "initial loss is huge (activations growing with depth, P4/P5)",
}


def divergence(losses: list[float], lowest: float, past_first_epoch: bool, num_classes: int,
               factor: float) -> tuple[str | None, int]:
    """Check one logging window of per-step training losses. Returns (rule, offset of the step
    in the window) or (None, -1). The smoothed loss is the window's mean; `lowest` is the
    lowest smoothed loss so far (the initial loss before the first window). Two references,
    because one is not enough: relative to the initial loss alone, a no-norm ResNet-101 that
    starts near 3·10⁵ could only diverge through NaN; relative to chance (ln K) alone, a run
    that trained to 0.1 and jumps to 2 would not count."""
    bad = next((j for j, v in enumerate(losses) if not math.isfinite(v)), None)
    if bad is not None:
        return "nonfinite", bad
    smoothed, chance = sum(losses) / len(losses), math.log(num_classes)
    if smoothed > factor * max(chance, lowest):
        return "blowup", len(losses) - 1
    if past_first_epoch and smoothed > factor * chance:
        return "stuck_above_chance", len(losses) - 1
    return None, -1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _progress_kwargs() -> dict:
    # Under papermill/Jupyter stderr is not a terminal: refresh rarely so the executed notebook
    # holds one bar, not a line per step.
    tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    return {"mininterval": 0.5 if tty else 15.0, "file": sys.stderr, "dynamic_ncols": tty, "ascii": not tty}


# ----------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------

def train(cfg: dict, rd: RunDir | None = None) -> dict:
    """Train one resolved config; write records to `rd` after every epoch. Returns the status."""
    device = torch.device(cfg["device"])
    configure_backends(cfg)  # TF32, cuDNN autotuning, determinism: process-wide, set for every run
    seed_everything(cfg["seed"])
    data = load_data(cfg, device)
    model = build_model(cfg, data.mean, data.std, data.num_classes).to(device)
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(param_groups(model, cfg), cfg)
    spe = steps_per_epoch(len(data.y_train), cfg["batch_size"], cfg["drop_last"])
    total = spe * cfg["epochs"]
    # one multiplier per group: an absolute final_lr is a different fraction of each start lr
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda s, lr0=g["lr"]: lr_at(s, total, cfg, spe, lr0)
                                                    for g in opt.param_groups])
    fwd = torch.compile(model) if cfg["compile"] else model
    use_bf16 = cfg["precision"] == "bf16"

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    gen = torch.Generator(device=device).manual_seed(cfg["seed"])  # order + augmentation
    # Fixed training batches (stored order, no augmentation, no RNG): affine_bn_init's
    # initialization batch and the batches of precise evaluation statistics.
    # Built only for nets with batch statistics or data-initialized layers (start-up cost).
    needs_stats = bnstats.has_running_stats(model) or any(getattr(m, "data_init", False) for m in model.modules())
    stat_batches = [to_input(xb, cfg["channels_last"])
                    for xb in fixed_batches(data.x_train, cfg["batch_size"], cfg["precise_batches"])] if needs_stats else []

    def fwd_autocast(xb):
        with autocast():
            return fwd(xb)

    if stat_batches:
        bnstats.init_from_batch(model, stat_batches[0], fwd_autocast)  # no-op unless norm=affine_bn_init

    def eval_stats():  # BN's running statistics, or exact ones recomputed with the current weights
        if cfg["bn_eval_stats"] == "precise":
            return bnstats.precise_bn(model, stat_batches, fwd_autocast)
        return contextlib.nullcontext()

    tracker = NormTracker(model)
    epochs, steps, norms = [], [], tracker.snapshot(0)
    n_probe = min(cfg["probe_batch_size"], len(data.y_train))  # P3-P5 measurements: bnlib.probes
    def loss_fn(logits, target):  # the training loss; probes measure the same one
        return F.cross_entropy(logits.float(), target, label_smoothing=cfg["label_smoothing"])

    probes = ProbeRunner(cfg, model, opt, loss_fn,
                         (to_input(data.x_train[:n_probe], cfg["channels_last"]), data.y_train[:n_probe]), spe, [gen])
    status = {"status": "running", "diverged_step": None}
    init_loss, step, t_start, first_epoch = None, 0, time.perf_counter(), 1
    lowest = math.inf  # lowest smoothed loss so far (divergence reference)
    ckpt = rd.path / "checkpoint.pt" if rd is not None else None
    if ckpt is not None and ckpt.exists():  # resume an interrupted run where its last epoch ended
        state = load_checkpoint(ckpt)  # on the CPU; load_state_dict moves what belongs on the device
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        set_rng_states(state, gen, device)
        tracker.init = [t.to(device) for t in state["tracker_init"]]
        epochs, steps, norms = state["epochs"], state["steps"], state["norms"]
        init_loss, step, first_epoch = state["init_loss"], state["step"], state["epoch"] + 1
        lowest = state.get("lowest", math.inf)
        probes.restore(state.get("probes", []))
        status["resumed_from_epoch"] = state["epoch"]
    bar = tqdm(total=total, initial=step, desc=cfg.get("_desc", "train"), disable=not cfg["progress"], **_progress_kwargs())
    recent = []  # per-step loss tensors since the last host read (checked for divergence)

    def read_back(step, epoch, lr, gnorm):
        """One host read every `log_every` steps: log this step, check every recent step."""
        nonlocal init_loss, lowest
        vals = torch.stack([*recent, gnorm]).float().cpu().tolist()
        losses, g = vals[:-1], vals[-1]
        first = step - len(losses) + 1
        init_loss = losses[0] if init_loss is None else init_loss
        window_mean = sum(losses) / len(losses)
        steps.append({"step": step, "epoch": epoch, "loss": losses[-1], "loss_window_mean": window_mean,
                      "lr_now": lr, "grad_norm": g})
        recent.clear()
        rule, j = divergence(losses, min(lowest, init_loss), epoch > 1, data.num_classes, cfg["diverge_factor"])
        if math.isfinite(window_mean):
            lowest = min(lowest, window_mean)
        if rule is not None:
            status.update(diverged_rule=rule, diverged_loss=losses[j], diverged_meaning=DIVERGENCE_RULES[rule])
        return (first + j if rule else None), losses[-1]

    model.train()
    for epoch in range(first_epoch, cfg["epochs"] + 1):
        t0 = time.perf_counter()
        perm = torch.randperm(len(data.y_train), device=device, generator=gen)
        train_loss = torch.zeros((), device=device)
        train_correct = torch.zeros((), device=device, dtype=torch.long)
        for i in range(spe):
            idx = perm[i * cfg["batch_size"]:(i + 1) * cfg["batch_size"]]
            x = to_input(augment(data.x_train[idx], cfg["crop_pad"], cfg["flip"], gen), cfg["channels_last"])
            y = data.y_train[idx]
            probes.at(step, x, y)  # the probes due before this update (init, every k, probe_steps)
            with autocast():
                out = fwd(x)
            loss = loss_fn(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            log_now = step % cfg["log_every"] == 0 or i == spe - 1
            if log_now:  # total gradient norm, before the step that uses it
                grads = [p.grad for p in model.parameters() if p.grad is not None]
                gnorm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
                lr_now = opt.param_groups[-1]["lr"]
            opt.step()
            sched.step()
            recent.append(loss.detach())
            train_loss += loss.detach()
            train_correct += (out.argmax(1) == y).sum()
            step += 1
            bar.update(1)
            if log_now:
                bad_step, last = read_back(step - 1, epoch, lr_now, gnorm)
                bar.set_postfix(epoch=epoch, loss=f"{last:.3f}", refresh=False)
                if bad_step is not None:
                    status.update(status="diverged", diverged_step=bad_step)
                    break
        seconds = time.perf_counter() - t0 - probes.take_seconds()  # training only
        probes.at(step, x, y, epoch_end=True)  # every requested probe at every epoch end
        n_seen = min((i + 1) * cfg["batch_size"], len(data.y_train))  # a kept last batch is partial
        with eval_stats():
            val_loss, val_acc = evaluate(fwd, data.x_val, data.y_val, cfg, autocast)
            test_loss, test_acc = evaluate(fwd, data.x_test, data.y_test, cfg, autocast)
        epochs.append({"epoch": epoch, "step": step, "lr_now": opt.param_groups[-1]["lr"],
                       "train_loss": train_loss.item() / (i + 1), "train_acc": train_correct.item() / n_seen,
                       "val_loss": val_loss, "val_acc": val_acc, "test_loss": test_loss, "test_acc": test_acc,
                       "seconds": seconds, "img_per_s": n_seen / seconds})
        norms += tracker.snapshot(epoch)
        if rd is not None:
            _write_tables(rd, epochs, steps, norms)
            if probes:
                rd.write_table("probes", probes.frame())
            if status["status"] == "running" and epoch < cfg["epochs"]:
                save_checkpoint(ckpt, {  # + every RNG state (bnlib.checkpoint)
                    "epoch": epoch, "step": step, "init_loss": init_loss, "lowest": lowest, "model": model.state_dict(),
                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "tracker_init": tracker.init,
                    "epochs": epochs, "steps": steps, "norms": norms, "probes": probes.rows}, gen, device)
        bar.set_postfix(epoch=epoch, loss=f"{epochs[-1]['train_loss']:.3f}", val_acc=f"{val_acc:.3f}")
        if status["status"] == "diverged":
            break
    bar.close()
    status["metrics"] = headline(epochs)
    if bnstats.has_running_stats(model) and epochs:  # the other kind of evaluation statistics, once, at the end
        own = cfg["bn_eval_stats"]
        other = next(k for k in bnstats.EVAL_STATS if k != own)
        status["metrics"][f"final_test_acc_{own}"] = epochs[-1]["test_acc"]
        with bnstats.precise_bn(model, stat_batches, fwd_autocast) if other == "precise" else contextlib.nullcontext():
            status["metrics"][f"final_test_acc_{other}"] = evaluate(fwd, data.x_test, data.y_test, cfg, autocast)[1]
    if rd is not None:
        rd.write_table("channels", tracker.channels())
    if ckpt is not None:
        ckpt.unlink(missing_ok=True)  # the records are complete; the checkpoint only served resuming
    if status["status"] == "running":
        status["status"] = "completed"
    status["total_seconds"] = time.perf_counter() - t_start
    status["data_sizes"] = data.sizes()
    return status


def headline(epochs: list[dict]) -> dict:
    """Best validation accuracy and the test accuracy *at that epoch* (model selection on
    validation, never on test), plus final losses."""
    finite = [e for e in epochs if math.isfinite(e["val_acc"])]
    if not finite:
        return {}
    best = max(finite, key=lambda e: e["val_acc"])
    last = epochs[-1]
    return {"best_val_acc": best["val_acc"], "best_epoch": best["epoch"], "test_acc_at_best_val": best["test_acc"],
            "final_train_loss": last["train_loss"], "final_val_loss": last["val_loss"],
            "final_test_acc": last["test_acc"], "epochs_run": last["epoch"]}


def _write_tables(rd: RunDir, epochs, steps, norms) -> None:
    rd.write_table("epochs", epochs)
    rd.write_table("steps", steps)
    rd.write_table("norm_params", norms if norms else
                   {"epoch": [], "depth": [], "layer": [], "param": [], "mean": [], "std": [], "min": [],
                    "max": [], "mean_abs_delta": []})


class RunResult(dict):
    """status.json contents plus `run_dir`; returned by `run()`."""

    @property
    def run_dir(self) -> Path:
        return Path(self["run_dir"])


def is_out_of_memory(e: BaseException) -> bool:
    """CUDA's OutOfMemoryError, the CPU allocator's "can't allocate memory" (e.g. under a ulimit
    or cgroup limit), MPS's "out of memory", or Python's MemoryError."""
    msg = str(e).lower()
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in msg \
        or "can't allocate memory" in msg


def run(params: dict | None = None, rerun: bool = False, **kw) -> RunResult:
    """Validate, make the run directory, train, record. A completed or diverged run already on
    disk is returned as it is unless `rerun`; an interrupted or failed one resumes from its last
    epoch checkpoint. Bad parameters, a data set that cannot be loaded or an unwritable outputs
    folder raise ConfigError before anything is written; a run held by another live process
    raises RunLocked."""
    cfg = validate(params, **kw)
    rid = run_id(cfg)
    out_dir = Path(cfg["out_dir"]).expanduser()
    rd = RunDir(out_dir / rid)
    old = rd.status() if rd.path.exists() else None
    if old is None and (rd.path / "status.json").exists():  # unreadable or of the wrong shape: damaged
        print(f"run {rid}: records damaged ({rd.verify()}); running it again", file=sys.stderr)
    finished = bool(old) and old.get("status") in FINISHED
    problem = rd.verify() if finished else None
    if problem:
        print(f"run {rid}: records damaged ({problem}); running it again", file=sys.stderr)
        rerun = True
    elif finished and not rerun:
        if cfg["progress"]:
            print(f"run {rid}: already {old['status']}; loaded from {rd.path}", file=sys.stderr)
        return RunResult({**old, "run_dir": str(rd.path)})
    check_writable(out_dir)  # creates nothing; then the data set (which may stage files into data_dir)
    check_data(cfg)
    rd.path.mkdir(parents=True, exist_ok=True)
    lock = rd.lock()  # one process per run directory at a time
    try:
        lock.acquire(timeout=2)  # not 0: a reader probing the lock (load_runs) holds it for microseconds
    except Timeout:
        raise RunLocked(f"run {rid} is being run by another process ({rd.path})") from None
    try:
        ckpt = rd.path / "checkpoint.pt"
        if not rerun and ckpt.exists() and (bad_ckpt := checkpoint_problem(ckpt)):
            # one checkpoint is kept (the last finished epoch): a damaged one means starting afresh
            print(f"run {rid}: checkpoint damaged ({bad_ckpt}); starting the run again from scratch",
                  file=sys.stderr)
            rerun = True
        if rerun:
            (rd.path / "checkpoint.pt").unlink(missing_ok=True)
        if not (rd.path / "checkpoint.pt").exists():
            for t in ("epochs", "steps", "norm_params", "probes"):  # a fresh start writes its tables afresh
                (rd.path / f"{t}.parquet").unlink(missing_ok=True)
        configure_backends(cfg)  # before the provenance, which records the flags in force
        rd.write_json("config", config_record(rd, rid, cfg, resuming=(rd.path / "checkpoint.pt").exists()))
        started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        rd.write_json("status", {"status": "running", "started": started, "pid": os.getpid(),
                                 "hostname": socket.gethostname()})
        try:
            status = train({**cfg, "_desc": rid[:40]}, rd)
        except BaseException as e:
            reason = f"{type(e).__name__}: {e}"
            if is_out_of_memory(e):
                reason = f"out of memory: {reason}"
            # Ctrl-C (or a kernel interrupt in JupyterLab) is not a failure of the run
            rd.write_json("status", {"status": "interrupted" if isinstance(e, KeyboardInterrupt) else "failed",
                                     "started": started,
                                     "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "error": reason,
                                     "traceback": traceback.format_exc()})
            raise
        status.update(started=started, finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        rd.write_json("status", status)
    finally:
        lock.release()
    return RunResult({**status, "run_dir": str(rd.path)})
