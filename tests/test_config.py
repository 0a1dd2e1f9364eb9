"""bnlib.config: validate() fills defaults and reports every bad parameter as a ConfigError."""
import math
import os
from dataclasses import fields

import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import bnlib
from bnlib.config import (DATASET_NAMES, OPTIMIZERS, PRECISIONS, SCHEDULES, ConfigError, RunConfig,
                          validate)
from bnlib.device import precisions_for, resolve_device
from bnlib.norms import NORMS, norm_names

# precisions valid with device='auto' here / on every device ('tf32' is CUDA only)
AUTO_PRECISIONS = precisions_for(resolve_device("auto").type)
ANY_DEVICE_PRECISIONS = precisions_for("cpu")
FIELD_NAMES = [f.name for f in fields(RunConfig)]
BATCH_NORMS = [n for n, s in NORMS.items() if s.batch_stats]
STATLESS_NORMS = [n for n, s in NORMS.items() if not s.batch_stats]


def _error(**kw) -> str:
    with pytest.raises(ConfigError) as ei:
        validate(**kw)
    return str(ei.value)


def _lines(msg: str) -> list[str]:
    return msg.split("\n  - ")[1:]


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


def test_defaults_fill_every_field():
    cfg = validate()
    assert set(cfg) == set(FIELD_NAMES)
    defaults = RunConfig()
    for name in FIELD_NAMES:
        if name not in ("device", "precision"):
            assert cfg[name] == getattr(defaults, name), name
    assert cfg["device"] == str(bnlib.config.resolve_device("auto"))
    assert cfg["precision"] in ("bf16", "fp32")
    assert validate({}) == cfg == validate(None)


def test_validate_normalizes_numbers_and_keeps_values():
    cfg = validate(lr=1, width=2, norm="affine", epochs=3, step_milestones=(0.25, 0.5), device="cpu",
                   precision="fp32")
    assert cfg["lr"] == 1.0 and type(cfg["lr"]) is float
    assert type(cfg["width"]) is float and type(cfg["epochs"]) is int
    assert cfg["step_milestones"] == [0.25, 0.5]
    assert cfg["norm"] == "affine" and cfg["device"] == "cpu" and cfg["precision"] == "fp32"
    # a dict and keywords combine, keywords win
    assert validate({"lr": 0.5, "epochs": 4}, lr=0.25)["lr"] == 0.25


@pytest.mark.parametrize("name", ["learning_rate", "Norm", "epoch", "depth"])
def test_unknown_parameter(name):
    msg = _error(**{name: 1})
    assert f"unknown parameter {name!r}" in msg


@pytest.mark.parametrize("name, value", [("epochs", "2"), ("epochs", 2.0), ("lr", True), ("lr", "0.1"),
                                         ("flip", 1), ("flip", "true"), ("norm", 1), ("width", None),
                                         ("batch_size", 32.0), ("step_milestones", [0.5, "x"]),
                                         ("n_train", "10")])
def test_wrong_type(name, value):
    lines = _lines(_error(**{name: value}))
    assert len(lines) == 1
    assert lines[0].startswith(f"{name}={value!r}")
    assert "must be" in lines[0]


def test_none_allowed_only_where_nullable():
    assert validate(n_train=None, n_test=None)["n_train"] is None
    assert _lines(_error(epochs=None))[0].startswith("epochs=None")


@pytest.mark.parametrize("name, bad, valid", [
    ("norm", "batchnorm", norm_names()),
    ("dataset", "mnist", DATASET_NAMES),
    ("optimizer", "adam", OPTIMIZERS),
    ("schedule", "linear", SCHEDULES),
    ("precision", "fp16", PRECISIONS),
    ("stem", "resnet", ("cifar", "imagenet")),
    ("conv_init", "xavier", bnlib.models.CONV_INITS),
    ("input_norm", "whiten", bnlib.models.INPUT_NORMS),
    ("arch", "vgg11", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "6n+2"]),
    ("device", "tpu", ["auto", "cpu", "cuda"]),
    ("device", "cuda:x", ["auto", "cpu", "cuda"]),
])
def test_unknown_choice(name, bad, valid):
    msg = _error(**{name: bad})
    lines = _lines(msg)
    assert len(lines) == 1 and lines[0].startswith(f"{name}={bad!r}")
    assert "valid choices" in msg
    for v in valid:
        assert v in msg, v


