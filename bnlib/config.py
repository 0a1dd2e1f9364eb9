"""The run config: every parameter of a run, its type, default, accepted values and meaning.

One place for defaults. The `parameters` cell of notebooks/run.ipynb carries the same names
and values (a test checks that they agree), the CLI flags are generated from this table, and
`validate()` checks a parameter set once, before any data is loaded or anything is written,
with messages that name the parameter, the bad value and what is accepted.
"""
from __future__ import annotations

import functools
import math
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from .models import CONV_INITS, INPUT_NORMS, SHORTCUTS, arch_spec, parse_arch
from .bnstats import EVAL_STATS
from .bn_variants import NOISE_PER
from .errors import ConfigError
from .device import PRECISIONS, cpu_has_native_bf16, precisions_for, resolve_device, resolve_precision
from .norms import NORMS, norm_names

__all__ = ["RunConfig", "ConfigError", "validate", "resolve_device", "resolve_precision",
           "cpu_has_native_bf16", "IDENTITY_EXCLUDED", "param_help"]

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")
DATASET_NAMES = ("synthetic", "fashion_mnist", "cifar10", "cifar100")
TRAIN_POOL = {"fashion_mnist": 60000, "cifar10": 50000, "cifar100": 50000}  # file data sets: training images
# What the code can really take (issue 15). Every number a run uses becomes a float32 tensor
# value or scalar somewhere (weights, optimizer hyper-parameters, the lr schedule; bf16 has the
# same range), and torch refuses a finite float beyond float32's range ("value cannot be
# converted to type float without overflow"): such values are refused here, not crashed on
# after the run folder exists. Seeds: NumPy's legacy seed takes [0, 2**32 - 1].
FP32_MAX = float(torch.finfo(torch.float32).max)
SEED_MAX = 2**32 - 1


def _p(default, help, choices=None, lo=None, hi=None, lo_open=False, hi_open=False, nullable=False,
       items="number", path=False):
    """A RunConfig field: default, help text, accepted choices (or a callable giving them) and
    range [lo, hi] (open at an end when lo_open/hi_open); a list field's `items` are "number",
    "int" or "str"."""
    md = dict(help=help, choices=choices, lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open, nullable=nullable, path=path,
              items=items)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=md)
    return field(default=default, metadata=md)


