"""The run config: every parameter of a run, its type, default, accepted values and meaning.

`RunConfig` is assembled from the registries that own parameters: this module's own table
(model, data, optimization, the probe runner, the run), each norm's options (bnlib.norms,
`NormSpec.options`) and each probe's parameters (bnlib.probes, `ProbeSpec.params`), all
declared with bnlib.params.Param. One place for each default: the `parameters` cell of
notebooks/run.ipynb is generated from this table (`make params`; a test checks they agree),
and so are the CLI flags. `validate()` checks a parameter set once, before any data is loaded
or anything is written, with messages that name the parameter, the bad value and what is
accepted.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import fields, make_dataclass
from typing import Any

from .bnstats import EVAL_STATS
from .data import DATASET_NAMES, TRAIN_POOL, split_sizes
from .device import PRECISIONS, check_device, cpu_has_native_bf16, precisions_for, resolve_device, resolve_precision
from .errors import ConfigError
from .memory import estimate_memory, memory_bound, memory_limit
from .models import CONV_INITS, FC_INITS, INPUT_NORMS, SHORTCUTS, meta_model, model_problems, parse_arch
from .norms import NORMS, norm_names
from .params import FP32_MAX, SEED_MAX, Param, check_value, plain
import bnlib.plugins as _plugins  # the module, not names: load_plugins rebinds nothing there
from .probes import check_probe_params, probe_params

__all__ = ["RunConfig", "ConfigError", "validate", "load_plugins", "refresh_run_config", "resolve_device", "resolve_precision", "cpu_has_native_bf16",
           "IDENTITY_EXCLUDED", "param_help", "params_table", "parameters_cell", "DATASET_NAMES", "TRAIN_POOL",
           "FP32_MAX", "SEED_MAX", "OPTIMIZERS", "SCHEDULES", "PRECISIONS"]

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")

# This module's own parameters, by section (the parameters cell's and --help's order). The
# norms' options follow the model section, the probes' parameters the probe runner's.
OWN = {
    "model": {
        "norm": Param("bn", "normalization layer (bnlib.norms registry)", choices=norm_names),
        "arch": Param("resnet18", "resnet18/34/50/101/152 (torchvision tables), resnet{6n+2} (CIFAR family) or "
                       "wrn{6n+4}_{k} (pre-activation Wide-ResNet WRN-d-k, e.g. wrn16_4, wrn28_10, wrn1000_1)"),
        "width": Param(0.25, "channel width multiplier (1.0 = the paper's widths)", lo=0, lo_open=True),
        "stem": Param("cifar", "'cifar': 3x3/1 conv, no max-pool; 'imagenet': 7x7/2 + max-pool",
                       choices=("cifar", "imagenet")),
        "gamma0": Param(1.0, "initial γ of every norm that has one (P2 recommends 0.1)"),
        "zero_init_last_gamma": Param(False, "γ=0 for the last norm of each residual branch"),
        "zero_bias": Param(False, "every bias starts at 0: the classifier's (norm β start at 0 anyway; P2's authors "
                             "zero every bias); False: PyTorch's default uniform init of the classifier bias"),
        "residual_gain": Param(False, "P5 SkipInit: scalar α at the end of each residual branch"),
        "alpha0": Param(0.0, "initial α of the residual gains (SkipInit: 0)"),
        "alpha_learnable": Param(True, "α learned (True) or fixed (P5 ablation)"),
        "dropout": Param(0.0, "dropout rate between the two 3x3 convs of each basic/pre-activation block "
                            "(Wide-ResNets, e.g. 0.3); 0: no dropout layer", lo=0, hi=1, hi_open=True),
        "fc_dropout": Param(0.0, "dropout rate before the classifier (P5's regularized SkipInit); 0: none",
                               lo=0, hi=1, hi_open=True),
        "conv_bias": Param(False, "a bias in every conv, initialized at 0 (P5's regularized SkipInit, no norm)"),
        "checkpoint_blocks": Param(False, "recompute each residual block in the backward pass (activation "
                                     "checkpointing: memory at depth ~1000; same gradients, ~1/3 more compute)"),
        "conv_init": Param("kaiming_fan_in", "conv weight init", choices=CONV_INITS),
        "fc_init": Param("torch_default", "classifier weight init: PyTorch's default uniform(±1/√fan_in), or "
                         "'kaiming_uniform_relu' (bound √(6/fan_in), P2's authors)", choices=FC_INITS),
        "input_norm": Param("dataset", "'dataset': true mean/std; 'raw': [0,1] pixels; 'bn': P2 online BN",
                             choices=INPUT_NORMS),
        "bn_eps": Param(1e-5, "ε of batch-statistics norms", lo=0, lo_open=True),
        "bn_momentum": Param(0.1, "running-stat momentum: r <- (1-m)·r + m·stat", lo=0, hi=1),
        "bn_eval_stats": Param("running", "statistics of batch-statistics norms at evaluation: 'running' "
                                "(PyTorch's, the papers' default) or 'precise' (recomputed with the final weights "
                                "over precise_batches training batches; for short runs, where running stats lag)",
                                choices=EVAL_STATS),
        "precise_batches": Param(16, "bn_eval_stats='precise': training batches the statistics are computed on",
                                  lo=1),
        "shortcut": Param("B", "where a block changes shape: 'B' 1x1 projection + norm; 'A' identity with stride "
                           "and zero-padded channels, no parameters (He et al. 2016; basic-block nets only)",
                           choices=SHORTCUTS),
    },
    "data": {
        "dataset": Param("synthetic", "embedded synthetic set (no files), or Fashion-MNIST / CIFAR through torchvision",
                          choices=DATASET_NAMES),
        "data_dir": Param("~/data", "where data set files are (or are downloaded to)", path=True),
        "download": Param(True, "try to download a data set when absent"),
        "synthetic_size": Param(20000, "training-pool size of the synthetic set (test: a fifth)", lo=10),
        "n_train": Param(None, "cap on training images after the validation split (None: all)",
                          lo=1, nullable=True, type="int"),
        "n_test": Param(None, "cap on test images (None: all)", lo=1, nullable=True, type="int"),
        "val_fraction": Param(0.1, "stratified validation split carved from train", lo=0, hi=1,
                                 lo_open=True, hi_open=True),
        "data_seed": Param(0, "seed of the synthetic data and of the splits (not of training)", lo=0, hi=SEED_MAX),
        "crop_pad": Param(4, "random-crop padding in pixels (0: no crop)", lo=0, hi=16),
        "flip": Param(True, "random horizontal flip"),
    },
    "optimization": {
        "optimizer": Param("sgd", "optimizer", choices=OPTIMIZERS),
        "lr": Param(0.1, "base learning rate (weights); groups scale it", lo=0, lo_open=True),
        "momentum": Param(0.9, "SGD momentum / AdamW β1", lo=0, hi=1, hi_open=True),
        "nesterov": Param(False, "Nesterov momentum (SGD)"),
        "weight_decay": Param(5e-4, "weight decay on conv/linear weights", lo=0),
        "gamma_lr_mult": Param(1.0, "lr multiplier for norm scales γ (P2: 1/c); α has alpha_lr_mult",
                                  lo=0, lo_open=True),
        "gamma_wd": Param(0.0, "weight decay on norm scales γ", lo=0),
        "alpha_lr_mult": Param(1.0, "lr multiplier for SkipInit residual gains α", lo=0, lo_open=True),
        "alpha_wd": Param(0.0, "weight decay on residual gains α", lo=0),
        "bias_lr_mult": Param(1.0, "lr multiplier for biases (norm β, classifier bias)", lo=0, lo_open=True),
        "bias_wd": Param(0.0, "weight decay on biases", lo=0),
        "schedule": Param("cosine", "lr schedule, per step", choices=SCHEDULES),
        "final_lr_frac": Param(0.0, "cosine: final lr as a fraction of the start lr", lo=0, hi=1),
        "final_lr": Param(None, "cosine: final lr of every group, absolute (P2's authors: 1e-8), instead of "
                             "final_lr_frac (which must then be 0); None: use final_lr_frac", lo=0, nullable=True, type="float"),
        "step_milestones": Param([0.5, 0.75], "step: fractions of training where lr drops"),
        "step_gamma": Param(0.1, "step: lr factor at each milestone", lo=0, lo_open=True),
        "warmup_epochs": Param(0.0, "linear warm-up from 0, in epochs", lo=0),
        "label_smoothing": Param(0.0, "cross-entropy label smoothing", lo=0, hi=1, hi_open=True),
        "batch_size": Param(128, "training batch size", lo=1),
        "drop_last": Param(True, "drop each epoch's last partial batch (True: every step sees batch_size images); "
                             "False keeps it, as P2's authors' DataLoader does"),
        "epochs": Param(2, "training epochs", lo=1),
    },
    "probes": {
        "probes": Param([], "measurements inside training (bnlib.probes registry): 'name', or 'name@k' to run "
                          "that probe every k steps; each runs at init and at every epoch end", items="str"),
        "probe_every": Param(None, "also run every requested probe every k steps (None: each probe's own default)",
                              lo=1, nullable=True, type="int"),
        "probe_steps": Param([], "also run every requested probe at these steps (optimizer updates done)",
                               items="int"),
        "probe_batch_size": Param(256, "fixed probe batch: the first k training images, not augmented", lo=1),
    },
    "run": {
        "seed": Param(0, "training seed (init, order, augmentation)", lo=0, hi=SEED_MAX),
        "device": Param("auto", "'auto' (cuda > mps > cpu), or a torch device like 'cpu', 'cuda:0'"),
        "precision": Param("auto", "'fp32': IEEE fp32 (TF32 off on CUDA); 'tf32': CUDA only, TF32 convs/matmuls; "
                            "'bf16': bf16 autocast; 'auto': bf16 where native (CUDA capability >= 8.0, CPUs with "
                            "AVX512_BF16/AMX), else fp32 (bnlib.device)", choices=PRECISIONS),
        "channels_last": Param(True, "channels_last memory format for model and inputs"),
        "compile": Param(False, "torch.compile the model (~50 s compile on CPU, little gain there)"),
        "deterministic": Param(False, "bit-exact reruns on CUDA: deterministic kernels, no cuDNN autotuning "
                                 "(slower); off: cuDNN autotunes, reruns agree up to kernel non-determinism"),
        "diverge_factor": Param(10.0, "diverged when the smoothed loss > factor × max(ln K, its lowest so far), "
                                   "or > factor × ln K after the first epoch, or non-finite (bnlib.train.divergence)",
                                   lo=1, lo_open=True),
        "log_every": Param(10, "record loss, lr and grad norm every k steps", lo=1),
        "eval_batch_size": Param(1000, "batch size for validation/test evaluation", lo=1),
        "out_dir": Param("outputs/runs", "where run directories are written", path=True),
        "progress": Param(True, "show a progress bar"),
        "plugins": Param([], "your own norms, probes and studies: importable module names or paths to .py files, "
                           "imported before anything is checked (bnlib.plugins; default: the environment variable "
                           "BNLIB_PLUGINS); a run records each one's file and sha256", items="str"),
    },
}


def params_table() -> list[tuple[str, str, Param]]:
    """(section, name, Param) of every run parameter, in RunConfig's order."""
    out = []
    for section, table in OWN.items():
        out += [(section, k, p) for k, p in table.items()]
        if section == "model":
            out += [("norm options", k, p) for spec in NORMS.values() for k, p in spec.options.items()]
        if section == "probes":
            out += [("probes", k, p) for k, p in probe_params().items()]
    names = [k for _, k, _ in out]
    dup = sorted({k for k in names if names.count(k) > 1})
    if dup:
        raise ValueError(f"run parameters declared twice (by two registry entries or by an entry and "
                         f"bnlib.config): {dup}")
    return out


