"""Run a study: every grid point through papermill (notebooks/run.ipynb) into its own run
directory, then the study's analysis notebook; `study all` adds the summary and the report.

Resume follows from run identity: a point whose run directory says `completed` or `diverged`
is skipped; an interrupted or failed one resumes from its last checkpoint. A point whose
notebook fails (an error, running out of memory, a killed kernel) is recorded `failed` with its
reason and the grid goes on. Two study processes on one outputs folder share the work: a point
held by the other is left to it, and waited for at the end. With `workers > 1` the points run
on a Dask cluster (local processes, or `scheduler=` an existing cluster's address), one
papermill kernel per task.

Scale-out is Dask's: a LocalCluster (`workers`), a running scheduler (`scheduler=ADDRESS`,
reached within SCHEDULER_TIMEOUT_S or the study stops before writing anything), or
dask-jobqueue's SLURMCluster (`cluster={"kind": "slurm", ...}`: one job per worker, one GPU
per job). Every point is a task asking for the worker resource GPU=1 wherever the workers offer
it (a LocalCluster on a machine with a GPU per worker, SLURM jobs, `dask worker --resources
GPU=1`), so a GPU runs one point at a time. Before the first task, every worker must see the
study's repository and outputs folder (a token file written by the study). A point whose worker
dies is started again by the scheduler (up to `retries` times, Dask's allowed-failures) and
resumes from its last checkpoint; a point that fails by itself returns a `failed` result instead
of raising, so Dask never retries it.

Run identity: a run's id hashes its resolved device type and precision (device/precision
'auto' become e.g. cuda/bf16 or cpu/fp32), because a bf16 GPU run and an fp32 CPU run compute
different things and must not share a folder. They are resolved where the run executes: the
worker validates the point and computes the id, the result carries it, and the manifest is
rewritten from the results. The study process's own resolution (a CPU login node in front of
GPU workers) only decides what it may skip: a point with 'auto' is sent to the cluster, whose
worker answers "skipped" for a finished run without starting a kernel. (Hashing the requested
'auto' instead would merge bf16 and fp32 runs into one id.)
"""
from __future__ import annotations

import atexit
import functools
import json
import os
import socket
import sys
import time
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from .config import ConfigError, validate
from .records import FINISHED, RunDir, atomic_write, check_writable, run_id
from .studies import STUDIES, Study, get_study

__all__ = ["run_study", "run_all", "plan", "load_study", "execute_notebook", "execute_shared_notebook", "ROOT",
           "NOTEBOOKS", "slurm_cluster"]

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"

# Dask's scheduler starts a task again when the worker running it dies, up to
# `distributed.scheduler.allowed-failures` times, then fails it with KilledWorker; a point
# resumes from its last checkpoint each time. The study sets this on the schedulers it starts
# (LocalCluster, SLURMCluster); a scheduler joined with --scheduler keeps its own setting.
RETRIES = 2
SCHEDULER_TIMEOUT_S = 10  # a scheduler that does not answer within this fails the study at once
SHARED_TOKEN = ".bnlib-shared-check"


@functools.lru_cache(maxsize=None)
def _kernel_manager_class():
    """nbclient's kernel manager, asked to give each kernel CurveZMQ keys (jupyter_client >= 8.10,
    pyzmq with libsodium): the kernel's TCP sockets are then encrypted, on a shared machine too,
    and it does not print its plain-TCP warning into every study runner's output. The async
    manager, also for the reused kernel this process starts itself (_point_kernel): with a
    blocking manager nbclient never notices that its kernel died (measured: it hangs)."""
    import zmq
    from jupyter_client.manager import AsyncKernelManager

    if "transport_encryption" not in AsyncKernelManager.class_trait_names() or not zmq.has("curve"):
        return AsyncKernelManager

    class CurveKernelManager(AsyncKernelManager):
        def __init__(self, **kw):
            super().__init__(**{"transport_encryption": "auto", **kw})

    return CurveKernelManager


