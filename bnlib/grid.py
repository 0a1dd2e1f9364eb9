"""Run a study: every grid point through papermill (notebooks/run.ipynb) into its own run
directory, then the study's analysis notebook; `study all` adds the summary and the report.

Resume follows from run identity: a point whose run directory says `completed` or `diverged`
is skipped; an interrupted or failed one resumes from its last checkpoint. A point whose
notebook fails (an error, running out of memory, a killed kernel) is recorded `failed` with its
reason and the grid goes on. Two study processes on one outputs folder share the work: a point
held by the other is left to it, and waited for at the end. With `workers > 1` the points run
on a Dask cluster (local processes, or `scheduler=` an existing cluster's address), one
papermill kernel per task.
"""
from __future__ import annotations

import atexit
import functools
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from .config import ConfigError, validate
from .records import FINISHED, RunDir, atomic_write, check_writable, run_id
from .studies import STUDIES, Study, get_study

__all__ = ["run_study", "run_all", "plan", "load_study", "execute_notebook", "execute_shared_notebook", "ROOT",
           "NOTEBOOKS"]

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


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


def plan(study: Study, preset: str, out: Path, dataset: str | None = None) -> list[dict]:
    """Check every point before anything runs (parameters, data sets, the outputs folder);
    return [{params, run_id, status, epochs}]. `dataset` overrides the preset's data set.
    Raises ConfigError listing every problem."""
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
        items.append({"params": {**point, "out_dir": str(runs_dir)}, "run_id": rid, "status": status,
                      "epochs": cfg["epochs"]})
    for cfg in data_specs.values():  # once per data set, not once per point
        try:
            check_data(cfg)
        except ConfigError as e:
            errors.append(str(e))
    if errors:
        raise ConfigError(f"study {study.name!r} preset {preset!r} has invalid points:\n" + "\n".join(errors))
    check_writable(runs_dir)
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


def _execute_point(item: dict, threads: int | None = None, wait: bool = False, gpus: list[str] | None = None) -> dict:
    """Run one grid point through run.ipynb; never raises (a failure is a recorded result).

    The study runner holds the run directory's "notebook" lock while papermill writes the
    executed notebook there; the kernel's bnlib.run holds the "run" lock while it trains. A
    point held by another live process is "locked" (with `wait`, block until it is free).
    `gpus`: on a LocalCluster worker, one GPU per worker (_gpu_slots)."""
    from filelock import Timeout

    if threads:  # the kernel inherits this environment
        os.environ["OMP_NUM_THREADS"] = str(threads)
    # Dask's nanny gives its workers MALLOC_TRIM_THRESHOLD_=65536 (distributed.yaml,
    # pre-spawn-environ). A kernel that inherits it has glibc's dynamic mmap threshold off, so
    # every large tensor is mmapped and page-faulted afresh: training measured 2.7x slower.
    os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    if gpus:
        _assign_gpu(gpus)
    rd = RunDir(Path(item["params"]["out_dir"]) / item["run_id"])
    res = {"run_id": item["run_id"], "seconds": 0.0}
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
        if rd.locked("run"):  # a live `bnlib run` of the same parameters outside this study
            return {**res, "status": "locked"}
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
              dataset: str | None = None) -> Counter:
    """Run (or resume) every point of `study` at `preset` (on `dataset` instead of the preset's
    when given), then its analysis notebook. Returns the counts of completed / diverged /
    failed / skipped runs."""
    study = get_study(study) if isinstance(study, str) else study
    out = Path(out).resolve()
    items = plan(study, preset, out, dataset)
    todo = [it for it in items if it["status"] not in FINISHED]
    counts = Counter(skipped=len(items) - len(todo))
    print(f"study {study.name} [{preset}]: {len(items)} runs, {sum(i['epochs'] for i in items)} epochs "
          f"({len(todo)} to run, {counts['skipped']} already done) -> {out / 'runs'}", flush=True)
    _write_manifest(study, preset, out, items, dataset)
    bar = tqdm(total=len(todo), desc=f"study {study.name}", unit="run", disable=not progress or not todo,
               file=sys.stderr)
    held = []
    for res in _map(todo, workers, scheduler):
        if res["status"] == "locked":  # another live process runs it now
            held.append(next(it for it in todo if it["run_id"] == res["run_id"]))
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
        try:
            for it in held:
                res = _execute_point(it, wait=True)
                counts[res["status"]] += 1
                if res["status"] == "failed":
                    print(f"  failed: {res['run_id']}: {res.get('error', '')}", file=sys.stderr)
        finally:
            shutdown_point_kernel()
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


def _map(items: list[dict], workers: int, scheduler: str | None):
    """Yield results as they finish: in-process when workers == 1, else on a Dask cluster."""
    if not items:
        return
    if workers <= 1 and scheduler is None:
        try:
            for it in items:
                yield _execute_point(it)
        finally:
            shutdown_point_kernel()
        return
    from dask.distributed import Client, LocalCluster, as_completed

    if scheduler:
        client, cluster = Client(scheduler), None
        threads, gpus = None, None
    else:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster)
        threads = max(1, (os.cpu_count() or 1) // workers)
        gpus = _gpu_slots(workers)  # else every worker's run would land on the first GPU
    try:
        futures = [client.submit(_execute_point, it, threads, False, gpus, key=f"bnlib-{it['run_id']}", pure=False)
                   for it in items]
        for fut in as_completed(futures):
            yield fut.result()
    finally:
        try:
            client.run(shutdown_point_kernel)  # each worker's reused kernel
        except Exception:  # noqa: BLE001 — a worker already gone took its kernel with it
            pass
        client.close()
        if cluster is not None:
            cluster.close()


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

    out = Path(out)
    manifest = json.loads((out / "studies" / study / "manifest.json").read_text())
    runs = load_runs(out / "runs", run_ids=set(manifest["run_ids"]))
    return runs, manifest


def run_all(preset: str = "quick", out="outputs", workers: int = 1, scheduler: str | None = None,
            studies: list[str] | None = None, dataset: str | None = None) -> dict:
    """Every study, then the summary notebook and the HTML report (the main job, `make study`).
    Every study's points are checked (parameters, data sets) before the first one runs."""
    from .report import build_report

    out = Path(out).resolve()
    names = studies or list(STUDIES)
    for name in names:  # a missing data set or a bad point stops here, before any run
        plan(get_study(name), preset, out, dataset)
    results = {}
    for name in names:
        results[name] = run_study(name, preset, out, workers, scheduler, dataset=dataset)
    execute_shared_notebook(NOTEBOOKS / "summary.ipynb", out / "summary.ipynb", {"out": str(out)})
    index = build_report(out)
    print(f"report: {index}")
    return results
