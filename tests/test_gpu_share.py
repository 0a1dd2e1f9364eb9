"""Several runs per GPU (`study --runs-per-gpu K`): the GPU slots and Dask resources of each
worker, the memory split, the choice of K, bad values, and `make gpu-check`'s path without a GPU.
The scheduling tests use real Dask processes on 127.0.0.1; no GPU is needed (the GPU count and
memory are faked in this process, where the slots and K are decided)."""
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import dask
import pytest
import torch

import bnlib
from bnlib.cli import main
from bnlib.cluster import _assign_gpu, _connect, _disconnect, _gpu_slots, gpu_resource, resolve_runs_per_gpu
from bnlib.config import ConfigError
from bnlib.memory import (GPU_RESERVE_BYTES, MAX_RUNS_PER_GPU, RUNS_PER_GPU_ENV, check_runs_per_gpu,
                          choose_runs_per_gpu, estimate_memory, memory_limit)

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
TINY = dict(arch="resnet8", width=0.25, synthetic_size=300, val_fraction=0.2, n_test=60, batch_size=32, epochs=1,
            progress=False)


def fake_gpu(monkeypatch, total_gib: float, count: int = 1):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d=None: SimpleNamespace(total_memory=total_gib * GIB))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_slots_put_at_most_k_workers_on_a_gpu_spread_over_the_gpus(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert _gpu_slots(2, 2) == ["0", "0"] and _gpu_slots(4, 4) == ["0"] * 4
    assert _gpu_slots(3, 2) is None and _gpu_slots(2) is None  # more workers than K per GPU allows
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert _gpu_slots(4, 2) == ["0", "1", "0", "1"]
    assert _gpu_slots(2, 4) == ["0", "1"]  # K is a ceiling: as few runs per GPU as the workers allow
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    assert _gpu_slots(3, 2) == ["5", "7", "5"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert _gpu_slots(2, 4) is None
    assert gpu_resource(1) == 1.0 and gpu_resource(4) == 0.25


def test_memory_limit_is_a_share_of_the_gpu_less_a_reserve_per_run(monkeypatch):
    fake_gpu(monkeypatch, 16)
    monkeypatch.delenv(RUNS_PER_GPU_ENV, raising=False)
    limit, where = memory_limit("cuda")
    assert limit == 16 * GIB - GPU_RESERVE_BYTES and "CUDA context" in where
    monkeypatch.setenv(RUNS_PER_GPU_ENV, "4")
    limit, where = memory_limit("cuda")
    assert limit == 4 * GIB - GPU_RESERVE_BYTES and "1/4 share" in where
    assert memory_limit("cpu")[1] == "this machine's RAM"  # the CPU's RAM is not split


def test_a_run_that_fits_the_gpu_but_not_its_share_is_refused_naming_the_share(monkeypatch):
    fake_gpu(monkeypatch, 8)  # the run needs about 2 GiB + the reserve: it fits 8 GiB, not a quarter of it
    params = dict(TINY, device="cuda", precision="bf16", arch="resnet18", width=1.0, batch_size=256,
                  synthetic_size=3000)
    monkeypatch.delenv(RUNS_PER_GPU_ENV, raising=False)
    assert bnlib.validate(params)["device"] == "cuda"
    monkeypatch.setenv(RUNS_PER_GPU_ENV, "4")
    with pytest.raises(ConfigError) as e:
        bnlib.validate(params)
    assert "1/4 share of the GPU" in str(e.value)


def test_probes_count_in_the_memory_estimate():
    a = estimate_memory(bnlib.validate(TINY, device="cpu"))
    b = estimate_memory(bnlib.validate(TINY, device="cpu", probes=["signal_propagation"]))
    assert "probes" not in a and b["probes"] > b["model"] > 0


def test_k_is_chosen_from_the_memory_estimate_between_1_and_the_cap():
    cfg = bnlib.validate(TINY, device="cpu")
    need = sum(estimate_memory(cfg).values())
    assert choose_runs_per_gpu([cfg], 80 * GIB) == MAX_RUNS_PER_GPU
    assert choose_runs_per_gpu([cfg], 1 * GIB) == 1  # below one run's reserve: still one run
    total = 3 * (need + GPU_RESERVE_BYTES) + 1
    assert choose_runs_per_gpu([cfg], total) == 3
    big = bnlib.validate(TINY, device="cpu", arch="resnet18", width=1.0, batch_size=256, synthetic_size=3000)
    assert choose_runs_per_gpu([cfg, big], total) < 3  # the largest run of the grid decides


def test_runs_per_gpu_defaults_by_preset_and_machine(monkeypatch):
    cfgs = [bnlib.validate(TINY, device="cpu")]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_runs_per_gpu(None, "quick", cfgs, local=True) == 1  # no GPU here
    assert resolve_runs_per_gpu(3, "quick", cfgs, local=True) == 3
    fake_gpu(monkeypatch, 80)
    assert resolve_runs_per_gpu(None, "quick", cfgs, local=True) == MAX_RUNS_PER_GPU
    assert resolve_runs_per_gpu(None, "paper", cfgs, local=True) == 1
    assert resolve_runs_per_gpu(None, "quick", cfgs, local=False) == 1  # a cluster's GPUs are not seen here


@pytest.mark.parametrize("bad", [0, -1, 1.5, "two", True])
def test_bad_runs_per_gpu_is_named_with_the_valid_choices(bad):
    with pytest.raises(ConfigError) as e:
        check_runs_per_gpu(bad)
    assert f"--runs-per-gpu={bad!r}" in str(e.value) and ">= 1" in str(e.value)


def test_bad_runs_per_gpu_on_the_command_line_and_in_the_environment(tmp_path, capsys, monkeypatch):
    assert main(["study", "p1", "--runs-per-gpu", "0", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--runs-per-gpu=0" in err and ">= 1" in err and not (tmp_path / "studies").exists()
    monkeypatch.setenv(RUNS_PER_GPU_ENV, "lots")
    fake_gpu(monkeypatch, 16)
    with pytest.raises(ConfigError) as e:
        bnlib.validate(TINY, device="cuda", precision="bf16")
    assert "BNLIB_RUNS_PER_GPU='lots'" in str(e.value)


def test_plan_prints_k_and_the_slurm_script_gives_each_job_k_workers(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bnlib", "study", "p4", "--plan", "--cluster", "slurm", "--runs-per-gpu",
                        "2", "--memory", "16GB", "--cores", "4", "--out", str(tmp_path)], capture_output=True,
                       text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "runs per GPU: 2" in r.stdout
    script = r.stdout[r.stdout.index("#!"):]
    assert "#SBATCH --gres=gpu:1" in script and "--resources GPU=0.5" in script and "--nworkers 2" in script
    assert not (tmp_path / "studies").exists()


def test_two_local_workers_share_one_gpu_at_the_same_time(tmp_path, monkeypatch):
    """A real 2-process LocalCluster: with one (faked) GPU and K=2 both workers get GPU 0, offer
    GPU=0.5, and two points asking GPU=0.5 run on it at once, each told it has a 1/2 share."""
    def timed_point(gpus):  # on a worker: take its GPU slot and hold it, as a run would
        gpu = _assign_gpu(gpus)  # by reference: bnlib is imported as the task arrives, not in its thread
        t0 = time.time()
        time.sleep(2.0)
        return {"pid": os.getpid(), "gpu": gpu, "share": os.environ.get(RUNS_PER_GPU_ENV), "start": t0,
                "end": time.time()}

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    conn = _connect(2, None, None, 0, tmp_path, runs_per_gpu=2)
    try:
        client = conn["client"]
        assert conn["gpus"] == ["0", "0"] and conn["submit"] == {"resources": {"GPU": 0.5}}
        assert [w["resources"] for w in client.scheduler_info()["workers"].values()] == [{"GPU": 0.5}] * 2
        # bnlib's local workers run without Dask's profiler (no dashboard reads it)
        assert set(client.run(lambda: dask.config.get("distributed.worker.profile.enabled")).values()) == {False}
        futs = [client.submit(timed_point, conn["gpus"], pure=False, **conn["submit"]) for _ in range(2)]
        a, b = (f.result(timeout=60) for f in futs)
    finally:
        _disconnect(conn)
    assert a["pid"] != b["pid"] and a["gpu"] == b["gpu"] == "0" and a["share"] == b["share"] == "2"
    assert a["start"] < b["end"] and b["start"] < a["end"]  # at the same time


def test_scheduler_workers_that_offer_a_share_get_points_asking_for_it(tmp_path):
    """`dask worker --resources GPU=0.5` (K=2 workers per GPU) behind --scheduler: the points ask
    for 0.5, also when the study was not told K (asking for 1 would never be scheduled)."""
    from dask.distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      host="127.0.0.1", resources={"GPU": 0.5}) as cluster:
        for k in (2, 1):
            conn = _connect(1, cluster.scheduler_address, None, 0, tmp_path, runs_per_gpu=k)
            try:
                assert conn["submit"] == {"resources": {"GPU": 0.5}} and conn["runs_per_gpu"] == 2, k
            finally:
                _disconnect(conn)


def test_gpu_check_without_a_gpu_says_so_and_runs_nothing(tmp_path):
    out = tmp_path / "gpu_check"
    env = {**os.environ, "PY": sys.executable, "GPU_CHECK_OUT": str(out), "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                       timeout=120, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "no CUDA GPU" in r.stdout and "nothing run" in r.stdout
    assert not out.exists()