def execute_notebook(src: Path, dst: Path, parameters: dict, cwd: Path = ROOT, km=None) -> None:
    """papermill with the settings every bnlib notebook uses (the kernel is this Python's).

    The executed notebook is saved after every cell to `.NAME.partial.ipynb` beside `dst` (watch it
    there) and moved onto `dst` when execution ends, failed or not: a reader (the report, a
    second study process) never sees a half-written `dst`. `km`: an already started kernel to
    run in (papermill passes it to nbclient, which then neither starts nor stops a kernel);
    None starts a fresh kernel for this notebook alone."""
    import papermill as pm

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    partial = dst.parent / f".{dst.stem}.partial{dst.suffix}"
    kernel = {"km": km} if km is not None else {"kernel_manager_class": _kernel_manager_class()}
    try:
        pm.execute_notebook(str(src), str(partial), parameters=parameters, cwd=str(cwd), kernel_name="python3",
                            progress_bar=False, log_output=False, request_save_on_cell_execute=True, **kernel)
    finally:
        if partial.exists():
            os.replace(partial, dst)


# One kernel per study process (or Dask worker), reused by its grid points: starting a kernel
# and importing torch and bnlib costs ~5 s, as much as training a quick-preset run (README:
# measured). run.ipynb's first cell clears the namespace (%reset -f), so each run starts from
# clean globals; the kernel is replaced after any point that did not finish (a failed run may
# hold memory through its traceback, a killed kernel is gone) and every KERNEL_REUSE points.
KERNEL_REUSE = 40
_KERNEL: dict = {}  # {"km": KernelManager, "uses": int, "env": (OMP_NUM_THREADS, CUDA_VISIBLE_DEVICES)}


def _point_kernel():
    """This process's kernel for grid points, started on first use and restarted when it died,
    was used KERNEL_REUSE times, or the thread/GPU environment it must inherit changed."""
    from jupyter_core.utils import run_sync

    env = (os.environ.get("OMP_NUM_THREADS"), os.environ.get("CUDA_VISIBLE_DEVICES"))
    k = _KERNEL
    if k and (k["uses"] >= KERNEL_REUSE or k["env"] != env or not run_sync(k["km"].is_alive)()):
        shutdown_point_kernel()
    if not k:
        km = _kernel_manager_class()(kernel_name="python3")
        run_sync(km.start_kernel)(cwd=str(ROOT))
        k.update(km=km, uses=0, env=env)
    k["uses"] += 1
    return k["km"]


def shutdown_point_kernel() -> None:
    """Stop this process's reused kernel, if any (at the end of a study, and at exit)."""
    from jupyter_core.utils import run_sync

    km = _KERNEL.pop("km", None)
    _KERNEL.clear()
    if km is not None:
        try:
            run_sync(km.shutdown_kernel)()  # a polite shutdown request first (now=True interrupts, which the kernel logs)
        except Exception:  # noqa: BLE001 — already dead: nothing to stop
            pass


atexit.register(shutdown_point_kernel)  # a no-op when this process started no kernel


def execute_shared_notebook(src: Path, dst: Path, parameters: dict) -> None:
    """execute_notebook for outputs two study processes may both produce (a study's analysis,
    the summary): one at a time, the later one redoing it with every run present."""
    from filelock import FileLock

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dst.parent / f".{dst.stem}.lock")):
        execute_notebook(src, dst, parameters)


