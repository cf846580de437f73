"""What machine a benchmark ran on: CPU model, cores, memory (printed with every result table).

One place for every benchmark: ``ort_machine()`` is the record the latency benchmark stores
(ONNX Runtime version and load average included), ``torch_machine()`` the line each accuracy
run stores, ``gpu_note()`` what the latency report says about a GPU.
"""

from __future__ import annotations

import os
import platform


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def machine_info() -> dict:
    """CPU, cores, memory (GiB, 1 decimal), OS and Python of this machine."""
    return {
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "memory_gib": round(memory_gib(), 1),
        "system": f"{platform.system()} {platform.machine()}",
        "python": platform.python_version(),
    }


def ort_machine() -> dict:
    """``machine_info()`` + the onnxruntime version + the load average now (1/5/15 min)."""
    import onnxruntime

    return {**machine_info(), "onnxruntime": onnxruntime.__version__, "loadavg": os.getloadavg()}


def torch_machine() -> str:
    """One line: the machine, and torch with its CPU thread count (the accuracy runs)."""
    import torch

    m = machine_info()
    return (
        f"{m['cpu']}, {m['cpu_count']} cores, {memory_gib():.0f} GiB RAM, {m['system']}, Python {m['python']}, "
        f"torch {torch.__version__} (CPU, {torch.get_num_threads()} threads)"
    )


def gpu_note() -> str:
    """What the CPU-only latency benchmark says about a GPU."""
    try:
        import torch

        if torch.cuda.is_available():
            return f"a CUDA device is visible ({torch.cuda.get_device_name(0)}) but this script measures CPU only"
    except ImportError:
        pass
    return "no GPU was available on this machine: the CUDA/bf16 comparison was not run, and no GPU numbers are given"
