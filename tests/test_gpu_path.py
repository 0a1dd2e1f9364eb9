"""The GPU path: checkpoints through the CPU, RNG states, precision choice, backend flags, norms
at one precision under autocast, provenance, one GPU per study worker.

Tests marked `cuda` need a GPU and are skipped without one (conftest); `pytest -m cuda` runs
them all on a GPU machine. The rest run everywhere: they check the parts that do not need a
GPU (and fake the device's compute capability where the choice depends on it). Tests that
compare exact numbers across a resume pin the device to the CPU, or to CUDA with
deterministic=True."""
import importlib
import json
import os
import random
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import bnlib
from bnlib import device as bdevice
from bnlib.checkpoint import load_checkpoint, save_checkpoint, set_rng_states
from bnlib.config import ConfigError
from bnlib.data import load_data, steps_per_epoch
from bnlib.cluster import _assign_gpu, _gpu_slots
from bnlib.models import create_model
from bnlib.norms import NORMS, get_norm

train_mod = importlib.import_module("bnlib.train")  # bnlib.train is also the function

TINY = dict(arch="resnet8", width=0.25, synthetic_size=300, val_fraction=0.2, n_test=60, batch_size=32,
            epochs=2, progress=False, log_every=2)
COLS = ["epoch", "step", "lr_now", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc"]
PROVENANCE_KEYS = {"cuda_version", "cudnn_version", "gpu_name", "gpu_capability", "gpu_uuid", "driver_version",
                   "tf32_conv", "tf32_matmul", "cudnn_benchmark", "cudnn_deterministic", "deterministic_algorithms",
                   "deterministic", "cublas_workspace_config"}
# the net of the channels_last test, for every norm: width 0.5 gives 8, 16, 32 channels, which
# group_norm's default norm_groups=8 divides (at 0.25 its 4 channels are rejected)
CHANNELS_LAST_NET = dict(arch="resnet8", width=0.5)


def tiny(tmp_path, **kw):
    return {**TINY, "out_dir": str(tmp_path), **kw}


def _tf32_switches() -> tuple:
    """Every TF32 switch, read without the getters that raise on a mixed state: the legacy
    booleans through torch._C, the new per-operator fp32_precision strings."""
    legacy = (torch._C._get_cudnn_allow_tf32(), torch._C._get_cublas_allow_tf32())
    if not bdevice._new_tf32_api():
        return legacy, ()
    return legacy, (torch.backends.cudnn.conv.fp32_precision, torch.backends.cudnn.rnn.fp32_precision,
                    torch.backends.cuda.matmul.fp32_precision)


def _set_tf32_switches(saved: tuple) -> None:
    (cudnn, cublas), new = saved  # legacy first, then the new API: the order torch accepts
    torch._C._set_cudnn_allow_tf32(cudnn)
    torch._C._set_cublas_allow_tf32(cublas)
    if new:
        (torch.backends.cudnn.conv.fp32_precision, torch.backends.cudnn.rnn.fp32_precision,
         torch.backends.cuda.matmul.fp32_precision) = new


@pytest.fixture
def restore_backends():
    """configure_backends sets process-wide flags: leave them as the test found them."""
    saved = (_tf32_switches(), torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    yield
    tf32, bench, det, algos, warn_only = saved
    _set_tf32_switches(tf32)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = bench, det
    torch.use_deterministic_algorithms(algos, warn_only=warn_only)


def interrupt_after_checkpoint(monkeypatch, out_dir):
    """Make the next run stop (KeyboardInterrupt, as Ctrl-C) at its first step after the epoch
    checkpoint is written; the same parameters then resume from it."""
    real = train_mod.augment

    def augment(*a, **kw):
        if any(out_dir.glob("*/checkpoint.pt")):
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(train_mod, "augment", augment)
    return real


def all_tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from all_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from all_tensors(v)


def draws(gen):
    """One draw from every generator a run uses."""
    out = [torch.randint(0, 2**30, (4,), generator=gen, device=gen.device).cpu().tolist(),
           torch.randint(0, 2**30, (4,)).tolist(), np.random.randint(0, 2**30, 4).tolist(),
           [random.random() for _ in range(4)]]
    if gen.device.type == "cuda":
        out.append(torch.randint(0, 2**30, (4,), device=gen.device).cpu().tolist())
    return out


def checkpoint_round_trip(tmp_path, device):
    """Save a training state (AdamW after a step) and every RNG state; check that everything
    loads to the CPU, that the RNGs continue where they were, and that the optimizer state
    lands where torch wants it: moments on the parameter's device, `step` on the CPU."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(5, 3, device=device)).sum().backward()
    opt.step()
    gen = torch.Generator(device=device).manual_seed(1)
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"model": model.state_dict(), "optimizer": opt.state_dict()}, gen, device)
    expected = draws(gen)

    state = load_checkpoint(path)
    assert all(t.device.type == "cpu" for t in all_tensors(state))
    set_rng_states(state, gen, device)
    assert draws(gen) == expected

    model2 = torch.nn.Linear(3, 2).to(device)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.1)
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["optimizer"])
    for p, s in opt2.state.items():
        assert s["step"].device.type == "cpu"  # read on the host every step: no device sync
        assert s["exp_avg"].device == s["exp_avg_sq"].device == p.device
    for a, b in zip(model.parameters(), model2.parameters()):
        assert b.device == a.device and torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# everywhere
# ----------------------------------------------------------------------------------------------

def test_checkpoint_loads_to_the_cpu_and_rng_states_round_trip(tmp_path, monkeypatch):
    seen = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: seen.append(kw.get("map_location")) or real_load(*a, **kw))
    checkpoint_round_trip(tmp_path, torch.device("cpu"))
    assert seen == ["cpu"]  # whatever device saved it


def test_adamw_run_resumes_to_the_same_metrics(tmp_path, monkeypatch):
    """The SIGKILL resume test (test_reliability) uses SGD; AdamW's per-parameter state and step
    counters come back through the checkpoint too. CPU: exact numbers."""
    params = dict(optimizer="adamw", lr=1e-3, device="cpu", precision="fp32")
    ref = bnlib.run(tiny(tmp_path / "ref", **params))
    out = tmp_path / "resumed"
    real = interrupt_after_checkpoint(monkeypatch, out)
    with pytest.raises(KeyboardInterrupt):
        bnlib.run(tiny(out, **params))
    monkeypatch.setattr(train_mod, "augment", real)
    res = bnlib.run(tiny(out, **params))
    assert res["status"] == "completed" and res["resumed_from_epoch"] == 1
    pd.testing.assert_frame_equal(pd.read_parquet(ref.run_dir / "epochs.parquet")[COLS],
                                  pd.read_parquet(res.run_dir / "epochs.parquet")[COLS])


def test_provenance_has_device_facts_and_one_entry_per_start_or_resume(tmp_path, monkeypatch):
    out = tmp_path / "runs"
    real = interrupt_after_checkpoint(monkeypatch, out)
    with pytest.raises(KeyboardInterrupt):
        bnlib.run(tiny(out, device="cpu", precision="fp32"))
    run_dir = next(out.iterdir())
    conf = json.loads((run_dir / "config.json").read_text())
    assert [e["event"] for e in conf["provenance_history"]] == ["start"]
    monkeypatch.setattr(train_mod, "augment", real)
    res = bnlib.run(tiny(out, device="cpu", precision="fp32"))
    assert res["status"] == "completed"
    conf = json.loads((run_dir / "config.json").read_text())
    hist = conf["provenance_history"]
    assert [e["event"] for e in hist] == ["start", "resume"]
    assert conf["provenance"] == hist[-1]  # readers of one entry get the latest
    for e in hist:
        assert PROVENANCE_KEYS <= set(e)
        assert e["tf32_conv"] is False and e["tf32_matmul"] is False  # fp32 means fp32
        assert e["deterministic"] is False  # the run's own request, recorded beside the flags it set
        assert e["cudnn_benchmark"] is False  # CPU run
    assert hist[0]["gpu_name"] is None and hist[0]["torch"] == torch.__version__
    runs = bnlib.load_runs(out)
    assert len(runs.runs) == 1 and not runs.skipped
    # a fresh start begins the history anew (the earlier records are gone with it)
    bnlib.run(tiny(out, device="cpu", precision="fp32"), rerun=True)
    conf = json.loads((run_dir / "config.json").read_text())
    assert [e["event"] for e in conf["provenance_history"]] == ["start"]


def test_config_without_history_is_kept_as_its_first_entry(tmp_path):
    """A run directory written before provenance_history existed: its one provenance is kept."""
    from bnlib.records import RunDir, config_record

    rd = RunDir(tmp_path)
    rd.write_json("config", {"run_id": "x", "params": {}, "provenance": {"hostname": "old-machine"}})
    cfg = bnlib.validate(device="cpu", precision="fp32")
    rec = config_record(rd, "x", cfg, resuming=True)
    assert [e.get("hostname") for e in rec["provenance_history"]][0] == "old-machine"
    assert rec["provenance_history"][-1]["event"] == "resume" and len(rec["provenance_history"]) == 2


@pytest.mark.parametrize("name", sorted(NORMS))
def test_every_norm_computes_in_the_activation_dtype(name):
    """Under bf16 autocast every norm returns bf16 (P1's arms at one precision); in fp32, fp32.
    Parametrized over the registry, so a new norm is covered without an edit here."""
    layer = get_norm(name)(8).train()
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    x = torch.randn(4, 3, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(x)
        y = layer(h)
    assert h.dtype == torch.bfloat16 and y.dtype == torch.bfloat16, (name, y.dtype)
    y.float().sum().backward()
    for p in layer.parameters():  # parameters and their gradients stay fp32
        assert p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32)
    assert layer(conv(x)).dtype == torch.float32


@pytest.mark.parametrize("name", sorted(NORMS))
def test_whole_network_gives_bf16_logits_under_autocast(name):
    model = create_model("resnet8", norm=name, width=0.25, residual_gain=True).to(memory_format=torch.channels_last)
    x = torch.rand(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x).dtype == torch.bfloat16


@pytest.mark.parametrize("capability, expected", [((6, 0), "fp32"), ((7, 0), "fp32"), ((7, 5), "fp32"),
                                                  ((8, 0), "bf16"), ((8, 9), "bf16"), ((9, 0), "bf16")])
def test_auto_precision_follows_the_requested_devices_compute_capability(monkeypatch, capability, expected):
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: asked.append(d) or capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **kw: True)  # emulated bf16 says yes too
    dev = torch.device("cuda:1")
    assert bdevice.resolve_precision("auto", dev) == expected
    assert asked == [dev]  # the requested device, not the current one
    for explicit in ("fp32", "tf32", "bf16"):
        assert bdevice.resolve_precision(explicit, dev) == explicit


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_on_cpu_is_unchanged(monkeypatch, native, expected):
    monkeypatch.setattr(bdevice, "cpu_has_native_bf16", lambda: native)
    assert bdevice.resolve_precision("auto", torch.device("cpu")) == expected
    assert bnlib.validate(device="cpu")["precision"] == expected


def test_tf32_off_cuda_is_a_config_error_naming_the_choices():
    with pytest.raises(ConfigError) as e:
        bnlib.validate(device="cpu", precision="tf32")
    msg = str(e.value)
    assert "precision='tf32'" in msg and "CUDA" in msg
    for p in ("auto", "bf16", "fp32"):
        assert repr(p) in msg
    assert bdevice.precisions_for("cuda") == bdevice.PRECISIONS and "tf32" not in bdevice.precisions_for("cpu")


def test_configure_backends_sets_and_reports_every_flag(restore_backends, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's warning on mixing the legacy and new TF32 APIs
        f = bdevice.configure_backends({"device": "cuda", "precision": "tf32", "deterministic": False})
        assert f["tf32_conv"] and f["tf32_matmul"] and f["cudnn_benchmark"] and not f["deterministic_algorithms"]
        f = bdevice.configure_backends({"device": "cuda", "precision": "fp32", "deterministic": False})
        assert not f["tf32_conv"] and not f["tf32_matmul"] and f["cudnn_benchmark"]
        f = bdevice.configure_backends({"device": "cuda", "precision": "bf16", "deterministic": True})
        assert not f["tf32_conv"] and not f["cudnn_benchmark"] and f["cudnn_deterministic"]
        assert f["deterministic_algorithms"] and f["cublas_workspace_config"] == bdevice.CUBLAS_WORKSPACE_CONFIG
        f = bdevice.configure_backends({"device": "cpu", "precision": "fp32", "deterministic": False})
        assert not f["cudnn_benchmark"] and not f["cudnn_deterministic"] and not f["deterministic_algorithms"]
        assert f == bdevice.backend_flags()
        prov = bdevice.device_provenance("cpu")
    assert PROVENANCE_KEYS - {"deterministic"} <= set(prov)  # the run's request: records.provenance adds it
    assert prov["gpu_name"] is None and prov["cuda_version"] == torch.version.cuda


@pytest.mark.parametrize("name", sorted(NORMS))
def test_the_channels_last_net_is_valid_for_every_norm(name):
    """The CUDA test above validates this net for every norm; a config rejected on any device
    (e.g. group_norm's groups not dividing a channel count) would fail it for that reason alone."""
    cfg = bnlib.validate(device="cpu", precision="bf16", norm=name, **CHANNELS_LAST_NET)
    assert cfg["norm"] == name


@pytest.mark.parametrize("order", [("fp32", "tf32", "bf16"), ("tf32", "fp32", "tf32", "bf16")])
def test_every_tf32_getter_agrees_after_configuring_each_precision(restore_backends, order):
    """Setting only cuDNN conv's and cuBLAS matmul's fp32_precision left cuDNN's RNN and the legacy
    booleans behind, and torch then raised on reading torch.backends.cudnn.allow_tf32,
    torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() ("mix of the
    legacy and new APIs"). Every getter, after each precision, in either order; no warning."""
    for precision in order:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            f = bdevice.configure_backends({"device": "cuda", "precision": precision, "deterministic": False})
            on = precision == "tf32"
            assert torch.backends.cudnn.allow_tf32 is on, precision
            assert torch.backends.cuda.matmul.allow_tf32 is on, precision
            assert torch.get_float32_matmul_precision() == ("high" if on else "highest"), precision
            if bdevice._new_tf32_api():
                mode = "tf32" if on else "ieee"
                assert (torch.backends.cudnn.conv.fp32_precision, torch.backends.cudnn.rnn.fp32_precision,
                        torch.backends.cuda.matmul.fp32_precision) == (mode, mode, mode), precision
            assert f["tf32_conv"] is on and f["tf32_matmul"] is on and f == bdevice.backend_flags()


def test_tests_not_marked_cuda_resolve_auto_to_the_cpu_even_with_a_gpu(monkeypatch):
    """conftest pins device 'auto' to the CPU for every test not marked `cuda` (BNLIB_AUTO_DEVICE),
    so `make test` on a GPU machine keeps its exactness tests on the CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert os.environ[bdevice.AUTO_DEVICE_ENV] == "cpu"
    assert bdevice.resolve_device("auto") == torch.device("cpu")
    cfg = bnlib.validate(**TINY)
    assert cfg["device"] == "cpu" and cfg["precision"] == bdevice.resolve_precision("auto", torch.device("cpu"))
    assert bnlib.validate(**TINY, precision="fp32")["precision"] == "fp32"  # what a test asks for, it gets
    monkeypatch.delenv(bdevice.AUTO_DEVICE_ENV)
    assert bdevice.resolve_device("auto") == torch.device("cuda")  # the pin is what kept it on the CPU


def test_a_bad_auto_device_pin_is_named_with_its_choices(monkeypatch):
    monkeypatch.setenv(bdevice.AUTO_DEVICE_ENV, "gpu")
    with pytest.raises(ConfigError) as e:
        bnlib.validate(**TINY)
    msg = str(e.value)
    assert "BNLIB_AUTO_DEVICE='gpu'" in msg and all(repr(c) in msg for c in ("cpu", "cuda", "mps"))
    assert bnlib.validate(**TINY, device="cpu")["device"] == "cpu"  # an explicit device does not read it


def test_probe_timers_synchronize_only_on_cuda(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **kw: calls.append(a))
    res = bnlib.run(tiny(tmp_path, device="cpu", precision="fp32", probes=["max_normalized@2"]))
    assert res["status"] == "completed" and calls == []


def test_deterministic_is_a_recorded_part_of_run_identity():
    a, b = bnlib.validate(device="cpu"), bnlib.validate(device="cpu", deterministic=True)
    assert a["deterministic"] is False and b["deterministic"] is True
    assert bnlib.run_id(a) != bnlib.run_id(b)


def test_gpu_slots_one_per_worker_when_there_are_enough(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert _gpu_slots(2) == ["0", "1"] and _gpu_slots(4) == ["0", "1", "2", "3"]
    assert _gpu_slots(1) is None and _gpu_slots(5) is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,6")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert _gpu_slots(2) == ["3", "5"]  # the ids the study itself was given
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert _gpu_slots(2) is None


def test_each_local_worker_gets_its_own_gpu():
    """The real mechanism on a 2-process LocalCluster (no GPU needed: only the environment)."""
    from dask.distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        addrs = list(client.scheduler_info()["workers"])
        got = [client.submit(_assign_gpu, ["4", "7"], workers=[a], pure=False).result() for a in addrs]
        env = client.run(lambda: __import__("os").environ.get("CUDA_VISIBLE_DEVICES"))
    assert sorted(got) == ["4", "7"] and sorted(env.values()) == ["4", "7"]


# ----------------------------------------------------------------------------------------------
# on a GPU: pytest -m cuda
# ----------------------------------------------------------------------------------------------

@pytest.mark.cuda
def test_cuda_checkpoint_loads_to_the_cpu_and_rng_states_round_trip(tmp_path):
    checkpoint_round_trip(tmp_path, torch.device("cuda"))


@pytest.mark.cuda
@pytest.mark.parametrize("optimizer, lr", [("sgd", 0.1), ("adamw", 1e-3)])
def test_cuda_resume_continues_the_uninterrupted_run(tmp_path, monkeypatch, optimizer, lr):
    """Exact with deterministic=True; the checkpoint of a CUDA run loads to the CPU and its
    optimizer state goes where it belongs."""
    params = dict(optimizer=optimizer, lr=lr, device="cuda", deterministic=True)
    ref = bnlib.run(tiny(tmp_path / "ref", **params))
    out = tmp_path / "resumed"
    real = interrupt_after_checkpoint(monkeypatch, out)
    with pytest.raises(KeyboardInterrupt):
        bnlib.run(tiny(out, **params))
    ckpt = next(out.glob("*/checkpoint.pt"))
    state = load_checkpoint(ckpt)
    assert all(t.device.type == "cpu" for t in all_tensors(state)) and "cuda_rng" in state
    cfg = bnlib.validate(tiny(out, **params))
    model = train_mod.build_model(cfg).to("cuda")
    opt = train_mod.make_optimizer(train_mod.param_groups(model, cfg), cfg)
    model.load_state_dict(state["model"])  # the synthetic set's mean/std buffers come from the checkpoint
    opt.load_state_dict(state["optimizer"])
    for p, s in opt.state.items():
        for k, v in s.items():
            if k == "step":
                assert v.device.type == "cpu", k
            elif isinstance(v, torch.Tensor):
                assert v.device == p.device, k
    monkeypatch.setattr(train_mod, "augment", real)
    res = bnlib.run(tiny(out, **params))
    assert res["status"] == "completed" and res["resumed_from_epoch"] == 1
    pd.testing.assert_frame_equal(pd.read_parquet(ref.run_dir / "epochs.parquet")[COLS],
                                  pd.read_parquet(res.run_dir / "epochs.parquet")[COLS])


@pytest.mark.cuda
def test_cuda_resume_without_deterministic_stays_close(tmp_path, monkeypatch):
    """cuDNN autotuning on: the resumed run agrees up to kernel non-determinism."""
    params = dict(device="cuda")
    ref = bnlib.run(tiny(tmp_path / "ref", **params))
    out = tmp_path / "resumed"
    real = interrupt_after_checkpoint(monkeypatch, out)
    with pytest.raises(KeyboardInterrupt):
        bnlib.run(tiny(out, **params))
    monkeypatch.setattr(train_mod, "augment", real)
    res = bnlib.run(tiny(out, **params))
    a, b = (pd.read_parquet(r.run_dir / "epochs.parquet") for r in (ref, res))
    assert list(a.step) == list(b.step)
    np.testing.assert_allclose(a.train_loss, b.train_loss, rtol=0.05)
    st = json.loads((res.run_dir / "config.json").read_text())
    assert [e["event"] for e in st["provenance_history"]] == ["start", "resume"]
    assert all(e["cudnn_benchmark"] for e in st["provenance_history"])


@pytest.mark.cuda
@pytest.mark.parametrize("optimizer, resume", [("sgd", False), ("adamw", False), ("adamw", True)])
def test_cuda_training_step_has_no_host_sync(tmp_path, monkeypatch, optimizer, resume):
    """torch.cuda.set_sync_debug_mode('error') around every step that does not log (the logged
    steps read the losses back on purpose, once per log_every steps). After a resume too: AdamW
    `step` counters on the GPU would sync at every step."""
    params = tiny(tmp_path, device="cuda", optimizer=optimizer, lr=1e-3 if optimizer == "adamw" else 0.1,
                  log_every=1000)  # the only logged steps: the first and each epoch's last
    cfg = bnlib.validate(params)
    spe = steps_per_epoch(len(load_data(cfg, torch.device("cpu")).y_train), cfg["batch_size"])
    if resume:
        real = interrupt_after_checkpoint(monkeypatch, tmp_path)
        with pytest.raises(KeyboardInterrupt):
            bnlib.run(params)
        monkeypatch.setattr(train_mod, "augment", real)
    real = train_mod.augment
    step = [spe if resume else 0]

    def augment(*a, **kw):  # called first thing in every step
        s = step[0]
        step[0] += 1
        logged = s % params["log_every"] == 0 or s % spe == spe - 1
        torch.cuda.set_sync_debug_mode(0 if logged else "error")
        return real(*a, **kw)

    monkeypatch.setattr(train_mod, "augment", augment)
    try:
        res = bnlib.run(params)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert res["status"] == "completed" and res.get("resumed_from_epoch") == (1 if resume else None)
    assert step[0] == 2 * spe  # every step of the run went through the window check


@pytest.mark.cuda
def test_cuda_precision_by_capability_and_tf32_off_for_fp32(tmp_path, restore_backends):
    dev = torch.device("cuda")
    native = torch.cuda.get_device_capability(dev) >= (8, 0)
    assert bnlib.validate(device="cuda")["precision"] == ("bf16" if native else "fp32")
    for precision, tf32 in (("fp32", False), ("tf32", True)):
        res = bnlib.run(tiny(tmp_path, device="cuda", precision=precision, epochs=1))
        prov = json.loads((res.run_dir / "config.json").read_text())["provenance"]
        assert prov["tf32_conv"] is tf32 and prov["tf32_matmul"] is tf32, precision
        assert prov["cudnn_benchmark"] is True and prov["gpu_capability"] == "%d.%d" % torch.cuda.get_device_capability()
        assert prov["cuda_version"] and prov["cudnn_version"] and prov["gpu_name"]
    # fp32 really is IEEE fp32 on the GPU: a conv agrees with float64 to fp32 rounding, not to
    # TF32's. By relative norm, not elementwise: cuDNN's algorithms (Winograd, FFT, GEMM) round
    # differently, and a bit-exact match with the CPU is not what fp32 promises.
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(8, 64, 16, 16, generator=g), torch.randn(64, 64, 3, 3, generator=g)
    ref = F.conv2d(x.double(), w.double())

    def rel_error(precision: str) -> float:
        bdevice.configure_backends({"device": "cuda", "precision": precision, "deterministic": True})
        out = F.conv2d(x.cuda(), w.cuda()).double().cpu()
        return ((out - ref).norm() / ref.norm()).item()

    assert rel_error("fp32") < 1e-5
    if native:  # TF32 tensor cores (compute capability >= 8.0): the measure tells them apart
        assert rel_error("tf32") > 1e-5


@pytest.mark.cuda
@pytest.mark.parametrize("name", sorted(NORMS))
def test_cuda_channels_last_weights_and_bf16_logits(name):
    cfg = bnlib.validate(device="cuda", precision="bf16", norm=name, **CHANNELS_LAST_NET)
    model = train_mod.build_model(cfg).to("cuda").to(memory_format=torch.channels_last)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    x = torch.rand(8, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x)
        for layer in (m for m in model.modules() if type(m).__name__ in {"BatchNorm2d", "Affine2d",
                                                                           "BatchInitAffine2d"}):
            assert layer(torch.randn(2, layer.num_features, 4, 4, device="cuda", dtype=torch.bfloat16)).dtype \
                == torch.bfloat16
    assert out.dtype == torch.bfloat16


@pytest.mark.cuda
def test_cuda_probe_due_mid_epoch_synchronizes_before_its_timer(tmp_path, monkeypatch):
    """A probe's seconds are left out of the epoch's img/s: the training kernels still queued when
    it starts must finish before its timer does, else they count as probe time."""
    assert bdevice.AUTO_DEVICE_ENV not in os.environ  # conftest leaves `cuda` tests the machine's choice
    real, calls = torch.cuda.synchronize, []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    res = bnlib.run(tiny(tmp_path, device="cuda", probes=["max_normalized@2"]))
    cfg = bnlib.validate(tiny(tmp_path, device="cuda"))
    spe = steps_per_epoch(len(load_data(cfg, torch.device("cpu")).y_train), cfg["batch_size"])
    probe_steps = set(pd.read_parquet(res.run_dir / "probes.parquet").step)
    mid_epoch = probe_steps - {spe * e for e in range(1, cfg["epochs"] + 1)}  # epoch ends: after the timer
    assert res["status"] == "completed" and len(calls) == len(mid_epoch) > 0


@pytest.mark.cuda
def test_cuda_two_worker_study_lands_on_two_gpus(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    from bnlib.grid import run_study
    from bnlib.studies import Preset, Study

    study = Study(name="two_gpus", title="one GPU per worker", notebook=None,
                  presets={"smoke": Preset(base={k: v for k, v in TINY.items() if k != "progress"},
                                           grid={"seed": [0, 1, 2, 3]})})
    counts = run_study(study, "smoke", tmp_path, workers=2, analyze=False, progress=False)
    assert counts["completed"] == 4
    provs = [json.loads(p.read_text())["provenance"] for p in (tmp_path / "runs").glob("*/config.json")]
    assert len({p["gpu_uuid"] for p in provs}) == 2
    assert {p["cuda_visible_devices"] for p in provs} == set(_gpu_slots(2))
