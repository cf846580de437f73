"""What machine a benchmark ran on: CPU model, cores, memory (printed with every result table).

One place for every benchmark: ``ort_machine()`` is the record the latency benchmark stores
(ONNX Runtime version and load average included), ``torch_machine()`` the line each accuracy
run stores, ``gpu_note()`` what the latency report says about a GPU.
"""

from __future__ import annotations

import os
import platform
import time

# Seconds to idle before each timed run of a benchmark that alternates engines in one process. After a run,
# ONNX Runtime's intra-op threads (and llama.cpp's) poll for new work for a while; the next engine's run
# then shares the 2 cores with them. Measured with `bench peers`' timing worker (24 prompts, 2 threads,
# int4 base / pooling / gate / MHA / llama.cpp in rotated order): with no pause the base prefilled at 1,157
# tokens/s and the probe artifacts (each right after another ONNX Runtime session) 28-48% slower; after
# 10 ms 1,439 and +34-49%; after 50 ms 1,653 and +4.4 / +2.7 / +6.9%; after 200 ms 1,485 and -1.8 /
# -0.0 / +5.7% (llama.cpp 327 -> 400 -> 502 -> 463 tokens/s). 0.1 s: between the two settled points.
SETTLE_S = 0.1


def settle(seconds: float = SETTLE_S) -> None:
    """Idle before a timed run, so that the last run's worker threads have gone to sleep (``SETTLE_S``)."""
    if seconds > 0:
        time.sleep(seconds)


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
