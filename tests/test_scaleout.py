"""Scale-out with real processes on 127.0.0.1: a `dask scheduler` and two `dask worker`
processes started here, a small grid through `--scheduler` (the same run directories as a local
run, a rerun that skips them, a study process that resolves device/precision differently from
its workers), a worker killed with SIGKILL mid-run, an unreachable scheduler, the SLURM job
script dask-jobqueue generates for `--cluster slurm`, and `study --plan`."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import psutil
import pytest

import bnlib.device
from bnlib.cluster import SHARED_TOKEN, _check_worker, _run_threads
from bnlib.grid import plan, run_study
from bnlib.records import load_study
from bnlib.studies import Preset, Study

# one xdist process for the module: its module-scoped fixture is expensive (make test: --dist loadgroup)
pytestmark = pytest.mark.xdist_group("scaleout")

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = dict(arch="resnet8", width=0.25, synthetic_size=300, val_fraction=0.2, n_test=60, batch_size=32,
            epochs=1, log_every=2, dataset="synthetic")


def tiny_study(name="scale", base=None, **grid):
    return Study(name=name, title=f"scale-out study {name}", notebook=None,
                 presets={"smoke": Preset(base={**TINY, **(base or {})},
                                          grid=grid or {"norm": ["bn", "none"]})})


def _wait_for(pred, timeout, what):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if (v := pred()):
            return v
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory):
    """`dask scheduler` + two `dask worker` processes (one thread each), as a user starts them."""
    d = tmp_path_factory.mktemp("dask")
    sfile = d / "scheduler.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", "0",
                               "--no-dashboard", "--scheduler-file", str(sfile)], cwd=d, env=env,
                              stdout=subprocess.DEVNULL, stderr=open(d / "scheduler.log", "w"))]
    try:
        _wait_for(sfile.exists, 60, "the scheduler file")
        address = json.loads(sfile.read_text())["address"]
        for i in range(2):
            procs.append(subprocess.Popen([str(BIN / "dask"), "worker", address, "--nthreads", "1", "--nworkers", "1",
                                           "--host", "127.0.0.1", "--no-dashboard", "--name", f"w{i}"],
                                          cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                          stderr=open(d / f"worker{i}.log", "w")))
        from distributed import Client

        with Client(address, timeout=30) as c:
            c.wait_for_workers(2, timeout=90)
        yield {"address": address, "procs": procs, "dir": d}
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


def _run_dirs(out: Path) -> set[str]:
    return {p.name for p in (out / "runs").iterdir() if p.is_dir()}


def test_scheduler_study_same_runs_as_local_resolved_on_workers(dask_cluster, tmp_path, monkeypatch):
    study = tiny_study()
    local = run_study(study, "smoke", tmp_path / "local", progress=False, analyze=False)
    assert local["completed"] == 2 and local["failed"] == 0
    # This study process now resolves precision='auto' unlike its workers (as a CPU login node
    # would unlike GPU workers): the ids it would compute are wrong, the workers' are right.
    monkeypatch.setattr(bnlib.device, "cpu_has_native_bf16", lambda real=bnlib.device.cpu_has_native_bf16(): not real)
    planned = {it["run_id"] for it in plan(study, "smoke", tmp_path / "local")}
    assert planned.isdisjoint(_run_dirs(tmp_path / "local"))
    out = tmp_path / "cluster"
    counts = run_study(study, "smoke", out, scheduler=dask_cluster["address"], progress=False, analyze=False)
    assert counts["completed"] == 2 and counts["failed"] == 0
    assert _run_dirs(out) == _run_dirs(tmp_path / "local")  # the same run directories as a local run
    runs, manifest = load_study(out, "scale")
    assert set(manifest["run_ids"]) == _run_dirs(out) and len(runs.runs) == 2  # no run that does not exist
    # each run's threads: its worker's share of the host's CPUs (2 workers here), not Dask's OMP_NUM_THREADS=1
    cpus = len(os.sched_getaffinity(0))
    threads = {json.loads((out / "runs" / r / "config.json").read_text())["provenance"]["threads"] for r in _run_dirs(out)}
    assert threads == {max(1, cpus // 2)}
    from distributed import Client

    with Client(dask_cluster["address"], timeout=30) as c:  # the rule, on a worker, where 1 worker shares the host
        assert c.submit(_run_threads, {"127.0.0.1": 1}, pure=False).result() == cpus
    again = run_study(study, "smoke", out, scheduler=dask_cluster["address"], progress=False, analyze=False)
    assert again["skipped"] == 2 and again["completed"] == again["failed"] == 0


def test_studies_of_one_session_share_the_workers_and_their_kernels(dask_cluster, tmp_path):
    """run_all's session: one connection for every study, so each worker's kernel runs the
    points of both studies (not a new cluster and new kernels per study), closed at the end."""
    from distributed import Client

    from bnlib.cluster import _disconnect
    from bnlib.kernels import shutdown_point_kernel

    def uses(client):  # the grid points each worker's current kernel has run
        return sum(client.run(lambda: __import__("bnlib.kernels").kernels._KERNEL.get("uses", 0)).values())

    with Client(dask_cluster["address"], timeout=30) as c:
        c.run(shutdown_point_kernel)  # no kernel left by an earlier test
    session = {}
    try:
        first = run_study(tiny_study("first"), "smoke", tmp_path, scheduler=dask_cluster["address"], progress=False,
                          analyze=False, session=session)
        conn = session["conn"]
        second = run_study(tiny_study("second", base={"seed": 1}), "smoke", tmp_path,
                           scheduler=dask_cluster["address"], progress=False, analyze=False, session=session)
        assert first["completed"] == second["completed"] == 2
        assert session["conn"] is conn
        assert uses(conn["client"]) == 4  # without the session, each study's end stops the kernels: 2
    finally:
        _disconnect(session.get("conn"))
    with Client(dask_cluster["address"], timeout=30) as c:
        assert uses(c) == 0


def test_worker_killed_mid_run_is_retried_from_its_checkpoint(dask_cluster, tmp_path):
    study = tiny_study("killed", base={"epochs": 4, "synthetic_size": 1500, "n_train": None, "precision": "fp32",
                                       "device": "cpu"}, norm=["bn"])
    out = tmp_path / "out"
    result = {}
    t = threading.Thread(target=lambda: result.update(counts=run_study(study, "smoke", out, progress=False,
                                                                       scheduler=dask_cluster["address"], analyze=False)))
    t.start()
    try:
        rid = plan(study, "smoke", out, check=False)[0]["run_id"]  # explicit device/precision: known here
        rd = out / "runs" / rid
        _wait_for(lambda: (rd / "checkpoint.pt").exists(), 240, "the first epoch's checkpoint")
        kernel = psutil.Process(json.loads((rd / "status.json").read_text())["pid"])
        worker = kernel.parent()  # the dask worker process that started the run's kernel
        assert worker.parent().pid in {p.pid for p in dask_cluster["procs"]}  # a worker under its nanny
        # the worker dies with its run, as on a lost node: the kernel first, so that no retry
        # finds it still alive (holding the run), then the worker before it notices
        os.kill(kernel.pid, signal.SIGKILL)
        os.kill(worker.pid, signal.SIGKILL)
    finally:
        t.join(600)
    assert result["counts"]["completed"] == 1 and result["counts"]["failed"] == 0
    epochs = pd.read_parquet(rd / "epochs.parquet")
    assert list(epochs.epoch) == [1, 2, 3, 4]  # no duplicate rows
    history = json.loads((rd / "config.json").read_text())["provenance_history"]
    assert [h["event"] for h in history] == ["start", "resume"]


def test_unreachable_scheduler_fails_fast_before_the_manifest(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run([sys.executable, "-m", "bnlib", "study", "p1", "--dataset", "synthetic", "--out", str(tmp_path),
                        "--scheduler", f"tcp://127.0.0.1:{port}"], capture_output=True, text=True, timeout=120,
                       cwd=ROOT)
    assert r.returncode == 2, r.stderr
    assert "--scheduler" in r.stderr and f"127.0.0.1:{port}" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "studies").exists()


def test_worker_that_cannot_see_the_outputs_is_named(tmp_path):
    token = tmp_path / "runs" / SHARED_TOKEN
    assert "cannot see the outputs folder" in _check_worker(str(token), str(ROOT))
    token.parent.mkdir(parents=True)
    token.write_text("x")
    assert _check_worker(str(token), str(ROOT)) is None
    assert "cannot see the repository" in _check_worker(str(token), str(tmp_path))


def test_slurm_job_script_asks_for_a_gpu_and_the_worker_resource(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bnlib", "study", "p4", "--plan", "--cluster", "slurm",
                        "--partition", "gpu", "--walltime", "02:00:00", "--memory", "16GB", "--account", "bnproj",
                        "--cores", "4", "--out", str(tmp_path)], capture_output=True, text=True, timeout=120,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr
    script = r.stdout[r.stdout.index("#!"):]
    for line in ("#SBATCH --gres=gpu:1", "#SBATCH -p gpu", "#SBATCH -A bnproj", "#SBATCH -t 02:00:00",
                 "#SBATCH --mem=15G", "#SBATCH --cpus-per-task=4"):
        assert line in script, line
    assert "--resources GPU=1" in script
    assert not (tmp_path / "studies").exists()  # a plan writes nothing


def test_plan_counts_images_and_uses_this_machines_bench(tmp_path, capsys):
    cmd = [sys.executable, "-m", "bnlib", "study", "p1", "--preset", "paper", "--plan", "--out", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "not measured here: run make bench" in r.stdout
    from bnlib.costplan import grid_cost, print_plan
    from bnlib.studies import get_study

    cost = grid_cost(plan(get_study("p1"), "paper", tmp_path, check=False))
    assert cost["runs"] == len(get_study("p1").points("paper")) and f"{cost['runs']} runs" in r.stdout
    assert f"{cost['images']:,} training images" in r.stdout and cost["done"] == 0
    # a bench table of this machine for every (arch, width) of the grid: an estimate, no gap
    entries = [{"hostname": socket.gethostname(), "device": "cpu", "arch": a, "width": w, "img_per_s": 100.0,
                "precision": "fp32"} for a, w in cost["by_model"]]
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "throughput.json").write_text(json.dumps({"entries": entries}))
    print_plan("p1", "paper", tmp_path)  # in this process: the CLI's path, without a second start-up
    text = capsys.readouterr().out
    assert "not measured here" not in text and f"estimated on cpu: {cost['images'] / 100.0 / 3600:.1f} h" in text


@pytest.mark.parametrize("over", [dict(n_train=None, drop_last=True), dict(n_train=237, drop_last=False),
                                  dict(n_train=None, drop_last=False, batch_size=7)])
def test_plan_counts_the_images_data_py_trains_on(over):
    from bnlib.config import validate
    from bnlib.costplan import train_images
    from bnlib.data import load_data

    cfg = validate({**TINY, **over, "device": "cpu"})
    data = load_data(cfg, "cpu")
    n = len(data.y_train)
    assert train_images(cfg) == (n // cfg["batch_size"] * cfg["batch_size"] if cfg["drop_last"] else n)


def test_point_its_worker_rejects_is_failed_once_and_counted(dask_cluster, tmp_path, monkeypatch, capsys):
    """A study process that sees a GPU (patched here) sends a cuda point to CPU workers: the
    worker's own check rejects it; the result is `failed` (not an exception Dask would retry),
    with the worker's reason, and the final line counts it."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties",  # an 80 GiB capability-9.0 GPU
                        lambda i=0: SimpleNamespace(total_memory=80 * 2**30, name="patched", major=9, minor=0))
    study = tiny_study("rejected", base={"device": "cuda", "precision": "fp32"}, norm=["bn"])
    counts = run_study(study, "smoke", tmp_path, scheduler=dask_cluster["address"], progress=False, analyze=False)
    assert counts["failed"] == 1 and counts["completed"] == 0
    captured = capsys.readouterr()
    assert "CUDA is not available" in captured.err and "completed 0 / diverged 0 / failed 1" in captured.out
    assert _run_dirs(tmp_path) == set()  # nothing ran