def plan(study: Study, preset: str, out: Path, dataset: str | None = None, check: bool = True) -> list[dict]:
    """Check every point before anything runs (parameters, data sets, the outputs folder);
    return [{params, run_id, status, epochs, auto, cfg}]. `dataset` overrides the preset's
    data set. Raises ConfigError listing every problem. `check=False` checks the parameters
    only, not the data sets or the outputs folder (`study --plan` on a machine without the data)."""
    from .data import check_data

    runs_dir = Path(out) / "runs"
    items, errors, data_specs = [], [], {}
    for i, point in enumerate(study.points(preset, dataset)):
        try:
            cfg = validate({**point, "out_dir": str(runs_dir)})
        except ConfigError as e:
            errors.append(f"point {i} {point}: {e}")
            continue
        data_specs.setdefault((cfg["dataset"], cfg["data_dir"], cfg["download"]), cfg)
        rid = run_id(cfg)
        rd = RunDir(runs_dir / rid)
        status = (rd.status() or {}).get("status")
        if status in FINISHED and (problem := rd.verify()):
            print(f"  {rid}: {status} but damaged ({problem}): will run again", file=sys.stderr)
            status = "damaged"
        # device or precision 'auto': resolved where the run executes, so its id is known there
        auto = "auto" in (point.get("device", "auto"), point.get("precision", "auto"))
        items.append({"params": {**point, "out_dir": str(runs_dir)}, "run_id": rid, "status": status,
                      "epochs": cfg["epochs"], "auto": auto, "cfg": cfg})
    if check and not errors:  # the outputs folder first (creates nothing), then the data sets
        check_writable(runs_dir)
    # once per data set, not once per point; not at all for a rejected grid (a check may stage
    # files into data_dir: a rejected command leaves nothing behind)
    for cfg in data_specs.values() if check and not errors else ():
        try:
            check_data(cfg)
        except ConfigError as e:
            errors.append(str(e))
    if errors:
        raise ConfigError(f"study {study.name!r} preset {preset!r} has invalid points:\n" + "\n".join(errors))
    return items


def _failure_reason(e: Exception, before: dict | None, after: dict | None) -> str:
    """Why a point's notebook failed: the run's own recorded error when it wrote one (e.g.
    "out of memory: ..."), else what the notebook or the kernel reported."""
    if after and after != before and after.get("status") == "failed" and after.get("error"):
        return after["error"]
    if type(e).__name__ == "DeadKernelError":
        return ("kernel died: the run's process was killed (by the OS out-of-memory killer, a scheduler or "
                "a signal) or crashed; run the study again to resume it from its last checkpoint")
    return f"{getattr(e, 'ename', type(e).__name__)}: {getattr(e, 'evalue', str(e))}"


def _gpu_slots(workers: int) -> list[str] | None:
    """The GPU each local Dask worker gets, when there is one for each of several workers: the
    ids of the visible GPUs, in order (honouring a CUDA_VISIBLE_DEVICES the study runs under).
    None otherwise: the workers then share what they see (device 'auto' is the first GPU)."""
    import torch

    n = torch.cuda.device_count()  # does not create a CUDA context in this process
    if workers <= 1 or n < workers:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",") if v.strip()] if visible else [str(i) for i in range(n)]
    return ids[:workers]


def _assign_gpu(gpus: list[str]) -> str:
    """On a LocalCluster worker: make this worker's GPU the only one its kernels see. Worker
    names are 0..n-1 and survive a restart by the nanny, so a worker keeps its GPU."""
    from distributed import get_worker

    gpu = gpus[int(get_worker().name) % len(gpus)]
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # the papermill kernel inherits this environment
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


RUN_LOCK_GRACE_S = 20.0  # _execute_point: how long a waiting study gives a held run lock to be freed


