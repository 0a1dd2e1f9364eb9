"""The Python steps of `make gpu-check` (scripts/gpu_check.sh runs each under its own timeout):

    gpu_check.py dataset               the P1 grid's data set here: the preset's if it can be read
                                       without a download, else 'synthetic'
    gpu_check.py resume OUT            a CUDA run killed with SIGKILL after its first checkpoint,
                                       then resumed: completed, provenance start -> resume
    gpu_check.py summary OUT           OUT/gpu_check.json and OUT/summary.txt from the steps' logs
"""
from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_IMAGES = 50_000  # s/epoch is reported for a CIFAR-sized epoch


def dataset() -> str:
    import bnlib
    from bnlib.data import check_data

    try:
        check_data(bnlib.validate(dataset="fashion_mnist", download=False, device="cpu"))
        return "fashion_mnist"
    except Exception:  # noqa: BLE001 — not here, offline: the generated set needs no files
        return "synthetic"


def resume(out: Path) -> int:
    """SIGKILL a CUDA run once its first epoch checkpoint exists, rerun it, check the records."""
    runs = out / "resume"
    cmd = [sys.executable, "-m", "bnlib", "run", "--device", "cuda", "--arch", "resnet18", "--width", "0.5",
           "--dataset", "synthetic", "--synthetic_size", "30000", "--epochs", "3", "--progress", "false",
           "--out_dir", str(runs)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0, killed = time.monotonic(), False
    while time.monotonic() - t0 < 45 and proc.poll() is None:
        if any(runs.glob("*/checkpoint.pt")):
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.2)
    proc.wait()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    conf = [json.loads(p.read_text()) for p in runs.glob("*/config.json")]
    events = [e.get("event") for e in conf[0]["provenance_history"]] if conf else []
    status = json.loads(res.stdout).get("status") if res.returncode == 0 else None
    ok = killed and status == "completed" and events == ["start", "resume"]
    result = {"killed_after_checkpoint": killed, "status": status, "provenance_events": events, "ok": ok,
              "stderr_tail": res.stderr[-500:]}
    (out / "resume.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0 if ok else 1


def _steps(out: Path) -> list[dict]:
    steps = []
    for line in (out / "steps.txt").read_text().splitlines() if (out / "steps.txt").exists() else []:
        name, rc, seconds, limit = line.split()
        steps.append({"step": name, "exit": int(rc), "seconds": int(seconds), "limit_s": int(limit),
                      "timed_out": int(rc) in (124, 137)})
    return steps


def _bench(out: Path) -> dict:
    try:
        results = json.loads((out / "bench" / "bench.json").read_text())["results"]
    except (OSError, ValueError, KeyError):
        return {}
    rows = {}
    for e in results:
        ips = e["img_per_s"]["median"] if isinstance(e.get("img_per_s"), dict) else e.get("img_per_s")
        if ips:
            rows[e["name"]] = {"precision": e.get("precision"), "img_per_s": round(ips, 1),
                               "s_per_epoch_50k": round(BENCH_IMAGES / ips, 2)}
    return rows


def _cpu_wall(points: list[dict], runs_dir: Path) -> dict:
    """The same grid's CPU runs in the main outputs folder, if a CPU study left them there: the
    span from the first start to the last finish, and the runs found."""
    import bnlib
    from bnlib.records import run_id

    spans, found = [], 0
    for p in points:
        try:
            cfg = bnlib.validate({**p, "device": "cpu", "precision": "auto", "out_dir": str(runs_dir)})
            st = json.loads((runs_dir / run_id(cfg) / "status.json").read_text())
        except Exception:  # noqa: BLE001 — not run on a CPU here
            continue
        if st.get("started") and st.get("finished"):
            found += 1
            spans.append((time.mktime(time.strptime(st["started"][:19], "%Y-%m-%dT%H:%M:%S")),
                          time.mktime(time.strptime(st["finished"][:19], "%Y-%m-%dT%H:%M:%S"))))
    wall = max(b for _, b in spans) - min(a for a, _ in spans) if spans else None
    return {"cpu_runs_found": found, "cpu_wall_s": wall, "cpu_records": str(runs_dir)}


def _grid(out: Path, steps: list[dict]) -> dict:
    manifest = out / "p1" / "studies" / "p1" / "manifest.json"
    step = next((s for s in steps if s["step"] == "p1_grid"), None)
    if not manifest.exists() or step is None:
        return {}
    m = json.loads(manifest.read_text())
    statuses = {}
    for rid in m["run_ids"]:
        try:
            st = json.loads((out / "p1" / "runs" / rid / "status.json").read_text()).get("status")
        except (OSError, ValueError):
            st = "missing"
        statuses[st] = statuses.get(st, 0) + 1
    log = (out / "logs" / "p1_grid.log").read_text() if (out / "logs" / "p1_grid.log").exists() else ""
    k = re.search(r"runs-per-gpu (\d+)", (out / "logs" / "p1_grid.cmd").read_text()) \
        if (out / "logs" / "p1_grid.cmd").exists() else None
    return {"runs": len(m["run_ids"]), "statuses": statuses, "gpu_wall_s": step["seconds"],
            "runs_per_gpu": int(k.group(1)) if k else None, "dataset": m.get("dataset_override"),
            "where": next((ln for ln in log.splitlines() if " -> " in ln and " on " in ln), None),
            **_cpu_wall(m["points"], ROOT / "outputs" / "runs")}


def _pytest(out: Path) -> str | None:
    log = out / "logs" / "pytest_cuda.log"
    lines = [ln for ln in log.read_text().splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", ln)] \
        if log.exists() else []
    return lines[-1].strip("= ") if lines else None


def summary(out: Path) -> int:
    import torch

    steps = _steps(out)
    res_file = out / "resume.json"
    data = {"host": socket.gethostname(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "steps": steps,
            "pytest_cuda": _pytest(out), "bench": _bench(out), "p1_grid": _grid(out, steps),
            "resume": json.loads(res_file.read_text()) if res_file.exists() else None,
            "ok": bool(steps) and all(s["exit"] == 0 for s in steps)}
    (out / "gpu_check.json").write_text(json.dumps(data, indent=1))
    lines = [f"gpu-check on {data['host']} ({data['gpu']}, torch {data['torch']}): "
             + ("every step passed" if data["ok"] else "SOME STEPS FAILED")]
    lines += [f"  {s['step']:<12} exit {s['exit']:>3}  {s['seconds']:>4} s of {s['limit_s']} s"
              + ("  (timed out)" if s["timed_out"] else "") for s in steps]
    lines.append(f"  pytest -m cuda: {data['pytest_cuda']}")
    for name, b in data["bench"].items():
        lines.append(f"  bench {name} ({b['precision']}): {b['img_per_s']} img/s, {b['s_per_epoch_50k']} s per "
                     f"epoch of {BENCH_IMAGES} images (ResNet-18 width 1)")
    g = data["p1_grid"]
    if g:
        cpu = (f"CPU wall {g['cpu_wall_s']:.0f} s from {g['cpu_runs_found']} of its runs' records"
               if g["cpu_wall_s"] is not None else "no CPU records of this grid in outputs/runs")
        lines.append(f"  P1 quick grid, {g['runs']} runs, {g['runs_per_gpu']} per GPU: {g['statuses']}, GPU wall "
                     f"{g['gpu_wall_s']} s; {cpu}")
    if data["resume"]:
        lines.append(f"  resume after SIGKILL: {'ok' if data['resume']['ok'] else 'FAILED'} "
                     f"({data['resume']['status']}, {data['resume']['provenance_events']})")
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "dataset":
        print(dataset())
        sys.exit(0)
    if cmd in ("resume", "summary") and len(sys.argv) == 3:
        sys.exit({"resume": resume, "summary": summary}[cmd](Path(sys.argv[2])))
    print(__doc__, file=sys.stderr)
    sys.exit(2)