@pytest.mark.parametrize("name, value", [("lr", 0), ("lr", -0.1), ("lr", 0.0), ("epochs", 0), ("epochs", -3),
                                         ("width", 0), ("width", -0.5), ("val_fraction", 0),
                                         ("val_fraction", 1), ("val_fraction", 1.5), ("batch_size", 0),
                                         ("momentum", 1.0), ("crop_pad", 17), ("bn_momentum", 1.1),
                                         ("lr", math.nan), ("lr", math.inf), ("width", -math.inf),
                                         ("step_milestones", [0.5, 1.0])])
def test_out_of_range(name, value):
    lines = _lines(_error(**{name: value}))
    assert len(lines) == 1
    assert lines[0].startswith(f"{name}={value!r}")


@pytest.mark.parametrize("name, value", [("lr", 1e-9), ("epochs", 1), ("width", 1e-3), ("val_fraction", 1e-3),
                                         ("val_fraction", 0.999), ("momentum", 0.0), ("crop_pad", 16),
                                         ("crop_pad", 0), ("bn_momentum", 1.0)])
def test_range_boundaries_accepted(name, value):
    assert validate(**{name: value, "batch_size": 2})[name] == value


@pytest.mark.parametrize("norm", BATCH_NORMS)
def test_batch_size_one_rejected_for_batch_stat_norms(norm):
    msg = _error(norm=norm, batch_size=1)
    assert "batch_size=1" in msg and repr(norm) in msg


@pytest.mark.parametrize("norm", STATLESS_NORMS)
def test_batch_size_one_accepted_without_batch_stats(norm):
    assert validate(norm=norm, batch_size=1)["batch_size"] == 1


def test_batch_size_above_training_set_size():
    # 100 synthetic images, 10% validation -> 90 training images
    assert validate(synthetic_size=100, val_fraction=0.1, batch_size=90)["batch_size"] == 90
    msg = _error(synthetic_size=100, val_fraction=0.1, batch_size=91)
    assert "batch_size=91" in msg and "90" in msg
    msg = _error(synthetic_size=1000, val_fraction=0.1, n_train=50, batch_size=64)
    assert "batch_size=64" in msg and "50" in msg
    assert validate(synthetic_size=1000, val_fraction=0.1, n_train=50, batch_size=50)["batch_size"] == 50
    # CIFAR: 50000-image pool
    # (a small net: a ResNet18 batch of 45 000 images would not fit in memory, which validate refuses too)
    assert validate(dataset="cifar10", batch_size=45000, arch="resnet8", width=0.1)["batch_size"] == 45000
    assert "batch_size=45001" in _error(dataset="cifar100", batch_size=45001)


def test_validation_split_must_not_be_empty():
    """An empty validation split would leave model selection with nothing (val acc 0/0)."""
    msg = _error(synthetic_size=10, val_fraction=0.01, batch_size=2)
    assert "val_fraction=0.01" in msg and "no validation image" in msg and ">= 0.1" in msg
    assert validate(synthetic_size=10, val_fraction=0.1, batch_size=2)["val_fraction"] == 0.1


def test_accepted_batch_size_fits_the_loaded_training_set():
    cfg = validate(synthetic_size=25, val_fraction=0.5, batch_size=12)
    n_train = bnlib.load_data(cfg, torch.device("cpu")).sizes()["n_train"]
    assert cfg["batch_size"] <= n_train


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_unavailable(device):
    msg = _error(device=device)
    assert f"device={device!r}" in msg and "CUDA is not available" in msg


def test_cpu_device_accepted():
    assert validate(device="cpu")["device"] == "cpu"


