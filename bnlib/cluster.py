"""Scale-out for the study runner, on Dask: a LocalCluster (`workers`), a running scheduler
(`scheduler=ADDRESS`, reached within SCHEDULER_TIMEOUT_S or the study stops before writing
anything), or dask-jobqueue's SLURMCluster (`cluster={"kind": "slurm", ...}`: one job per worker,
one GPU per job), and the mapping of grid points onto it, one papermill kernel per task.

Every point is a task asking for the worker resource GPU=1/K wherever the workers offer it (a
LocalCluster on a machine with GPUs, SLURM jobs, `dask worker --resources GPU=1/K`), where K runs
share a GPU (`runs_per_gpu`, 1 by default: a GPU runs one point at a time; each worker runs one
point at a time, so K workers share a GPU). Before the first task, every worker must see the study's
repository and outputs folder (a token file written by the study). A point whose worker dies is
started again by the scheduler (up to `retries` times, Dask's allowed-failures) and resumes from
its last checkpoint; the point executor (bnlib.grid's, passed to _map) returns a `failed` result
for a point that fails by itself instead of raising, so Dask never retries it.
"""
from __future__ import annotations

import os
import socket
from collections import Counter
from pathlib import Path

import torch

from .errors import ConfigError
from .kernels import ROOT, shutdown_point_kernel
from .memory import RUNS_PER_GPU_ENV, check_runs_per_gpu, choose_runs_per_gpu
from .records import atomic_write

__all__ = ["RETRIES", "SCHEDULER_TIMEOUT_S", "SHARED_TOKEN", "slurm_cluster", "gpu_resource", "resolve_runs_per_gpu"]

# Dask's scheduler starts a task again when the worker running it dies, up to
# `distributed.scheduler.allowed-failures` times, then fails it with KilledWorker; a point
# resumes from its last checkpoint each time. The study sets this on the schedulers it starts
# (LocalCluster, SLURMCluster); a scheduler joined with --scheduler keeps its own setting.
RETRIES = 2
SCHEDULER_TIMEOUT_S = 10  # a scheduler that does not answer within this fails the study at once
SHARED_TOKEN = ".bnlib-shared-check"


def _gpu_slots(workers: int, runs_per_gpu: int = 1) -> list[str] | None:
    """The GPU each local Dask worker gets, when the visible GPUs hold several workers at no more
    than `runs_per_gpu` each: the ids of the visible GPUs (honouring a CUDA_VISIBLE_DEVICES the
    study runs under), spread round-robin, so each GPU gets as few workers as possible. None
    otherwise: the workers then share what they see (device 'auto' is the first GPU)."""
    import torch

    n = torch.cuda.device_count()  # does not create a CUDA context in this process
    if workers <= 1 or n == 0 or n * runs_per_gpu < workers:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",") if v.strip()] if visible else [str(i) for i in range(n)]
    used = ids[:min(n, workers)]
    return [used[i % len(used)] for i in range(workers)]


def gpu_resource(runs_per_gpu: int) -> float:
    """The Dask resource GPU each point asks for, and each of the K workers of a GPU offers."""
    return 1.0 / runs_per_gpu


def resolve_runs_per_gpu(runs_per_gpu: int | None, preset: str, cfgs, local: bool) -> int:
    """K runs per GPU: as given (checked: a whole number >= 1), else 1 for a paper preset or a
    cluster (the study process cannot see its GPUs), else on a machine with a GPU as many of the
    grid's runs as its memory estimate fits on the first GPU (bnlib.memory.choose_runs_per_gpu)."""
    if runs_per_gpu is not None:
        return check_runs_per_gpu(runs_per_gpu)
    if preset == "paper" or not local or not torch.cuda.is_available():
        return 1
    return choose_runs_per_gpu(cfgs, float(torch.cuda.get_device_properties(0).total_memory))


def _assign_gpu(gpus: list[str]) -> str:
    """On a LocalCluster worker: make this worker's GPU the only one its kernels see, and tell
    its runs how many workers share that GPU (their memory check's share). Worker names are
    0..n-1 and survive a restart by the nanny, so a worker keeps its GPU."""
    from distributed import get_worker  # on the Dask worker only

    gpu = gpus[int(get_worker().name) % len(gpus)]
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # the papermill kernel inherits this environment
    os.environ[RUNS_PER_GPU_ENV] = str(gpus.count(gpu))
    return gpu


def _run_threads(threads) -> int | None:
    """Intra-op threads for the run this worker is about to start. Dask's nanny starts every
    worker with OMP_NUM_THREADS=1 (distributed.yaml, pre-spawn-environ), which a kernel would
    inherit: a one-thread run on a machine with many cores. An int is the study's own choice
    (a LocalCluster: the cores / its workers); a dict {host: workers there} (a cluster joined
    through --scheduler, or SLURM jobs) shares this worker's CPUs (its affinity, which a SLURM
    job's cgroup limits to the job's cores) with the other workers on its host; None: not on a
    Dask worker, leave the environment as it is."""
    if threads is None or isinstance(threads, int):
        return threads
    from distributed import get_worker

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // max(1, threads.get(_host(get_worker().address), 1)))