def _execute_point(item: dict, threads=None, wait: bool = False, gpus: list[str] | None = None,
                   shared: str | None = None) -> dict:
    """Run one grid point through run.ipynb; never raises (a failure is a recorded result, so
    Dask's retries, meant for a worker that died, never re-run a deterministic failure).

    The point's device and precision are resolved here, where it runs, and its run id computed
    from them (module docstring: run identity); the result carries that id. The study runner
    holds the run directory's "notebook" lock while papermill writes the executed notebook
    there; the kernel's bnlib.run holds the "run" lock while it trains. A point held by another
    live process is "locked" (with `wait`, block until it is free). `threads`: _run_threads.
    `gpus`: on a LocalCluster worker, one GPU per worker (_gpu_slots). `shared`: a file the
    study process wrote into the outputs folder, which this worker must see (a shared file
    system)."""
    from filelock import Timeout

    if (n := _run_threads(threads)) is not None:  # the kernel inherits this environment
        os.environ["OMP_NUM_THREADS"] = str(n)
    # Dask's nanny gives its workers MALLOC_TRIM_THRESHOLD_=65536 (distributed.yaml,
    # pre-spawn-environ). A kernel that inherits it has glibc's dynamic mmap threshold off, so
    # every large tensor is mmapped and page-faulted afresh: training measured 2.7x slower.
    os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    if gpus:
        _assign_gpu(gpus)  # before the device is resolved: the run sees only its own GPU
    res = {"run_id": item["run_id"], "planned_id": item["run_id"], "seconds": 0.0}
    if shared and not Path(shared).exists():
        return {**res, "status": "failed", "error": _not_shared(socket.gethostname(), shared)}
    try:
        rid = run_id(validate(item["params"]))
    except ConfigError as e:  # e.g. a point asking for cuda on a worker without one
        return {**res, "status": "failed", "error": f"on {socket.gethostname()}: {e}"[:2000]}
    res["run_id"] = rid
    rd = RunDir(Path(item["params"]["out_dir"]) / rid)
    t0 = time.perf_counter()
    try:
        rd.path.mkdir(parents=True, exist_ok=True)
        nb_lock = rd.lock("notebook")
        nb_lock.acquire(timeout=-1 if wait else 0)
    except Timeout:
        return {**res, "status": "locked"}
    except OSError as e:
        return {**res, "status": "failed", "error": f"cannot write {rd.path}: {e}"}
    try:
        before = rd.status()
        if (before or {}).get("status") in FINISHED and not rd.verify():  # finished elsewhere meanwhile
            return {**res, "status": "skipped"}
        # a live `bnlib run` of the same parameters outside this study. With `wait`, give it
        # RUN_LOCK_GRACE_S to let go (the kernel of a worker that was just killed, whose lock the
        # OS frees a moment later), but no longer: a run held by a live process outside any
        # study is skipped, not waited for (it may be this very process's own).
        grace = time.monotonic() + (RUN_LOCK_GRACE_S if wait else 0.0)
        while rd.locked("run"):
            if time.monotonic() >= grace:
                return {**res, "status": "locked"}
            time.sleep(1.0)
        try:
            execute_notebook(NOTEBOOKS / "run.ipynb", rd.path / "run.ipynb", item["params"], km=_point_kernel())
        except Exception as e:  # noqa: BLE001 — papermill errors, a dead kernel, ...
            shutdown_point_kernel()  # the next point gets a fresh kernel
            if getattr(e, "ename", None) == "RunLocked":  # another live process runs it: not ours to mark
                return {**res, "status": "locked", "seconds": time.perf_counter() - t0}
            st = rd.status()
            reason = _failure_reason(e, before, st)
            st = st or {}
            try:
                rd.write_json("status", {**st, "status": "failed", "training_status": st.get("status"),
                                         "error": reason[:2000], "notebook": str(rd.path / "run.ipynb")})
            except OSError as w:
                reason += f" (and its status could not be written: {w})"
            return {**res, "status": "failed", "error": reason[:300], "seconds": time.perf_counter() - t0}
        st = rd.status() or {}
        return {**res, "status": st.get("status", "failed"), "seconds": time.perf_counter() - t0}
    finally:
        nb_lock.release()


