"""Where a run computes and at what precision: the device, the precision choice, the backend
flags (TF32, cuDNN autotuning, determinism) and the facts about them a run records.

Precisions (the `precision` run parameter):

    fp32  IEEE fp32 everywhere. On CUDA, TF32 is switched off for convolutions, RNNs and matmuls
          (cuDNN uses TF32 for fp32 convolutions by default on Ampere and later), so every
          product is rounded to fp32, never to TF32's 10-bit mantissa. CPU and GPU agree to fp32
          rounding (relative error ~1e-6), not bit for bit: their kernels differ (cuDNN's
          autotuner may pick Winograd or FFT convolutions, and summation orders differ).
    tf32  CUDA only: fp32 tensors, convolutions and matmuls on TF32 tensor cores (10-bit
          mantissa inputs, fp32 accumulation). Asking for it elsewhere is a ConfigError.
    bf16  bf16 autocast: convolutions, matmuls and every norm compute in bf16; parameters,
          optimizer state and the loss stay fp32.
    auto  bf16 where the device has native bf16 convolutions (CUDA compute capability >= 8.0,
          CPUs with AVX512_BF16 or AMX-BF16), else fp32.

The backend flags are process-wide; `configure_backends` sets every one of them at the start of
each run, so one run's settings never leak into the next run of the same process. The cuBLAS
workspace (CUBLAS_WORKSPACE_CONFIG) is the exception: cuBLAS reads it once, so it is set when
this module is imported, before the process's first CUDA use (pin_cublas_workspace).

AUTO_DEVICE_ENV (BNLIB_AUTO_DEVICE=cpu) sets what device 'auto' resolves to in this process and
the processes it starts (kernels, Dask workers): the test suite pins it so that only tests marked
`cuda` use a GPU.
"""
from __future__ import annotations

import os
import platform
import re
import socket
import subprocess

import torch

from .errors import ConfigError

__all__ = ["PRECISIONS", "precisions_for", "resolve_device", "resolve_precision", "cpu_has_native_bf16",
           "cuda_has_native_bf16", "configure_backends", "backend_flags", "device_provenance",
           "CUBLAS_WORKSPACE_CONFIG", "AUTO_DEVICE_ENV", "pin_cublas_workspace"]

PRECISIONS = ("auto", "bf16", "tf32", "fp32")
# device type -> the precisions that mean something there (tf32 is a CUDA tensor-core format)
_DEVICE_PRECISIONS = {"cuda": PRECISIONS}
# cuBLAS is deterministic only with a fixed workspace (CUDA docs, "Results reproducibility"); it
# must be in the environment before the first cuBLAS call of the process. 8 x 4 MiB is what
# cuBLAS uses by default on Hopper, so pinning it for every run costs nothing measurable.
CUBLAS_WORKSPACE_CONFIG = ":4096:8"
AUTO_DEVICE_ENV = "BNLIB_AUTO_DEVICE"
_AUTO_DEVICE_CHOICES = ("cpu", "cuda", "mps")


def pin_cublas_workspace() -> str | None:
    """Put CUBLAS_WORKSPACE_CONFIG in this process's environment (and so in every kernel and
    worker it starts) while CUDA is not yet initialized, when it takes effect; a value already
    set is kept. Returns the value in force, None when none is (or CUDA started without it:
    setting it then would only make the environment and the provenance lie)."""
    if (v := os.environ.get("CUBLAS_WORKSPACE_CONFIG")) is not None:
        return v
    if torch.cuda.is_initialized():
        return None
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE_CONFIG
    return CUBLAS_WORKSPACE_CONFIG


pin_cublas_workspace()  # at import: a run's process imports bnlib before its first CUDA use


def precisions_for(device_type: str) -> tuple[str, ...]:
    """The precision choices valid on a device type."""
    return _DEVICE_PRECISIONS.get(device_type, tuple(p for p in PRECISIONS if p != "tf32"))