def _host(address: str) -> str:
    from distributed.comm import get_address_host

    return get_address_host(address)


def _not_shared(host: str, token: str) -> str:
    return (f"worker on {host} cannot see the outputs folder {str(Path(token).parent)!r} (it does not find "
            f"{Path(token).name} that the study process wrote there): the repository and --out must be on a "
            f"file system every worker shares, at the same path")


def _check_worker(token: str, root: str) -> str | None:
    """On a worker: None when it sees the study's outputs folder and repository, else why not."""
    host = socket.gethostname()
    if not Path(token).exists():
        return _not_shared(host, token)
    if not (Path(root) / "notebooks" / "run.ipynb").exists():
        return (f"worker on {host} cannot see the repository {root!r} (notebooks/run.ipynb): it must be on a "
                f"file system every worker shares, at the same path")
    if Path(ROOT) != Path(root):
        return (f"worker on {host} imports bnlib from {str(ROOT)!r}, not from the study's repository {root!r}: "
                f"start the workers with the study's Python environment")
    return None


def slurm_cluster(partition: str | None = None, walltime: str | None = None, memory: str | None = None,
                  account: str | None = None, cores: int | None = None, gpus: int = 1, runs_per_gpu: int = 1,
                  **kw):
    """dask-jobqueue's SLURMCluster with `runs_per_gpu` (K) workers per job, `gpus` GPUs per job
    (sbatch --gres=gpu:N; SLURM then sets the job's CUDA_VISIBLE_DEVICES) and the worker
    resource GPU=N/K on each of its K workers; every grid point asks for GPU=1/K. Options left None come from the user's dask-jobqueue
    configuration (jobqueue.slurm in ~/.config/dask/jobqueue.yaml); the GPU directive and
    resource are added to what that configuration sets. Starts no job (scale() does)."""
    import dask

    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise ConfigError("--cluster slurm needs dask-jobqueue: pip install 'bnlib[cluster]' (or dask-jobqueue) "
                          "in the study's environment") from None
    conf = dask.config.get("jobqueue.slurm", {})
    directives = list(conf.get("job-extra-directives") or [])
    extra_args = list(conf.get("worker-extra-args") or [])
    if gpus:
        directives.append(f"--gres=gpu:{gpus}")
        extra_args += ["--resources", f"GPU={gpus * gpu_resource(runs_per_gpu):g}"]
    opts = {k: v for k, v in dict(queue=partition, walltime=walltime, memory=memory, account=account,
                                  cores=cores).items() if v is not None}
    try:
        return SLURMCluster(processes=runs_per_gpu, job_extra_directives=directives, worker_extra_args=extra_args,
                            **opts, **kw)
    except ValueError as e:  # dask-jobqueue's "You must specify how much cores and memory per job"
        raise ConfigError(f"--cluster slurm: {e}; give --cores and --memory, or set jobqueue.slurm cores/memory "
                          f"in ~/.config/dask/jobqueue.yaml") from None