@dataclass
class RunConfig:
    # --- model -------------------------------------------------------------------------------
    norm: str = _p("bn", "normalization layer (bnlib.norms registry)", choices=norm_names)
    arch: str = _p("resnet18", "resnet18/34/50/101/152 (torchvision tables), resnet{6n+2} (CIFAR family) or "
                   "wrn{6n+4}_{k} (pre-activation Wide-ResNet WRN-d-k, e.g. wrn16_4, wrn28_10, wrn1000_1)")
    width: float = _p(0.25, "channel width multiplier (1.0 = the paper's widths)", lo=0, lo_open=True)
    stem: str = _p("cifar", "'cifar': 3x3/1 conv, no max-pool; 'imagenet': 7x7/2 + max-pool",
                   choices=("cifar", "imagenet"))
    gamma0: float = _p(1.0, "initial γ of every norm that has one (P2 recommends 0.1)")
    zero_init_last_gamma: bool = _p(False, "γ=0 for the last norm of each residual branch")
    zero_bias: bool = _p(False, "every bias starts at 0: the classifier's (norm β start at 0 anyway; P2's authors "
                         "zero every bias); False: PyTorch's default uniform init of the classifier bias")
    residual_gain: bool = _p(False, "P5 SkipInit: scalar α at the end of each residual branch")
    alpha0: float = _p(0.0, "initial α of the residual gains (SkipInit: 0)")
    alpha_learnable: bool = _p(True, "α learned (True) or fixed (P5 ablation)")
    dropout: float = _p(0.0, "dropout rate between the two 3x3 convs of each basic/pre-activation block "
                        "(Wide-ResNets, e.g. 0.3); 0: no dropout layer", lo=0, hi=1, hi_open=True)
    fc_dropout: float = _p(0.0, "dropout rate before the classifier (P5's regularized SkipInit); 0: none",
                           lo=0, hi=1, hi_open=True)
    conv_bias: bool = _p(False, "a bias in every conv, initialized at 0 (P5's regularized SkipInit, no norm)")
    checkpoint_blocks: bool = _p(False, "recompute each residual block in the backward pass (activation "
                                 "checkpointing: memory at depth ~1000; same gradients, ~1/3 more compute)")
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
    # options of single norms (each entry's NormSpec.options; bnlib/bn_variants.py says why)
    noise_mean_range: float = _p(0.5, "noisy_bn: per layer and step the noise mean μ ~ U(-a, a) (Santurkar et al. "
                                 "2018: 0.5)", lo=0)
    noise_scale_max: float = _p(1.25, "noisy_bn: per layer and step the noise scale σ ~ U(1, b) (Santurkar: 1.25)",
                                lo=1)
    noise_mean_spread: float = _p(0.1, "noisy_bn: per element the additive noise m ~ U(μ - r, μ + r) (Santurkar: 0.1)",
                                  lo=0)
    noise_scale_std: float = _p(0.1, "noisy_bn: per element the multiplicative noise s ~ N(σ, r²) (Santurkar: 0.1)",
                                lo=0)
    noise_per: str = _p("layer", "noisy_bn: μ, σ drawn once per layer per step ('layer', as the P3 spec reads "
                        "Santurkar) or per channel per step ('channel')", choices=NOISE_PER)
    norm_groups: int = _p(8, "group_norm: groups of channels (Wu & He 2018 use 32; must divide every channel "
                          "count of the net at its width)", lo=1)
    ghost_batch_size: int = _p(32, "ghost_bn: samples per virtual batch (must divide batch_size; = batch_size: BN)",
                               lo=2)
    renorm_r_max: float = _p(3.0, "batch_renorm: r clipped to [1/r_max, r_max] (Ioffe 2017's final value 3; 1: BN)",
                             lo=1)
    renorm_d_max: float = _p(5.0, "batch_renorm: d clipped to [-d_max, d_max] (Ioffe 2017's final value 5; 0: BN)",
                             lo=0)
    renorm_warmup_steps: int = _p(100, "batch_renorm: steps over which the limits grow linearly from (1, 0) to "
                                  "(r_max, d_max) (0: fixed from the start)", lo=0)
    # --- data --------------------------------------------------------------------------------
    dataset: str = _p("synthetic", "embedded synthetic set (no files), or Fashion-MNIST / CIFAR through torchvision",
                      choices=DATASET_NAMES)
    data_dir: str = _p("~/data", "where data set files are (or are downloaded to)", path=True)
    download: bool = _p(True, "try to download a data set when absent")
    synthetic_size: int = _p(20000, "training-pool size of the synthetic set (test: a fifth)", lo=10)
    n_train: int = _p(None, "cap on training images after the validation split (None: all)",
                      lo=1, nullable=True)
    n_test: int = _p(None, "cap on test images (None: all)", lo=1, nullable=True)
    val_fraction: float = _p(0.1, "stratified validation split carved from train", lo=0, hi=1,
                             lo_open=True, hi_open=True)
    data_seed: int = _p(0, "seed of the synthetic data and of the splits (not of training)", lo=0, hi=SEED_MAX)
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
    final_lr: float = _p(None, "cosine: final lr of every group, absolute (P2's authors: 1e-8), instead of "
                         "final_lr_frac (which must then be 0); None: use final_lr_frac", lo=0, nullable=True)
    step_milestones: list = _p([0.5, 0.75], "step: fractions of training where lr drops")
    step_gamma: float = _p(0.1, "step: lr factor at each milestone", lo=0, lo_open=True)
    warmup_epochs: float = _p(0.0, "linear warm-up from 0, in epochs", lo=0)
    label_smoothing: float = _p(0.0, "cross-entropy label smoothing", lo=0, hi=1, hi_open=True)
    batch_size: int = _p(128, "training batch size", lo=1)
    drop_last: bool = _p(True, "drop each epoch's last partial batch (True: every step sees batch_size images); "
                         "False keeps it, as P2's authors' DataLoader does")
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
    probe_ics_layers: list = _p([], "ics: conv indices (bnlib.models.conv_layers) whose internal covariate shift "
                                "is measured ([]: every conv; each costs one forward-backward pass)", items="int")
    probe_landscape_steps: list = _p([0.5, 1.0, 2.0, 4.0], "landscape: step sizes along the gradient as multiples of "
                                     "lr (Santurkar et al. 2018 Fig. 4: 0.5 ... 4)")
    # --- run ---------------------------------------------------------------------------------
    seed: int = _p(0, "training seed (init, order, augmentation)", lo=0, hi=SEED_MAX)
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
    out_dir: str = _p("outputs/runs", "where run directories are written", path=True)
    progress: bool = _p(True, "show a progress bar")


