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


def _cpuinfo(field: str) -> str | None:
    """The first ``field`` line of /proc/cpuinfo (None where there is none)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.split(":", 1)[0].strip() == field:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def vector_isa(flags: set[str]) -> str:
    """The widest SIMD the CPU flags name, and the int8 dot-product extensions: what sets int4/int8 matmul speed
    (ONNX Runtime's MatMulNBits and llama.cpp's quantised dot products use VNNI where it exists). A VM names
    its CPU "AMD EPYC" whatever its generation, so the model name alone does not say which kernels ran."""
    if "avx512f" in flags:
        out = "AVX-512" + (" + VNNI" if "avx512_vnni" in flags else "")
    elif "avx2" in flags:
        out = "AVX2" + (" + AVX-VNNI" if "avx_vnni" in flags else "") + ", no AVX-512"
    else:
        out = "no AVX2"
    return out + (" + AMX" if "amx_tile" in flags else "")


def cpu_name() -> str:
    """The CPU model and its vector ISA, e.g. "AMD EPYC (AVX2, no AVX-512)"."""
    name = _cpuinfo("model name") or platform.processor() or platform.machine()
    flags = _cpuinfo("flags")
    return f"{name} ({vector_isa(set(flags.split()))})" if flags is not None else name


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