def _connect(workers: int, scheduler: str | None, cluster: dict | None, retries: int, out: Path,
             runs_per_gpu: int = 1) -> dict | None:
    """The Dask client the points run on (None: in this process), checked before anything is
    written: an unreachable scheduler, or workers that cannot see the repository and the
    outputs folder, stop the study here with an error naming the option and the address."""
    kind = (cluster or {}).get("kind", "local")
    if scheduler is None and kind == "local" and workers <= 1:
        return None
    import dask
    from dask.distributed import Client, LocalCluster

    # runs_per_gpu: K, for _execute_point's memory share where workers have no GPU slots (cluster)
    conn = {"client": None, "cluster": None, "threads": None, "gpus": None, "shared": None, "submit": {},
            "retries": retries, "runs_per_gpu": runs_per_gpu}
    with dask.config.set({"distributed.scheduler.allowed-failures": retries}):  # read when a scheduler starts
        if scheduler is not None:
            try:
                conn["client"] = Client(scheduler, timeout=SCHEDULER_TIMEOUT_S)
            except (OSError, ValueError, TypeError) as e:
                raise ConfigError(f"--scheduler {scheduler!r}: no Dask scheduler answers at that address within "
                                  f"{SCHEDULER_TIMEOUT_S} s ({type(e).__name__}: {e}); start one with `dask "
                                  f"scheduler` and `dask worker ADDRESS`, or check the address") from None
            conn["where"] = f"the Dask scheduler at {scheduler}"
        elif kind == "slurm":
            opts = {k: v for k, v in cluster.items() if k != "kind"}
            conn["cluster"] = slurm_cluster(**opts, runs_per_gpu=runs_per_gpu)
            conn["cluster"].scale(jobs=workers)
            conn["client"] = Client(conn["cluster"])
            conn["where"] = (f"{workers} SLURM job(s) of one GPU each" + (f", {runs_per_gpu} runs per GPU"
                             if runs_per_gpu > 1 else "") + f" ({conn['cluster'].scheduler_address})")
        else:
            gpus = _gpu_slots(workers, runs_per_gpu)  # else every worker's run would land on the first GPU
            share = {"GPU": gpu_resource(runs_per_gpu)}
            # no dashboard, so nothing reads the workers' statistical profiler: its stack sample
            # every 10 ms takes CPU from the kernels beside it (docs/performance.md)
            with dask.config.set({"distributed.worker.profile.enabled": False}):
                conn["cluster"] = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                               dashboard_address=None, resources=share if gpus else None)
            conn["client"] = Client(conn["cluster"])
            conn["threads"] = max(1, (os.cpu_count() or 1) // workers)
            conn["gpus"] = gpus
            conn["runs_per_gpu"] = None  # each worker's share: how many slots hold its GPU (_assign_gpu)
            conn["submit"] = {"resources": share} if gpus else {}  # at most K points per GPU at a time
            conn["where"] = f"{workers} local Dask workers" + (f", GPUs {gpus}" if gpus else "")
    if kind != "local" or scheduler is not None:
        try:
            _check_cluster(conn, out, wait=kind == "slurm")
        except BaseException:
            _disconnect(conn)
            raise
    return conn


def _check_cluster(conn: dict, out: Path, wait: bool) -> None:
    """Workers of a cluster must share the repository and the outputs folder with the study: a
    token file written here must be visible there. Also sets each worker's thread share and
    whether points ask for a GPU (when the workers offer the resource GPU)."""
    client = conn["client"]
    token = out / "runs" / SHARED_TOKEN
    token.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(token, socket.gethostname().encode())
    conn["shared"] = str(token)
    if wait:  # SLURM jobs may wait in the queue: the first worker's arrival is the check
        print("waiting for the first SLURM worker to start ...", flush=True)
        client.wait_for_workers(1)
    problems = {w: p for w, p in client.run(_check_worker, str(token), str(ROOT)).items() if p}
    if problems:
        raise ConfigError("the Dask workers cannot run this study:\n  - " + "\n  - ".join(
            f"{w}: {p}" for w, p in problems.items()))
    info = client.scheduler_info()["workers"]
    hosts = Counter(_host(w) for w in info)
    conn["threads"] = dict(hosts)  # _run_threads: each worker's share of its host's CPUs
    if info and all((v.get("resources") or {}).get("GPU") for v in info.values()):
        # ask for 1/K, and never more than the smallest offer (workers started for a K it was not told)
        ask = min(gpu_resource(conn["runs_per_gpu"]), min(v["resources"]["GPU"] for v in info.values()))
        conn["submit"] = {"resources": {"GPU": ask}}
        conn["runs_per_gpu"] = max(1, round(1 / ask))  # the memory share of each run


def _disconnect(conn: dict | None) -> None:
    if conn is None:
        return
    client = conn["client"]
    if client is not None:
        try:
            client.run(shutdown_point_kernel)  # each worker's reused kernel
        except Exception:  # noqa: BLE001 — a worker already gone took its kernel with it
            pass
        client.close()
    if conn["cluster"] is not None:
        conn["cluster"].close()


def _map(items: list[dict], conn: dict | None, execute_point, wait: bool = False):
    """Yield (item, result) as they finish: in this process when conn is None, else on its
    Dask cluster (each point a task asking for one GPU where the workers offer them).
    `execute_point(item, threads, wait, gpus, shared, runs_per_gpu)` runs one point and never raises
    (bnlib.grid's; passed in, so that this module does not import the study runner)."""
    if not items:
        return
    if conn is None:
        try:
            for it in items:
                yield it, execute_point(it, wait=wait)
        finally:
            shutdown_point_kernel()
        return
    from dask.distributed import as_completed

    client = conn["client"]
    futures = {client.submit(execute_point, it, conn["threads"], wait, conn["gpus"], conn["shared"],
                             conn["runs_per_gpu"], key=f"bnlib-{it['run_id']}-{int(wait)}", pure=False,
                             retries=conn["retries"], **conn["submit"]): it
               for it in items}
    for fut in as_completed(futures):
        it = futures[fut]
        try:
            res = fut.result()
        except Exception as e:  # noqa: BLE001 — KilledWorker: its worker died more than `retries` times
            res = {"run_id": it["run_id"], "status": "failed",
                   "error": f"{type(e).__name__}: {e}"[:300] + " (run the study again to resume it)"}
        yield it, res