@pytest.mark.parametrize("arch", ["resnet21", "resnet10", "cifar_resnet18", "resnet4"])
def test_depth_not_6n_plus_2(arch):
    lines = _lines(_error(arch=arch))
    assert len(lines) == 1 and lines[0].startswith(f"arch={arch!r}") and "6n+2" in lines[0]


@pytest.mark.parametrize("arch", ["resnet8", "resnet20", "resnet110", "cifar_resnet50", "resnet152"])
def test_valid_archs(arch):
    assert validate(arch=arch)["arch"] == arch


@pytest.mark.parametrize("norm", [n for n, s in NORMS.items() if not s.has_gamma])
def test_zero_init_last_gamma_needs_gamma(norm):
    msg = _error(norm=norm, zero_init_last_gamma=True, batch_size=8)
    assert "zero_init_last_gamma" in msg and repr(norm) in msg


def test_all_errors_reported_in_one_message():
    msg = _error(lr=0, epochs="2", norm="foo", arch="resnet21", bogus=1, flip=1, val_fraction=1.0)
    lines = _lines(msg)
    assert len(lines) == 7
    for prefix in ("lr=0", "epochs='2'", "norm='foo'", "arch='resnet21'", "unknown parameter 'bogus'",
                   "flip=1", "val_fraction=1.0"):
        assert sum(line.startswith(prefix) for line in lines) == 1, prefix


@pytest.mark.parametrize("name", ["lr", "gamma0", "width"])
def test_huge_int_for_float_field_is_config_error(name):
    with pytest.raises(ConfigError):
        validate(**{name: 10 ** 400})


# ----------------------------------------------------------------------------------------------
# Property: any mix of valid and invalid values -> a config, or a ConfigError naming the culprits
# ----------------------------------------------------------------------------------------------

def _param(valid, invalid):
    """(value, is_valid) pairs drawn from both pools."""
    return st.one_of(valid.map(lambda v: (v, True)), invalid.map(lambda v: (v, False)))


JUNK = st.one_of(st.none(), st.text(max_size=5), st.lists(st.integers(), max_size=2))
PARAMS = {
    "norm": _param(st.sampled_from(sorted(NORMS)), st.sampled_from(["BN", "layernorm", "", 3, None])),
    "arch": _param(st.sampled_from(["resnet8", "resnet18", "resnet20", "cifar_resnet50", "resnet152"]),
                   st.sampled_from(["resnet21", "resnet2", "vgg11", "resnet", 18, None])),
    "width": _param(st.floats(0.01, 4.0) | st.integers(1, 4),
                    st.sampled_from([0, -1, 0.0, math.nan, math.inf, "0.5", True])),
    "lr": _param(st.floats(1e-6, 10.0) | st.integers(1, 3),
                 st.sampled_from([0, -0.1, math.nan, -math.inf, "0.1", True]) | JUNK),
    "epochs": _param(st.integers(1, 5), st.sampled_from([0, -1, 2.0, "2", True, None])),
    "batch_size": _param(st.integers(2, 64), st.sampled_from([0, -8, 1.5, "8", False, None])),
    "val_fraction": _param(st.floats(0.01, 0.9), st.sampled_from([0, 1, 0.0, 1.0, -0.1, 2, "0.1", math.nan])),
    "dataset": _param(st.just("synthetic"), st.sampled_from(["mnist", "SYNTHETIC", "", None, 0])),
    "precision": _param(st.sampled_from(AUTO_PRECISIONS), st.sampled_from(["fp16", "BF16", None, 16])),
    "optimizer": _param(st.sampled_from(OPTIMIZERS), st.sampled_from(["adam", "SGD", "", None])),
    "synthetic_size": _param(st.sampled_from([10, 100, 20000]), st.sampled_from([9, 0, -5, "100", 100.0])),
}
UNKNOWN = st.sampled_from(["learning_rate", "Norm", "n_epochs", "seed2", "depth"])