# Parameters that do not change what a run computes: left out of its identity (run id).
IDENTITY_EXCLUDED = ("out_dir", "progress", "data_dir", "download")


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
    if md.get("path") and isinstance(v, str) and not v.strip():
        return f"{f.name}={v!r}: an empty path; name a folder ('.' for the current one)"
    if md.get("path") and isinstance(v, str) and "\0" in v:
        return f"{f.name}={v!r}: a path cannot contain a NUL character"
    if t == "list" and isinstance(v, str):  # papermill's -p passes a list as its text
        return (f"{f.name}={v!r} (str): must be {_typename(t, md['items'])}; from papermill pass a list with -y "
                f"(-y '{f.name}: [...]'), on the command line --{f.name} '[...]'")
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
    if t == "list" and md["items"] != "str":
        bad = [x for x in v if not math.isfinite(x) or abs(x) > FP32_MAX]
        if bad:
            return f"{f.name}={v!r}: {bad[0]!r} is not a finite number within float32's range (±{FP32_MAX:.3g})"
    if t in ("int", "float"):
        try:
            finite = math.isfinite(float(v))
        except OverflowError:
            finite = False
        if not finite:
            return f"{f.name}={v!r}: must be a finite number"
        if t == "float" and abs(v) > FP32_MAX:
            return (f"{f.name}={v!r}: out of range; must be within ±{FP32_MAX:.4g} (float32's range: training "
                    f"computes in float32, and torch cannot convert a larger value)")
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


def _plain(v):
    """NumPy scalars and arrays as the Python numbers and lists they hold, path-like objects as
    their path string: accepted wherever a number, a list or a path is (the strict type check
    then sees what it would for the plain value)."""
    import numpy as np

    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray) and v.ndim == 1:
        return v.tolist()
    if isinstance(v, (list, tuple)):
        return type(v)(x.item() if isinstance(x, np.generic) else x for x in v)
    if isinstance(v, os.PathLike):
        try:
            return os.fspath(v)
        except TypeError:
            return v
    return v


@functools.lru_cache(maxsize=64)
def _model_size(arch: str, stem: str, shortcut: str) -> tuple[int, int] | None:
    """(parameters, activation values per 32x32 image) of `arch` at width 1, measured on
    PyTorch's meta device (shapes only, nothing allocated); None when it cannot be measured."""
    from .models import create_model

    try:
        with torch.device("meta"):
            m = create_model(arch, width=1.0, stem=stem, shortcut=shortcut)
            n_act = [0]
            hooks = [mod.register_forward_hook(lambda _m, _i, o: n_act.__setitem__(0, n_act[0] + o.numel())
                                               if isinstance(o, torch.Tensor) else None)
                     for mod in m.modules() if not list(mod.children())]
            m(torch.empty(1, 3, 32, 32))
            for h in hooks:
                h.remove()
        return sum(p.numel() for p in m.parameters()), n_act[0]
    except Exception:  # noqa: BLE001 — an estimate: never block a run on a failure to estimate
        return None