def _make_run_config():
    cls = make_dataclass("RunConfig", [(k, p.type, p.dataclass_field()) for _, k, p in params_table()])
    cls.__module__ = __name__
    cls.__doc__ = ("Every run parameter with its default (bnlib.config.params_table gives each one's "
                   "declaration; fields' metadata holds help, choices and range).")
    return cls


RunConfig = _make_run_config()

# Parameters that do not change what a run computes: left out of its identity (run id).
# `plugins` names where code comes from; the code a run uses enters its id as a content hash
# instead (bnlib.records.run_id), so a path moved or given relative changes nothing.
IDENTITY_EXCLUDED = ("out_dir", "progress", "data_dir", "download", "plugins")


def refresh_run_config() -> None:
    """Rebuild RunConfig after plugins registered entries with parameters of their own (a norm's
    options, a probe's parameters): validate, --help and the parameters cell then know them."""
    global RunConfig
    if [f.name for f in fields(RunConfig)] != [k for _, k, _ in params_table()]:
        RunConfig = _make_run_config()


def load_plugins(value=None) -> list[dict]:
    """Import the plugins named by `value` (None: the environment's BNLIB_PLUGINS) and rebuild
    RunConfig from the registries; ConfigError names `plugins` when one cannot be imported."""
    src = _plugins.load(_plugins.from_env() if value is None else value)
    try:
        refresh_run_config()
    except ValueError as e:  # a plugin's parameter declared twice
        raise ConfigError(f"invalid run parameters:\n  - plugins={value!r}: {e}") from None
    return src