def run_study(study: Study | str, preset: str = "quick", out="outputs", workers: int = 1,
              scheduler: str | None = None, analyze: bool = True, progress: bool = True,
              dataset: str | None = None, cluster: dict | None = None, retries: int = RETRIES) -> Counter:
    """Run (or resume) every point of `study` at `preset` (on `dataset` instead of the preset's
    when given), then its analysis notebook. Returns the counts of completed / diverged /
    failed / skipped runs. `scheduler`: a running Dask scheduler's address; `cluster`:
    {"kind": "slurm", ...slurm_cluster options} to start `workers` SLURM jobs; else `workers`
    local processes (1: in this process). `retries`: how often a point whose worker died is
    started again (from its checkpoint) before it counts as failed."""
    study = get_study(study) if isinstance(study, str) else study
    out = Path(out).resolve()
    items = plan(study, preset, out, dataset)
    remote = scheduler is not None or (cluster or {}).get("kind", "local") != "local"
    # Where the study process cannot know a run's id (device or precision 'auto', resolved by
    # the worker), only the worker can say whether it is done: such points go to the cluster,
    # which answers "skipped" for a finished one without starting a kernel.
    todo = [it for it in items if it["status"] not in FINISHED or (remote and it["auto"])]
    counts = Counter(skipped=len(items) - len(todo))
    conn = _connect(workers, scheduler, cluster, retries, out) if todo else None  # fails before the manifest
    try:
        print(f"study {study.name} [{preset}]: {len(items)} runs, {sum(i['epochs'] for i in items)} epochs "
              f"({len(todo)} to run, {counts['skipped']} already done) -> {out / 'runs'}"
              + (f" on {conn['where']}" if conn else ""), flush=True)
        _write_manifest(study, preset, out, items, dataset)
        bar = tqdm(total=len(todo), desc=f"study {study.name}", unit="run", disable=not progress or not todo,
                   file=sys.stderr)
        held = []
        try:
            for it, res in _map(todo, conn):
                it["run_id"] = res["run_id"]  # the id the worker resolved (module docstring)
                if res["status"] == "locked":  # another live process runs it now
                    held.append(it)
                else:
                    counts[res["status"]] += 1
                if res["status"] == "failed":
                    tqdm.write(f"  failed: {res['run_id']}: {res.get('error', '')}", file=sys.stderr)
                bar.set_postfix({k: counts[k] for k in ("completed", "diverged", "failed")}
                                | ({"held_elsewhere": len(held)} if held else {}), refresh=False)
                bar.update(1)
            bar.close()
            if held:  # another live process had them: wait for it, then take over what it left undone
                print(f"study {study.name}: waiting for {len(held)} run(s) held by another process", flush=True)
                for it, res in _map(held, conn, wait=True):
                    it["run_id"] = res["run_id"]
                    counts[res["status"]] += 1
                    if res["status"] == "failed":
                        print(f"  failed: {res['run_id']}: {res.get('error', '')}", file=sys.stderr)
        finally:
            bar.close()
            _write_manifest(study, preset, out, items, dataset)  # the ids the runs really have
    finally:
        _disconnect(conn)
    counts["skipped"] += counts.pop("locked", 0)  # still held by a live process outside any study
    print(f"study {study.name}: " + " / ".join(f"{k} {counts[k]}" for k in ("completed", "diverged", "failed",
                                                                           "skipped")), flush=True)
    if analyze and study.notebook:
        dst = out / "studies" / study.name / f"{study.name}.ipynb"
        try:
            execute_shared_notebook(NOTEBOOKS / study.notebook, dst, {"out": str(out), "study": study.name})
        except Exception as e:  # noqa: BLE001 — the runs are kept; the analysis can be rerun
            print(f"study {study.name}: analysis notebook failed ({type(e).__name__}); see {dst}", file=sys.stderr)
            counts["analysis_failed"] += 1
    return counts


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
                  account: str | None = None, cores: int | None = None, gpus: int = 1, **kw):
    """dask-jobqueue's SLURMCluster with one worker per job, `gpus` GPUs per job (sbatch
    --gres=gpu:N; SLURM then sets the job's CUDA_VISIBLE_DEVICES) and the worker resource
    GPU=N that every grid point asks for. Options left None come from the user's dask-jobqueue
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
        extra_args += ["--resources", f"GPU={gpus}"]
    opts = {k: v for k, v in dict(queue=partition, walltime=walltime, memory=memory, account=account,
                                  cores=cores).items() if v is not None}
    try:
        return SLURMCluster(processes=1, job_extra_directives=directives, worker_extra_args=extra_args,
                            **opts, **kw)
    except ValueError as e:  # dask-jobqueue's "You must specify how much cores and memory per job"
        raise ConfigError(f"--cluster slurm: {e}; give --cores and --memory, or set jobqueue.slurm cores/memory "
                          f"in ~/.config/dask/jobqueue.yaml") from None


def _connect(workers: int, scheduler: str | None, cluster: dict | None, retries: int, out: Path) -> dict | None:
    """The Dask client the points run on (None: in this process), checked before anything is
    written: an unreachable scheduler, or workers that cannot see the repository and the
    outputs folder, stop the study here with an error naming the option and the address."""
    kind = (cluster or {}).get("kind", "local")
    if scheduler is None and kind == "local" and workers <= 1:
        return None
    import dask
    from dask.distributed import Client, LocalCluster

    conn = {"client": None, "cluster": None, "threads": None, "gpus": None, "shared": None, "submit": {},
            "retries": retries}
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
            conn["cluster"] = slurm_cluster(**opts)
            conn["cluster"].scale(jobs=workers)
            conn["client"] = Client(conn["cluster"])
            conn["where"] = f"{workers} SLURM job(s) of one GPU each ({conn['cluster'].scheduler_address})"
        else:
            gpus = _gpu_slots(workers)  # else every worker's run would land on the first GPU
            conn["cluster"] = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                           dashboard_address=None, resources={"GPU": 1} if gpus else None)
            conn["client"] = Client(conn["cluster"])
            conn["threads"] = max(1, (os.cpu_count() or 1) // workers)
            conn["gpus"] = gpus
            conn["submit"] = {"resources": {"GPU": 1}} if gpus else {}  # one point per GPU at a time
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
        conn["submit"] = {"resources": {"GPU": 1}}


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


def _map(items: list[dict], conn: dict | None, wait: bool = False):
    """Yield (item, result) as they finish: in this process when conn is None, else on its
    Dask cluster (each point a task asking for one GPU where the workers offer them)."""
    if not items:
        return
    if conn is None:
        try:
            for it in items:
                yield it, _execute_point(it, wait=wait)
        finally:
            shutdown_point_kernel()
        return
    from dask.distributed import as_completed

    client = conn["client"]
    futures = {client.submit(_execute_point, it, conn["threads"], wait, conn["gpus"], conn["shared"],
                             key=f"bnlib-{it['run_id']}-{int(wait)}", pure=False,
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


def _write_manifest(study: Study, preset: str, out: Path, items: list[dict], dataset: str | None = None) -> None:
    d = out / "studies" / study.name
    d.mkdir(parents=True, exist_ok=True)
    manifest = {"study": study.name, "title": study.title, "preset": preset, "axes": study.axes(preset),
                "dataset_override": dataset,
                "run_ids": [it["run_id"] for it in items],
                "points": [{k: v for k, v in it["params"].items() if k != "out_dir"} for it in items]}
    atomic_write(d / "manifest.json", json.dumps(manifest, indent=1).encode())


def load_study(out="outputs", study: str = "p1"):
    """The runs of one study (from its manifest) as bnlib.Runs, plus the manifest."""
    from .records import load_runs

    from .records import record_problem

    out = Path(out)
    path = out / "studies" / study / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"study={study!r}: its manifest {str(path)!r} cannot be read ({type(e).__name__}: {e}); "
                          f"run the study (python -m bnlib study {study}) to write it") from None
    if (problem := record_problem("manifest", manifest)) is not None:
        raise ConfigError(f"study={study!r}: {str(path)!r} has the wrong shape ({problem}); run the study again "
                          f"to rewrite it") from None
    runs = load_runs(out / "runs", run_ids=set(manifest["run_ids"]))
    return runs, manifest


def run_all(preset: str = "quick", out="outputs", workers: int = 1, scheduler: str | None = None,
            studies: list[str] | None = None, dataset: str | None = None, cluster: dict | None = None,
            retries: int = RETRIES) -> dict:
    """Every study, then the summary notebook and the HTML report (the main job, `make study`).
    Every study's points are checked (parameters, data sets) before the first one runs.
    `scheduler`, `cluster`, `retries`: as run_study."""
    from .report import build_report

    out = Path(out).resolve()
    names = studies or list(STUDIES)
    for name in names:  # a missing data set or a bad point stops here, before any run
        plan(get_study(name), preset, out, dataset)
    results = {}
    for name in names:
        results[name] = run_study(name, preset, out, workers, scheduler, dataset=dataset, cluster=cluster,
                                  retries=retries)
    execute_shared_notebook(NOTEBOOKS / "summary.ipynb", out / "summary.ipynb", {"out": str(out)})
    index = build_report(out)
    print(f"report: {index}")
    return results