def _memory_limit(device: str) -> tuple[float, str]:
    """Bytes of memory a run can have at most: the GPU's total memory, else the host's RAM."""
    d = resolve_device(device)
    if d.type == "cuda" and torch.cuda.is_available():
        return float(torch.cuda.get_device_properties(d.index or 0).total_memory), f"the GPU ({d})"
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")), "this machine's RAM"
    except (ValueError, OSError, AttributeError):
        return math.inf, "memory"


def _data_shape(cfg: dict) -> tuple[int, int, int, int]:
    """(pixels per image, channels, training-pool images, test images) of the run's data set,
    without loading it: what the memory estimates count."""
    fashion, synthetic = cfg["dataset"] == "fashion_mnist", cfg["dataset"] == "synthetic"
    pool = cfg["synthetic_size"] if synthetic else TRAIN_POOL[cfg["dataset"]]
    return (28 * 28 if fashion else 32 * 32), (1 if fashion else 3), pool, (pool // 5 if synthetic else 10000)


def _memory_bound(cfg: dict) -> float:
    """Bytes a run allocates at most, from the architecture's table alone (no model built): every
    conv taken as the widest one, a 7x7 kernel, at the input's full resolution, with six kept
    tensors of that size per conv (conv, norm, activation, sum, dropout, spare), plus the data
    estimate_memory counts. Loose (often 10-100x), so it only decides that a run surely fits."""
    spec = arch_spec(cfg["arch"])
    expand = 4 if spec.block == "bottleneck" else 1
    cmax = max(1, round(max(spec.widths) * expand * float(cfg["width"]))) + 1
    n_conv = 1 + len(spec.layers) + sum(spec.layers) * (3 if spec.block == "bottleneck" else 2)
    pixels, chans, pool, test = _data_shape(cfg)
    params = n_conv * 49.0 * cmax * cmax + (cmax + 1) * 1000
    acts = n_conv * 6.0 * cmax * pixels * cfg["batch_size"]
    return 16 * params + 4 * acts + 7.0 * (pool + test) * pixels * chans


def estimate_memory(cfg: dict) -> dict[str, float]:
    """Bytes a run will allocate, roughly (within a small factor): the data set
    (uint8 pool + its indexed copy + the float copy its mean/std are computed on), the model
    (weights, gradients, two optimizer moments) and the activations a training batch keeps for
    the backward pass (meta-device count at width 1, scaled by width and batch)."""
    pixels, chans, pool, test = _data_shape(cfg)
    out = {"data": float(pool) * pixels * chans * 6 + float(test) * pixels * chans}
    size = _model_size(cfg["arch"], cfg["stem"], cfg["shortcut"])
    if size is not None:
        w = float(cfg["width"])
        out["model"] = 4 * 4 * size[0] * max(w, w * w)
        # every layer's output in fp32: what autograd keeps (in-place ReLUs counted too, which makes
        # up for the backward's own buffers); a bound to refuse the impossible, not a fine budget
        out["activations"] = 4 * size[1] * w * cfg["batch_size"] * pixels / 1024
        if cfg.get("checkpoint_blocks"):  # recomputed in the backward: kept per block input only, not counted
            del out["activations"]
    return out


def validate(params: dict[str, Any] | None = None, **kw) -> dict[str, Any]:
    """Check a parameter set and return the full config (defaults filled in, device and
    precision resolved). Raises ConfigError listing every problem. Nothing is touched on disk."""
    if params is not None and not isinstance(params, dict):
        from collections.abc import Mapping

        if not isinstance(params, Mapping):
            raise ConfigError(f"invalid run parameters: params={params!r} ({type(params).__name__}): must be a dict "
                              f"of parameter names to values, e.g. bnlib.run({{'lr': 0.1}}) or bnlib.run(lr=0.1)")
    params = {k: _plain(v) for k, v in {**(params or {}), **kw}.items()}
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
    if cfg["final_lr"] is not None and "final_lr" not in bad:
        # one floor, stated one way: an absolute final lr (P2's authors: every group to 1e-8) or a
        # fraction of each group's own start lr, never both
        if "final_lr_frac" not in bad and cfg["final_lr_frac"] != 0:
            errors.append(f"final_lr={cfg['final_lr']!r} with final_lr_frac={cfg['final_lr_frac']!r}: give one floor, "
                          f"final_lr (absolute, every group) or final_lr_frac (relative to each group's start lr); "
                          f"set the other to its default (final_lr=None or final_lr_frac=0)")
        if "schedule" not in bad and cfg["schedule"] != "cosine":
            errors.append(f"final_lr={cfg['final_lr']!r}: the floor of the cosine schedule, but schedule="
                          f"{cfg['schedule']!r}; use schedule='cosine' or final_lr=None")
        mults = {"lr": 1.0, "bias_lr_mult": cfg["bias_lr_mult"]}
        if "norm" not in bad and (NORMS[cfg["norm"]].has_gamma or cfg["input_norm"] == "bn"):
            mults["gamma_lr_mult"] = cfg["gamma_lr_mult"]
        if cfg["residual_gain"]:
            mults["alpha_lr_mult"] = cfg["alpha_lr_mult"]
        if not bad & {"lr", *mults}:
            low = min(mults, key=mults.get)
            if cfg["final_lr"] > cfg["lr"] * mults[low]:
                errors.append(f"final_lr={cfg['final_lr']!r}: above the start lr {cfg['lr'] * mults[low]:g} of a "
                              f"parameter group (lr={cfg['lr']}" + (f" × {low}={mults[low]}" if low != "lr" else "")
                              + "); the cosine schedule would raise that group's lr; must be <= "
                              f"{cfg['lr'] * mults[low]:g}")
    if not bad & {"step_milestones"} and any(not 0 < m < 1 for m in cfg["step_milestones"]):
        errors.append(f"step_milestones={cfg['step_milestones']!r}: each must be a fraction in (0, 1)")
    if not bad & {"arch", "zero_init_last_gamma"} and cfg["zero_init_last_gamma"] and \
            parse_arch(cfg["arch"])[0] == "preact":
        errors.append(f"zero_init_last_gamma=True with arch={cfg['arch']!r} (pre-activation blocks): the last norm "
                      f"of their branch feeds relu and a conv, a zero γ there never recovers; valid choices here: "
                      f"[False] (start blocks at the identity with residual_gain=True, alpha0=0)")
    if not bad & {"arch", "dropout"} and cfg["dropout"] > 0 and parse_arch(cfg["arch"])[0] == "bottleneck":
        errors.append(f"dropout={cfg['dropout']} with arch={cfg['arch']!r} (bottleneck blocks): in-block dropout "
                      f"sits between two 3x3 convs (WRN), which bottleneck blocks lack; valid here: 0, or a "
                      f"basic-block arch (resnet18/34, resnet{{6n+2}}, wrn{{6n+4}}_{{k}})")
    if not bad & {"shortcut", "arch"} and cfg["shortcut"] == "A" and parse_arch(cfg["arch"])[0] == "bottleneck":
        errors.append(f"shortcut='A' with arch={cfg['arch']!r} (bottleneck blocks): option A is for basic-block "
                      f"nets; valid choices here: ['B']")
    spec = None if "norm" in bad else NORMS[cfg["norm"]]
    if spec is not None and spec.check is not None and not bad & {*spec.options, "arch", "width", "batch_size"}:
        # the norm registry checks its own options against the run (NormSpec.check), e.g.
        # group_norm's groups against the channel counts of the net it would build
        def meta_model():
            from .train import build_model  # the run's own network, shapes only
            with torch.device("meta"):
                return build_model(cfg)

        try:
            errors += spec.check(cfg, meta_model)
        except Exception as e:  # noqa: BLE001 — a bad model parameter: reported by its own line
            if not errors:
                errors.append(f"norm={cfg['norm']!r}: could not build the network to check its options "
                              f"{list(spec.options)}: {e}")
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
        batch_stats = "norm" not in bad and (NORMS[cfg["norm"]].batch_stats or cfg["input_norm"] == "bn")
        if not cfg["drop_last"] and batch_stats and n % cfg["batch_size"] == 1:
            # a kept last batch of one image: batch statistics of a single sample (and, on a
            # 1x1 feature map, PyTorch's "expected more than 1 value per channel" error)
            errors.append(f"drop_last=False with batch_size={cfg['batch_size']}: the {n} training images leave a last "
                          f"batch of 1 image, and norm={cfg['norm']!r}" + (" / input_norm='bn'" if cfg["input_norm"] == "bn"
                          else "") + " uses batch statistics; use drop_last=True, or a batch_size that does not "
                          f"leave 1 (n_train mod batch_size != 1)")
    if not bad & {"lr", "schedule", "step_gamma", "step_milestones"}:
        # every group's lr, at every stage of the schedule, must stay within float32's range
        # (torch's optimizers take it as a float32 scalar); beyond it is a crash, not a diverging run
        mults = {k: cfg[k] for k in known if k.endswith("_lr_mult") and k not in bad and cfg[k] is not None}
        peak = max([1.0, *mults.values()])
        if cfg["schedule"] == "step" and cfg["step_gamma"] > 1:
            peak *= cfg["step_gamma"] ** min(len(cfg["step_milestones"]), 64) if cfg["step_gamma"] < 1e10 else math.inf
        if cfg["lr"] * peak > FP32_MAX:
            who = max(mults, key=mults.get) if mults and max(mults.values()) > 1 else None
            errors.append(f"lr={cfg['lr']!r}" + (f" with {who}={mults[who]!r}" if who else "")
                          + (f" and step_gamma={cfg['step_gamma']!r}" if cfg["schedule"] == "step" and
                             cfg["step_gamma"] > 1 else "")
                          + f": a learning rate of {cfg['lr'] * peak:.3g} at some point of training, beyond "
                          f"float32's range ({FP32_MAX:.3g}), which torch's optimizer cannot take; make them "
                          f"smaller (a huge finite rate that trains is a diverging run, a result)")
    if not errors:  # refuse before allocating what cannot fit (issue 15): data, model, activations
        limit, where = _memory_limit(cfg["device"])
        # the meta-device count costs seconds for a 1000-layer net (every worker kernel pays it once):
        # only when a cheap bound from the architecture's table does not already show the run fits
        need = {} if _memory_bound(cfg) <= limit else estimate_memory(cfg)
        if sum(need.values()) > limit:
            parts = ", ".join(f"{k} {v / 2**30:.3g} GiB" for k, v in need.items())
            errors.append(
                f"dataset={cfg['dataset']!r}, synthetic_size={cfg['synthetic_size']}, arch={cfg['arch']!r}, "
                f"width={cfg['width']}, batch_size={cfg['batch_size']}: the run would allocate about "
                f"{sum(need.values()) / 2**30:.3g} GiB ({parts}), more than the {limit / 2**30:.3g} GiB of {where}; "
                f"make the largest of them smaller")
    if errors:
        raise ConfigError("invalid run parameters:\n  - " + "\n  - ".join(errors))
    cfg["step_milestones"] = [float(m) for m in cfg["step_milestones"]]
    cfg["probe_step_sizes"] = [float(m) for m in cfg["probe_step_sizes"]]
    cfg["probe_landscape_steps"] = [float(m) for m in cfg["probe_landscape_steps"]]
    cfg["probe_ics_layers"] = [int(i) for i in cfg["probe_ics_layers"]]
    cfg["probes"], cfg["probe_steps"] = list(cfg["probes"]), sorted({int(m) for m in cfg["probe_steps"]})
    for name, f in known.items():  # ints given for floats are stored as floats (stable run ids)
        if f.type == "float" and cfg[name] is not None:
            cfg[name] = float(cfg[name])
    dev = resolve_device(cfg["device"])
    cfg["device"] = str(dev)
    cfg["precision"] = resolve_precision(cfg["precision"], dev)
    cfg["out_dir"] = os.fspath(cfg["out_dir"])
    return cfg