def param_help() -> dict[str, str]:
    return {f.name: f.metadata["help"] for f in fields(RunConfig)}


def parameters_cell() -> str:
    """The source of notebooks/run.ipynb's `parameters` cell: every RunConfig name with its
    default, type and help, by section (`make params` writes it; papermill reads the names and
    values, its --help-notebook the types and help)."""
    lines = ["# Parameters: the names of bnlib.RunConfig (python -m bnlib run --help lists the same)."]
    last, defaults = None, RunConfig()
    for section, name, p in params_table():
        if section != last:
            lines += ["", f"# --- {section} ---"]
            last = section
        v = getattr(defaults, name)
        kind = f"({p.type} or None) " if p.nullable or v is None else ""
        code = f"{name} = {v!r}" if kind else f"{name}: {p.type} = {v!r}"
        if "=" in p.help:  # papermill's parser skips a line with a second '=': the help goes above it
            lines += [f"# {kind}{p.help}", code]
        else:
            lines.append(f"{code}  # {kind}{p.help}")
    return "\n".join(lines)


def _lr_problems(cfg: dict, known: dict, bad: set) -> list[str]:
    """The learning rates of every parameter group, at every point of the schedule: the cosine
    floor below each group's start, and every rate within float32's range."""
    errors = []
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
    return errors