@st.composite
def param_sets(draw):
    keys = draw(st.lists(st.sampled_from(sorted(PARAMS)), unique=True, max_size=len(PARAMS)))
    drawn = {k: draw(PARAMS[k]) for k in keys}
    unknown = draw(st.lists(UNKNOWN, unique=True, max_size=1)) if draw(st.integers(0, 4)) == 0 else []
    return drawn, unknown


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(param_sets())
def test_validate_property(case):
    drawn, unknown = case
    params = {k: v for k, (v, _) in drawn.items()}
    params.update({k: 1 for k in unknown})
    invalid = {k for k, (_, ok) in drawn.items() if not ok}
    try:
        cfg = validate(params)
    except ConfigError as e:
        msg = str(e)
        lines = _lines(msg)
        assert lines, msg
        # the offending names: those given, or batch_size for the batch-vs-training-set check
        assert any(k in msg for k in set(params) | {"batch_size"}), msg
        # every individually invalid value and unknown name has its own line
        for k in invalid:
            assert any(line.startswith(f"{k}=") for line in lines), (k, msg)
        for k in unknown:
            assert any(line.startswith(f"unknown parameter {k!r}") for line in lines), (k, msg)
        if not invalid and not unknown:  # only a cross-parameter constraint can fail
            # (a norm's options against the run: group_norm's groups vs the net's channel
            # counts at this arch/width, ghost_bn's virtual batch vs batch_size)
            # (or the memory estimate: a wide deep net, e.g. resnet152 at width 4, cannot fit)
            assert all(line.startswith(("batch_size=", "val_fraction=", "norm_groups=", "ghost_batch_size="))
                       or "would allocate" in line for line in lines), msg
        return
    # accepted: nothing was invalid, and the given values are in the config
    assert not invalid and not unknown, params
    assert set(cfg) == set(FIELD_NAMES)
    for k, v in params.items():
        if k != "precision":
            assert cfg[k] == v and type(cfg[k]) is type(RunConfig.__dataclass_fields__[k].default), k
    assert cfg["precision"] in ("bf16", "fp32") if params.get("precision", "auto") == "auto" else \
        cfg["precision"] == params["precision"]


# ----------------------------------------------------------------------------------------------
# Property: an accepted parameter set starts (and finishes) a real run; a rejected one writes
# nothing. Pools are kept cheap to train (narrow nets, small synthetic sets, one epoch) but
# cover the edges: one training image, batch = training set, tiny validation/test sets, huge
# learning rates, every norm, optimizer, schedule, input normalization and precision.
# ----------------------------------------------------------------------------------------------

RUN_PARAMS = {
    "norm": _param(st.sampled_from(sorted(NORMS)), st.sampled_from(["batchnorm", None])),
    "arch": _param(st.sampled_from(["resnet8", "resnet14", "cifar_resnet20", "resnet18", "resnet50"]),
                   st.sampled_from(["resnet21", "vgg11"])),
    "width": _param(st.floats(0.03, 0.2), st.sampled_from([0, -1.0, math.nan])),
    "stem": _param(st.sampled_from(["cifar", "imagenet"]), st.just("mnist")),
    "gamma0": _param(st.sampled_from([0.0, 0.1, 1.0, -1.0]), st.just(math.inf)),
    "zero_init_last_gamma": _param(st.booleans(), st.just("yes")),
    "residual_gain": _param(st.booleans(), st.just(1)),
    "input_norm": _param(st.sampled_from(["dataset", "raw", "bn"]), st.just("imagenet")),
    "synthetic_size": _param(st.sampled_from([10, 23, 60, 60, 200]), st.sampled_from([9, 0])),
    "n_train": _param(st.none() | st.integers(1, 3) | st.integers(20, 50), st.just(0)),
    "n_test": _param(st.none() | st.integers(1, 20), st.just(-3)),
    "val_fraction": _param(st.sampled_from([0.01, 0.1, 0.5, 0.9]), st.sampled_from([0.0, 1.0])),
    "crop_pad": _param(st.integers(0, 16), st.just(17)),
    "flip": _param(st.booleans(), st.just("false")),
    "optimizer": _param(st.sampled_from(OPTIMIZERS), st.just("adam")),
    "lr": _param(st.sampled_from([1e-4, 0.1, 3.0, 1e6]), st.just(0)),
    "momentum": _param(st.sampled_from([0.0, 0.9]), st.just(1.0)),
    "weight_decay": _param(st.sampled_from([0.0, 5e-4]), st.just(-1e-4)),
    "gamma_lr_mult": _param(st.sampled_from([0.1, 1.0]), st.just(0.0)),
    "schedule": _param(st.sampled_from(SCHEDULES), st.just("linear")),
    "step_milestones": _param(st.sampled_from([[0.5], [0.1, 0.9], []]), st.sampled_from([[1.5], [0]])),
    "warmup_epochs": _param(st.sampled_from([0.0, 0.5, 3.0]), st.just(-1.0)),
    "label_smoothing": _param(st.sampled_from([0.0, 0.1]), st.just(1.0)),
    "batch_size": _param(st.sampled_from([1, 2, 3, 16, 32]), st.sampled_from([0, "8"])),
    "eval_batch_size": _param(st.integers(1, 64), st.just(0)),
    "log_every": _param(st.integers(1, 5), st.just(0)),
    "precision": _param(st.sampled_from(ANY_DEVICE_PRECISIONS), st.just("fp16")),
    "device": _param(st.sampled_from(["auto", "cpu"]), st.sampled_from(["tpu", "cuda:7"])),
    "channels_last": _param(st.booleans(), st.just(None)),
}


