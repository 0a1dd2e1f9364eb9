"""The run config: every parameter of a run, its type, default, accepted values and meaning.

One place for defaults. The `parameters` cell of notebooks/run.ipynb carries the same names
and values (a test checks that they agree), the CLI flags are generated from this table, and
`validate()` checks a parameter set once, before any data is loaded or anything is written,
with messages that name the parameter, the bad value and what is accepted.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from .models import CONV_INITS, INPUT_NORMS, SHORTCUTS, parse_arch
from .bnstats import EVAL_STATS
from .device import PRECISIONS, cpu_has_native_bf16, precisions_for, resolve_device, resolve_precision
from .norms import NORMS, norm_names

__all__ = ["RunConfig", "ConfigError", "validate", "resolve_device", "resolve_precision",
           "cpu_has_native_bf16", "IDENTITY_EXCLUDED", "param_help"]

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")
DATASET_NAMES = ("synthetic", "fashion_mnist", "cifar10", "cifar100")
TRAIN_POOL = {"fashion_mnist": 60000, "cifar10": 50000, "cifar100": 50000}  # file data sets: training images


def _p(default, help, choices=None, lo=None, hi=None, lo_open=False, hi_open=False, nullable=False,
       items="number"):
    """A RunConfig field: default, help text, accepted choices (or a callable giving them) and
    range [lo, hi] (open at an end when lo_open/hi_open); a list field's `items` are "number",
    "int" or "str"."""
    md = dict(help=help, choices=choices, lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open, nullable=nullable,
              items=items)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=md)
    return field(default=default, metadata=md)


@dataclass
class RunConfig:
    # --- model -------------------------------------------------------------------------------
    norm: str = _p("bn", "normalization layer (bnlib.norms registry)", choices=norm_names)
    arch: str = _p("resnet18", "resnet18/34/50/101/152 (torchvision tables) or resnet{6n+2} (CIFAR family)")
    width: float = _p(0.25, "channel width multiplier (1.0 = the paper's widths)", lo=0, lo_open=True)
    stem: str = _p("cifar", "'cifar': 3x3/1 conv, no max-pool; 'imagenet': 7x7/2 + max-pool",
                   choices=("cifar", "imagenet"))
    gamma0: float = _p(1.0, "initial γ of every norm that has one (P2 recommends 0.1)")
    zero_init_last_gamma: bool = _p(False, "γ=0 for the last norm of each residual branch")
    residual_gain: bool = _p(False, "P5 SkipInit: scalar α at the end of each residual branch")
    alpha0: float = _p(0.0, "initial α of the residual gains (SkipInit: 0)")
    alpha_learnable: bool = _p(True, "α learned (True) or fixed (P5 ablation)")
    conv_init: str = _p("kaiming_fan_in", "conv weight init", choices=CONV_INITS)
    input_norm: str = _p("dataset", "'dataset': true mean/std; 'raw': [0,1] pixels; 'bn': P2 online BN",
                         choices=INPUT_NORMS)
    bn_eps: float = _p(1e-5, "ε of batch-statistics norms", lo=0, lo_open=True)
    bn_momentum: float = _p(0.1, "running-stat momentum: r <- (1-m)·r + m·stat", lo=0, hi=1)
    bn_eval_stats: str = _p("running", "statistics of batch-statistics norms at evaluation: 'running' "
                            "(PyTorch's, the papers' default) or 'precise' (recomputed with the final weights "
                            "over precise_batches training batches; for short runs, where running stats lag)",
                            choices=EVAL_STATS)
    precise_batches: int = _p(16, "bn_eval_stats='precise': training batches the statistics are computed on",
                              lo=1)
    shortcut: str = _p("B", "where a block changes shape: 'B' 1x1 projection + norm; 'A' identity with stride "
                       "and zero-padded channels, no parameters (He et al. 2016; basic-block nets only)",
                       choices=SHORTCUTS)
    # --- data --------------------------------------------------------------------------------
    dataset: str = _p("synthetic", "embedded synthetic set (no files), or Fashion-MNIST / CIFAR through torchvision",
                      choices=DATASET_NAMES)
    data_dir: str = _p("~/data", "where data set files are (or are downloaded to)")
    download: bool = _p(True, "try to download a data set when absent")
    synthetic_size: int = _p(20000, "training-pool size of the synthetic set (test: a fifth)", lo=10)
    n_train: int = _p(None, "cap on training images after the validation split (None: all)",
                      lo=1, nullable=True)
    n_test: int = _p(None, "cap on test images (None: all)", lo=1, nullable=True)
    val_fraction: float = _p(0.1, "stratified validation split carved from train", lo=0, hi=1,
                             lo_open=True, hi_open=True)
    data_seed: int = _p(0, "seed of the synthetic data and of the splits (not of training)", lo=0)
    crop_pad: int = _p(4, "random-crop padding in pixels (0: no crop)", lo=0, hi=16)
    flip: bool = _p(True, "random horizontal flip")
    # --- optimization ------------------------------------------------------------------------
    optimizer: str = _p("sgd", "optimizer", choices=OPTIMIZERS)
    lr: float = _p(0.1, "base learning rate (weights); groups scale it", lo=0, lo_open=True)
    momentum: float = _p(0.9, "SGD momentum / AdamW β1", lo=0, hi=1, hi_open=True)
    nesterov: bool = _p(False, "Nesterov momentum (SGD)")
    weight_decay: float = _p(5e-4, "weight decay on conv/linear weights", lo=0)
    gamma_lr_mult: float = _p(1.0, "lr multiplier for norm scales γ (P2: 1/c); α has alpha_lr_mult",
                              lo=0, lo_open=True)
    gamma_wd: float = _p(0.0, "weight decay on norm scales γ", lo=0)
    alpha_lr_mult: float = _p(1.0, "lr multiplier for SkipInit residual gains α", lo=0, lo_open=True)
    alpha_wd: float = _p(0.0, "weight decay on residual gains α", lo=0)
    bias_lr_mult: float = _p(1.0, "lr multiplier for biases (norm β, classifier bias)", lo=0, lo_open=True)
    bias_wd: float = _p(0.0, "weight decay on biases", lo=0)
    schedule: str = _p("cosine", "lr schedule, per step", choices=SCHEDULES)
    final_lr_frac: float = _p(0.0, "cosine: final lr as a fraction of the start lr", lo=0, hi=1)
    step_milestones: list = _p([0.5, 0.75], "step: fractions of training where lr drops")
    step_gamma: float = _p(0.1, "step: lr factor at each milestone", lo=0, lo_open=True)
    warmup_epochs: float = _p(0.0, "linear warm-up from 0, in epochs", lo=0)
    label_smoothing: float = _p(0.0, "cross-entropy label smoothing", lo=0, hi=1, hi_open=True)
    batch_size: int = _p(128, "training batch size", lo=1)
    epochs: int = _p(2, "training epochs", lo=1)
    # --- probes ------------------------------------------------------------------------------
    probes: list = _p([], "measurements inside training (bnlib.probes registry): 'name', or 'name@k' to run "
                      "that probe every k steps; each runs at init and at every epoch end", items="str")
    probe_every: int = _p(None, "also run every requested probe every k steps (None: each probe's own default)",
                          lo=1, nullable=True)
    probe_steps: list = _p([], "also run every requested probe at these steps (optimizer updates done)",
                           items="int")
    probe_batch_size: int = _p(256, "fixed probe batch: the first k training images, not augmented", lo=1)
    probe_step_sizes: list = _p([1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0],
                                "step_size_loss: SGD step sizes s (P4 Fig. 4: log grid 1e-6 ... 1)")
    probe_layer: int = _p(None, "layer_grads: conv index (bnlib.models.conv_layers) of the gradient histogram "
                          "(None: the middle conv)", lo=0, nullable=True)
    # --- run ---------------------------------------------------------------------------------
    seed: int = _p(0, "training seed (init, order, augmentation)", lo=0)
    device: str = _p("auto", "'auto' (cuda > mps > cpu), or a torch device like 'cpu', 'cuda:0'")
    precision: str = _p("auto", "'fp32': IEEE fp32 (TF32 off on CUDA); 'tf32': CUDA only, TF32 convs/matmuls; "
                        "'bf16': bf16 autocast; 'auto': bf16 where native (CUDA capability >= 8.0, CPUs with "
                        "AVX512_BF16/AMX), else fp32 (bnlib.device)", choices=PRECISIONS)
    channels_last: bool = _p(True, "channels_last memory format for model and inputs")
    compile: bool = _p(False, "torch.compile the model (~50 s compile on CPU, little gain there)")
    deterministic: bool = _p(False, "bit-exact reruns on CUDA: deterministic kernels, no cuDNN autotuning "
                             "(slower); off: cuDNN autotunes, reruns agree up to kernel non-determinism")
    diverge_factor: float = _p(10.0, "diverged when the smoothed loss > factor × max(ln K, its lowest so far), "
                               "or > factor × ln K after the first epoch, or non-finite (bnlib.train.divergence)",
                               lo=1, lo_open=True)
    log_every: int = _p(10, "record loss, lr and grad norm every k steps", lo=1)
    eval_batch_size: int = _p(1000, "batch size for validation/test evaluation", lo=1)
    out_dir: str = _p("outputs/runs", "where run directories are written")
    progress: bool = _p(True, "show a progress bar")


# Parameters that do not change what a run computes: left out of its identity (run id).
IDENTITY_EXCLUDED = ("out_dir", "progress", "data_dir", "download")


class ConfigError(ValueError):
    """A bad parameter set; the message lists every problem, one line each."""


def param_help() -> dict[str, str]:
    return {f.name: f.metadata["help"] for f in fields(RunConfig)}


def _typename(t, items="number") -> str:
    return {"str": "a string", "float": "a number", "int": "an integer", "bool": "true/false",
            "list": {"number": "a list of numbers", "int": "a list of integers", "str": "a list of strings"}[items]}[t]


def _is_item(x, items: str) -> bool:
    if items == "str":
        return isinstance(x, str)
    if isinstance(x, bool):
        return False
    return isinstance(x, int) if items == "int" else isinstance(x, (int, float))


def _check_field(f, v) -> str | None:
    """Return an error line for value v of field f, or None. Types are strict: no silent
    coercion of strings to numbers, no bools as numbers."""
    md, t = f.metadata, f.type
    if v is None:
        return None if md["nullable"] else f"{f.name}={v!r}: must be {_typename(t, md['items'])}"
    ok = {"str": isinstance(v, str),
          "bool": isinstance(v, bool),
          "int": isinstance(v, int) and not isinstance(v, bool),
          "float": isinstance(v, (int, float)) and not isinstance(v, bool),
          "list": isinstance(v, (list, tuple)) and all(_is_item(x, md["items"]) for x in v)}[t]
    if not ok:
        return f"{f.name}={v!r} ({type(v).__name__}): must be {_typename(t, md['items'])}" + \
            (" or None" if md["nullable"] else "")
    choices = md["choices"]() if callable(md["choices"]) else md["choices"]
    if choices is not None and v not in choices:
        return f"{f.name}={v!r}: not a valid choice; valid choices: {list(choices)}"
    if t in ("int", "float"):
        try:
            finite = math.isfinite(float(v))
        except OverflowError:
            finite = False
        if not finite:
            return f"{f.name}={v!r}: must be a finite number"
        lo, hi = md["lo"], md["hi"]
        if lo is not None and (v <= lo if md["lo_open"] else v < lo) or \
                hi is not None and (v >= hi if md["hi_open"] else v > hi):
            lo_s = "" if lo is None else f"{'>' if md['lo_open'] else '>='} {lo}"
            hi_s = "" if hi is None else f"{'<' if md['hi_open'] else '<='} {hi}"
            return f"{f.name}={v!r}: out of range; must be {' and '.join(s for s in (lo_s, hi_s) if s)}"
    return None


def _check_device(device: str) -> str | None:
    if device == "auto":
        return None
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        return f"device={device!r}: not a torch device; valid choices: 'auto', 'cpu', 'cuda', 'cuda:N', 'mps'"
    if d.type == "cuda":
        if not torch.cuda.is_available():
            return f"device={device!r}: CUDA is not available on this machine; use 'auto' or 'cpu'"
        if d.index is not None and d.index >= torch.cuda.device_count():
            return f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s) here"
    elif d.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            return f"device={device!r}: MPS is not available on this machine; use 'auto' or 'cpu'"
    elif d.type != "cpu":
        return f"device={device!r}: valid choices: 'auto', 'cpu', 'cuda', 'cuda:N', 'mps'"
    return None


def validate(params: dict[str, Any] | None = None, **kw) -> dict[str, Any]:
    """Check a parameter set and return the full config (defaults filled in, device and
    precision resolved). Raises ConfigError listing every problem. Nothing is touched on disk."""
    params = {**(params or {}), **kw}
    known = {f.name: f for f in fields(RunConfig)}
    errors = [f"unknown parameter {k!r}; valid parameters: {sorted(known)}" for k in params if k not in known]
    cfg = {**{k: v for k, v in RunConfig().__dict__.items()}, **{k: v for k, v in params.items() if k in known}}
    for name, f in known.items():
        if (e := _check_field(f, cfg[name])) is not None:
            errors.append(e)
    bad = {e.split("=")[0] for e in errors}
    if "arch" not in bad:
        try:
            parse_arch(cfg["arch"])
        except ValueError as e:
            errors.append(str(e))
    if "device" not in bad and (e := _check_device(cfg["device"])):
        errors.append(e)
        bad.add("device")
    if not bad & {"norm", "zero_init_last_gamma"} and cfg["zero_init_last_gamma"] and not NORMS[cfg["norm"]].has_gamma:
        errors.append(f"zero_init_last_gamma=True: norm={cfg['norm']!r} has no γ; valid norms for it: "
                      f"{[k for k, s in NORMS.items() if s.has_gamma]}")
    if not bad & {"norm", "batch_size"} and NORMS[cfg["norm"]].batch_stats and cfg["batch_size"] < 2:
        errors.append(f"batch_size={cfg['batch_size']}: norm={cfg['norm']!r} uses batch statistics and "
                      f"needs batch_size >= 2")
    if not bad & {"device", "precision"}:
        dev_type = resolve_device(cfg["device"]).type
        if cfg["precision"] not in precisions_for(dev_type):
            errors.append(f"precision={cfg['precision']!r}: TF32 is a CUDA tensor-core format, not available on "
                          f"device {cfg['device']!r} ({dev_type}); valid choices here: {list(precisions_for(dev_type))}")
    if not bad & {"step_milestones"} and any(not 0 < m < 1 for m in cfg["step_milestones"]):
        errors.append(f"step_milestones={cfg['step_milestones']!r}: each must be a fraction in (0, 1)")
    if not bad & {"shortcut", "arch"} and cfg["shortcut"] == "A" and parse_arch(cfg["arch"])[0] != "basic":
        errors.append(f"shortcut='A' with arch={cfg['arch']!r} (bottleneck blocks): option A is for basic-block "
                      f"nets; valid choices here: ['B']")
    from .probes import check_probe_params  # the probe registry validates its own parameters
    errors += check_probe_params(cfg, bad)
    if not bad & {"dataset", "synthetic_size", "val_fraction", "n_train", "batch_size"}:
        synthetic = cfg["dataset"] == "synthetic"
        pool = cfg["synthetic_size"] if synthetic else TRAIN_POOL[cfg["dataset"]]
        n_val = round(cfg["val_fraction"] * pool)  # exactly what data.stratified_split takes
        n = pool - n_val
        if n_val < 1:
            errors.append(f"val_fraction={cfg['val_fraction']}: leaves no validation image out of the {pool} "
                          f"training-pool images (model selection needs one); must be >= {1 / pool:.3g} here, "
                          f"or make the pool larger")
        n = min(n, cfg["n_train"]) if cfg["n_train"] is not None else n
        if cfg["batch_size"] > n:
            errors.append(f"batch_size={cfg['batch_size']}: larger than the {n} training images "
                          f"(dataset={cfg['dataset']!r}" + (f", synthetic_size={cfg['synthetic_size']}" if synthetic else "")
                          + f", n_train={cfg['n_train']}, val_fraction={cfg['val_fraction']}); must be <= {n}, "
                          f"or make the training set larger")
    if errors:
        raise ConfigError("invalid run parameters:\n  - " + "\n  - ".join(errors))
    cfg["step_milestones"] = [float(m) for m in cfg["step_milestones"]]
    cfg["probe_step_sizes"] = [float(m) for m in cfg["probe_step_sizes"]]
    cfg["probes"], cfg["probe_steps"] = list(cfg["probes"]), sorted({int(m) for m in cfg["probe_steps"]})
    for name, f in known.items():  # ints given for floats are stored as floats (stable run ids)
        if f.type == "float" and cfg[name] is not None:
            cfg[name] = float(cfg[name])
    dev = resolve_device(cfg["device"])
    cfg["device"] = str(dev)
    cfg["precision"] = resolve_precision(cfg["precision"], dev)
    cfg["out_dir"] = os.fspath(cfg["out_dir"])
    return cfg