def _data_problems(cfg: dict, bad: set) -> list[str]:
    """The training pool against the validation split and the batch size."""
    if bad & {"dataset", "synthetic_size", "val_fraction", "n_train", "batch_size"}:
        return []
    errors = []
    synthetic = cfg["dataset"] == "synthetic"
    pool, n_val, n = split_sizes(cfg)
    if n_val < 1:
        errors.append(f"val_fraction={cfg['val_fraction']}: leaves no validation image out of the {pool} "
                      f"training-pool images (model selection needs one); must be >= {1 / pool:.3g} here, "
                      f"or make the pool larger")
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
    return errors


def _memory_problem(cfg: dict) -> str | None:
    """Refuse before allocating what cannot fit (issue 15): data, model, activations."""
    limit, where = memory_limit(cfg["device"])
    # the meta-device count costs seconds for a 1000-layer net (every worker kernel pays it once):
    # only when a cheap bound from the architecture's table does not already show the run fits
    need = {} if memory_bound(cfg) <= limit else estimate_memory(cfg)
    if sum(need.values()) <= limit:
        return None
    parts = ", ".join(f"{k} {v / 2**30:.3g} GiB" for k, v in need.items())
    return (f"dataset={cfg['dataset']!r}, synthetic_size={cfg['synthetic_size']}, arch={cfg['arch']!r}, "
            f"width={cfg['width']}, batch_size={cfg['batch_size']}: the run would allocate about "
            f"{sum(need.values()) / 2**30:.3g} GiB ({parts}), more than the {limit / 2**30:.3g} GiB of {where}; "
            f"make the largest of them smaller")