@st.composite
def run_param_sets(draw):
    keys = draw(st.lists(st.sampled_from(sorted(RUN_PARAMS)), unique=True, max_size=len(RUN_PARAMS)))
    drawn = {k: draw(RUN_PARAMS[k]) for k in keys}
    # most examples valid, so that most of them train
    if draw(st.integers(0, 3)) > 0:
        drawn = {k: v for k, v in drawn.items() if v[1]}
    return drawn


@settings(max_examples=int(os.environ.get("BNLIB_HYPOTHESIS_EXAMPLES", 30)), deadline=None, database=None, derandomize=os.environ.get("BNLIB_HYPOTHESIS_RANDOM") is None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(run_param_sets())
def test_accepted_parameters_start_a_run_rejected_write_nothing(tmp_path_factory, drawn):
    out = tmp_path_factory.mktemp("prop") / "runs"
    params = {"epochs": 1, "synthetic_size": 60, "width": 0.1, "batch_size": 16, "progress": False, "out_dir": str(out),
              **{k: v for k, (v, _) in drawn.items()}}
    if torch.cuda.is_available() and params.get("device") == "cuda:7":  # keep "no such device" true
        params["device"] = f"cuda:{torch.cuda.device_count()}"
    invalid = {k for k, (_, ok) in drawn.items() if not ok}
    try:
        cfg = validate(params)
    except ConfigError as e:
        event("rejected: " + ("invalid value" if invalid else _lines(str(e))[0].split("=")[0]))
        lines = _lines(str(e))
        for k in invalid:
            assert any(line.startswith(f"{k}=") for line in lines), (k, str(e))
        with pytest.raises(ConfigError):  # the same through run(): before anything is written
            bnlib.run(params)
        assert not out.exists()
        return
    assert not invalid, params
    # accepted: it trains, and ends as a result (completed or diverged), never a crash
    res = bnlib.run(params)
    event(f"accepted: {res['status']}")
    assert res["status"] in ("completed", "diverged"), res
    assert (res.run_dir / "config.json").exists() and res.run_dir.parent == out
    assert res["data_sizes"]["n_val"] >= 1 and res["data_sizes"]["n_train"] >= cfg["batch_size"]
    if res["status"] == "completed":
        epochs = pd.read_parquet(res.run_dir / "epochs.parquet")
        assert len(epochs) == cfg["epochs"]
        assert epochs[["train_acc", "val_acc", "test_acc"]].apply(lambda c: c.between(0, 1)).all().all()