def cpu_has_native_bf16() -> bool:
    """True when the CPU has native bf16 arithmetic (AVX512_BF16 or AMX-BF16). bf16 autocast
    roughly doubles conv throughput there, but runs 10-500x slower on CPUs that emulate it."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((ln for ln in fh if ln.startswith("flags")), "")
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def cuda_has_native_bf16(device: torch.device) -> bool:
    """True on compute capability >= 8.0 (Ampere and later), the first with bf16 tensor cores.
    Not torch.cuda.is_bf16_supported(): that is also true where bf16 is emulated (V100, T4:
    cuDNN has no bf16 convolutions there), and it asks about the current device, not `device`."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def check_device(device: str) -> str | None:
    """An error line when `device` is not a torch device this machine has, else None."""
    if device == "auto":
        try:
            _auto_device()
        except ConfigError as e:
            return str(e)
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


def _auto_device() -> str | None:
    """BNLIB_AUTO_DEVICE's device type, None when unset; a bad value is a ConfigError."""
    v = os.environ.get(AUTO_DEVICE_ENV)
    if v is None or v == "":
        return None
    if v not in _AUTO_DEVICE_CHOICES:
        raise ConfigError(f"{AUTO_DEVICE_ENV}={v!r}: what device='auto' resolves to; valid choices: "
                          f"{list(_AUTO_DEVICE_CHOICES)}, or unset")
    return v


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        if (pinned := _auto_device()) is not None:  # the test suite's CPU pin (module docstring)
            return torch.device(pinned)
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` -> the precision it means on `device`; other choices are returned as they are
    (config.validate has checked that they are valid there)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if cuda_has_native_bf16(device) else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return "fp32"


# ----------------------------------------------------------------------------------------------
# backend flags
# ----------------------------------------------------------------------------------------------

def _new_tf32_api() -> bool:
    # torch >= 2.9: per-backend `fp32_precision` ("ieee" | "tf32"); mixing it with the legacy
    # allow_tf32 flags raises a warning (an error in some reads), so use one API only.
    return getattr(torch.backends.cudnn, "conv", None) is not None


def _set_tf32(on: bool) -> None:
    """Every TF32 switch to one value, so every getter agrees. The legacy booleans first, then
    the new per-operator fp32_precision of cuDNN conv and RNN and of cuBLAS matmul: with conv set
    and RNN left at its default, or matmul's fp32_precision set beside the legacy boolean, torch
    raises on reading torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 or
    torch.get_float32_matmul_precision() ("mix of the legacy and new APIs")."""
    torch.backends.cudnn.allow_tf32 = on
    torch.backends.cuda.matmul.allow_tf32 = on
    if _new_tf32_api():
        mode = "tf32" if on else "ieee"
        torch.backends.cudnn.conv.fp32_precision = mode
        torch.backends.cudnn.rnn.fp32_precision = mode
        torch.backends.cuda.matmul.fp32_precision = mode


def _tf32_flags() -> dict:
    """Whether fp32 convolutions (cuDNN) and matmuls (cuBLAS) may use TF32 now."""
    if not _new_tf32_api():
        return {"tf32_conv": bool(torch.backends.cudnn.allow_tf32),
                "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32)}

    def effective(*chain: str) -> bool:  # "none" inherits from the next, more general setting
        return next((v for v in chain if v != "none"), "ieee") == "tf32"

    generic, cuda_all = torch.backends.fp32_precision, torch.backends.cudnn.fp32_precision
    return {"tf32_conv": effective(torch.backends.cudnn.conv.fp32_precision, cuda_all, generic),
            "tf32_matmul": effective(torch.backends.cuda.matmul.fp32_precision, cuda_all, generic)}


def backend_flags() -> dict:
    """The process's current TF32, cuDNN and determinism settings."""
    return {**_tf32_flags(),
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
            "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}


def configure_backends(cfg: dict) -> dict:
    """Set every backend flag a run depends on from its resolved config; return them.

    - TF32 only for precision='tf32' (so 'fp32' is IEEE fp32 on every device).
    - cuDNN autotuning (benchmark) on CUDA: batch shapes are fixed (drop_last), so the search
      runs once per shape and the fastest kernels are used from then on. Off when deterministic:
      the kernel it picks may differ from run to run.
    - deterministic: cuDNN deterministic kernels and torch.use_deterministic_algorithms; the
      fixed cuBLAS workspace is pinned at import (pin_cublas_workspace), since cuBLAS reads it
      once per process, before this run may start. warn_only: an op without a deterministic implementation warns
      (naming itself) instead of failing the run; e.g. adaptive_avg_pool2d's CUDA backward is
      flagged although with the 1x1 output of the ResNet head each input gets one gradient term.
    """
    dev = torch.device(cfg["device"])
    det = bool(cfg.get("deterministic", False))
    _set_tf32(cfg["precision"] == "tf32")
    torch.backends.cudnn.benchmark = dev.type == "cuda" and not det
    torch.backends.cudnn.deterministic = det
    if det and dev.type == "cuda":
        pin_cublas_workspace()  # in effect only if CUDA has not started; torch warns on cuBLAS ops otherwise
    torch.use_deterministic_algorithms(det, warn_only=True)
    return backend_flags()


# ----------------------------------------------------------------------------------------------
# provenance
# ----------------------------------------------------------------------------------------------

def _nvidia_driver() -> str | None:
    """The NVIDIA driver version (e.g. '550.54.15'; one per machine), from nvidia-smi; None
    without it. torch reports the CUDA version it was built with, not the driver's."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.split() if out.returncode == 0 else []
    return lines[0] if lines else None


def device_provenance(device: torch.device | str) -> dict:
    """CUDA/cuDNN versions, the GPU (name, compute capability, memory, UUID), the driver, and
    the backend flags in force. The same keys on every device (None where they do not apply),
    so runs on different machines compare column by column."""
    dev = torch.device(device)
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    out = {"cuda_version": torch.version.cuda, "cudnn_version": cudnn, "gpu_name": None,
           "gpu_capability": None, "gpu_memory_gib": None, "gpu_uuid": None, "gpu_count": None,
           "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "driver_version": None}
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        p = torch.cuda.get_device_properties(index)
        out.update(gpu_name=p.name, gpu_capability=f"{p.major}.{p.minor}",
                   gpu_memory_gib=round(p.total_memory / 2**30, 2), gpu_uuid=str(getattr(p, "uuid", "")) or None,
                   gpu_count=torch.cuda.device_count(), driver_version=_nvidia_driver())
    return {**out, **backend_flags()}


def _cpu_info() -> dict:
    """The CPU's model name and the instruction-set flags bf16 speed depends on."""
    name, flags = platform.processor() or "cpu", ""
    try:
        with open("/proc/cpuinfo") as fh:
            text = fh.read()
        m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        name = m.group(1).strip() if m else name
        m = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
        flags = m.group(1) if m else ""
    except OSError:
        pass
    fl = set(flags.split())
    return {"model_name": name, **{f: f in fl for f in ("avx512_bf16", "amx_bf16", "amx_tile", "avx512f")}}


def machine(device: torch.device | str) -> dict:
    """The one description of the machine a run or a benchmark ran on: host, device and its
    name (the GPU's, else the CPU model), CPU flags, threads, library versions, and
    device_provenance's CUDA/GPU/backend keys. Run records (bnlib.records.provenance), the
    bench tables and the cost planner read it."""
    import numpy
    import torchvision

    dev = torch.device(device)
    cpu = _cpu_info()
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
    return {"hostname": socket.gethostname(), "device": str(dev), "device_type": dev.type,
            "device_name": gpu or (cpu["model_name"] if dev.type == "cpu" else dev.type), "cpu": cpu,
            "threads": torch.get_num_threads(), "os_cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": numpy.__version__, **device_provenance(dev)}