def validate(params: dict[str, Any] | None = None, **kw) -> dict[str, Any]:
    """Check a parameter set and return the full config (defaults filled in, device and
    precision resolved). Raises ConfigError listing every problem. Nothing is touched on disk."""
    if params is not None and not isinstance(params, Mapping):
        raise ConfigError(f"invalid run parameters: params={params!r} ({type(params).__name__}): must be a dict "
                          f"of parameter names to values, e.g. bnlib.run({{'lr': 0.1}}) or bnlib.run(lr=0.1)")
    params = {k: plain(v) for k, v in {**(params or {}), **kw}.items()}
    # plugins first: their norms, probes and parameters are then known to every check below
    plugin_list = params.get("plugins", [])
    if isinstance(plugin_list, (list, tuple)) and not plugin_list:  # none given (run.ipynb's []): the environment's
        plugin_list = _plugins.from_env()
    if isinstance(plugin_list, str):  # one plugin, or the CLI's / environment's comma-separated form
        plugin_list = _plugins.parse(plugin_list)
    if isinstance(plugin_list, (list, tuple)) and all(isinstance(p, str) for p in plugin_list):
        plugin_list = [_plugins.resolve(p) for p in plugin_list]
        try:
            load_plugins(plugin_list)
        except ConfigError as e:
            raise ConfigError(str(e) if str(e).startswith("invalid run parameters")
                              else f"invalid run parameters:\n  - {e}") from None
        params["plugins"] = plugin_list
    known = {f.name: f for f in fields(RunConfig)}
    errors = [f"unknown parameter {k!r}; valid parameters: {sorted(known)}" for k in params if k not in known]
    cfg = {**RunConfig().__dict__, **{k: v for k, v in params.items() if k in known}}
    for name, f in known.items():
        if (e := check_value(name, f.type, f.metadata, cfg[name])) is not None:
            errors.append(e)
    bad = {e.split("=")[0] for e in errors}
    if "arch" not in bad:
        try:
            parse_arch(cfg["arch"])
        except ValueError as e:
            errors.append(str(e))
            bad.add("arch")
    if "device" not in bad and (e := check_device(cfg["device"])):
        errors.append(e)
        bad.add("device")
    if not bad & {"arch", "norm", "zero_init_last_gamma", "dropout", "fc_dropout", "shortcut"}:
        errors += model_problems(parse_arch(cfg["arch"])[0], norm=cfg["norm"], arch=cfg["arch"],
                                 zero_init_last_gamma=cfg["zero_init_last_gamma"], dropout=cfg["dropout"],
                                 fc_dropout=cfg["fc_dropout"], shortcut=cfg["shortcut"])
    if not bad & {"norm", "batch_size"} and NORMS[cfg["norm"]].batch_stats and cfg["batch_size"] < 2:
        errors.append(f"batch_size={cfg['batch_size']}: norm={cfg['norm']!r} uses batch statistics and "
                      f"needs batch_size >= 2")
    if not bad & {"device", "precision"}:
        dev_type = resolve_device(cfg["device"]).type
        if cfg["precision"] not in precisions_for(dev_type):
            errors.append(f"precision={cfg['precision']!r}: TF32 is a CUDA tensor-core format, not available on "
                          f"device {cfg['device']!r} ({dev_type}); valid choices here: {list(precisions_for(dev_type))}")
    errors += _lr_problems(cfg, known, bad)
    spec = None if "norm" in bad else NORMS[cfg["norm"]]
    if spec is not None and spec.check is not None and not bad & {*spec.options, "arch", "width", "batch_size"}:
        # the norm registry checks its own options against the run (NormSpec.check), e.g.
        # group_norm's groups against the channel counts of the net it would build
        try:
            errors += spec.check(cfg, lambda: meta_model(cfg))
        except Exception as e:  # noqa: BLE001 — a bad model parameter: reported by its own line
            if not errors:
                errors.append(f"norm={cfg['norm']!r}: could not build the network to check its options "
                                  f"{list(spec.options)}: {e}")
    errors += check_probe_params(cfg, bad)  # the probe registry validates its own parameters
    errors += _data_problems(cfg, bad)
    if not errors and (e := _memory_problem(cfg)):
        errors.append(e)
    if errors:
        raise ConfigError("invalid run parameters:\n  - " + "\n  - ".join(errors))
    for name, f in known.items():  # stored as their declared types (stable run ids: 1 and 1.0 hash alike)
        if f.type == "float" and cfg[name] is not None:
            cfg[name] = float(cfg[name])
        elif f.type == "list":
            cast = {"number": float, "int": int, "str": str}[f.metadata["items"]]
            cfg[name] = [cast(x) for x in cfg[name]]
    cfg["probe_steps"] = sorted(set(cfg["probe_steps"]))
    dev = resolve_device(cfg["device"])
    cfg["device"] = str(dev)
    cfg["precision"] = resolve_precision(cfg["precision"], dev)
    cfg["out_dir"] = os.fspath(cfg["out_dir"])
    return cfg
