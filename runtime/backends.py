"""Backends behind one interface: ``run(feed) -> {output name: numpy array}``.

* ``cpu``       ONNX Runtime, CPUExecutionProvider (always there);
* ``cuda``      ONNX Runtime, CUDAExecutionProvider (needs onnxruntime-gpu and a GPU);
* ``tensorrt``  a serialized engine built by ``singlepass build-engine`` (needs the ``tensorrt``
                and ``cuda-python`` packages and a GPU; both imported lazily, here only).
* ``auto``      tensorrt if an engine was built and TensorRT imports, else cuda if ONNX Runtime
                has the provider, else cpu.

A backend also says what its shapes allow: ``max_batch``, ``max_prompt`` and ``max_seq`` (None =
no limit of its own) and ``dummy_past``, the masked past slots a prefill must carry (the
TensorRT profiles want a past length >= 1; the engine contract in ``export/tensorrt.py``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from singlepass.errors import SinglepassError

BACKENDS = ("auto", "cpu", "cuda", "tensorrt")
NP_DTYPES = {"int64": np.int64, "int32": np.int32, "float32": np.float32, "float16": np.float16,
             "bool": np.bool_}


class Backend:
    """One loaded graph. Subclasses set ``name`` and implement ``run``."""

    name = "backend"
    dummy_past = 0
    max_batch: int | None = None
    max_prompt: int | None = None
    max_seq: int | None = None  # longest attention mask (dummy slots + prompt + generated) a pass may take

    def run(self, feed: dict, outputs: list[str] | None = None) -> dict:
        raise NotImplementedError

    def check_request(self, batch: int, prompt_len: int) -> None:
        """Raise SinglepassError when a prefill of ``batch`` rows of ``prompt_len`` tokens cannot run."""
        if self.max_batch is not None and batch > self.max_batch:
            raise SinglepassError(f"a batch of {batch} prompts is larger than the {self.name} backend allows "
                                  f"(max batch {self.max_batch}): pass batch_size <= {self.max_batch} "
                                  f"(--batch-size) or fewer prompts")
        if self.max_prompt is not None and prompt_len > self.max_prompt:
            raise SinglepassError(f"a prompt of {prompt_len} tokens is longer than the {self.name} backend's prefill "
                                  f"allows ({self.max_prompt})")


# ----------------------------------------------------------------------------- ONNX Runtime

def ort_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def ort_session(path, threads: int | None = None, device: str = "cpu", spinning: bool = True):
    """The one ONNX Runtime session loader (runtime backends, validation, guards, benchmarks).

    ``path``: a graph file (or its serialized bytes). ``threads``: intra-op threads (inter-op 1).
    ``spinning=False`` stops idle intra-op threads from busy-waiting: slower alone, but fair when
    several sessions share one process or the cores are shared (the latency benchmark)."""
    import onnxruntime as ort

    if device not in ("cpu", "cuda"):
        raise SinglepassError(f"ONNX Runtime device must be cpu or cuda, not {device!r}")
    providers = ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in ort_providers():
            raise SinglepassError("ONNX Runtime's CUDA provider is not available here (it needs the "
                                  "onnxruntime-gpu package and an NVIDIA GPU): use --backend cpu")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    where = "the graph" if isinstance(path, (bytes, bytearray)) else str(path)
    try:
        session = ort.InferenceSession(path if isinstance(path, (bytes, bytearray)) else str(path), so,
                                       providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
        raise SinglepassError(f"{where}: ONNX Runtime cannot load the graph "
                              f"({str(e).splitlines()[0][:300]})") from None
    if device == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
        raise SinglepassError("ONNX Runtime fell back to the CPU (the CUDA libraries did not load): use "
                              "--backend cpu or fix the CUDA installation")
    return session


class OrtBackend(Backend):
    def __init__(self, path: Path, manifest: dict, device: str = "cpu", threads: int | None = None,
                 spinning: bool = True):
        self.session = ort_session(path, threads, device, spinning)
        self.name = f"onnxruntime-{device}"
        self.dtypes = {i["name"]: NP_DTYPES.get(i["dtype"], None) for i in manifest["graph"]["inputs"]}

    def run(self, feed: dict, outputs: list[str] | None = None) -> dict:
        feed = {k: (v.astype(self.dtypes[k]) if self.dtypes.get(k) and v.dtype != self.dtypes[k] else v)
                for k, v in feed.items()}
        names = outputs or [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, feed)))


# ----------------------------------------------------------------------------- TensorRT

def import_tensorrt():
    try:
        import tensorrt as trt  # noqa: PLC0415 - lazy on purpose
    except ImportError:
        raise SinglepassError(
            "TensorRT is not installed (the `tensorrt` Python package; it needs an NVIDIA GPU, a driver and "
            "NVIDIA's package index): use --backend cpu or cuda") from None
    return trt


def import_cudart():
    """cuda-python's runtime bindings (device buffers and a stream for TensorRT, without torch)."""
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            raise SinglepassError("the TensorRT backend needs the cuda-python package for device memory "
                                  "(pip install cuda-python)") from None
    return cudart


def engine_entry(manifest: dict, folder: Path, engine: str | None = None) -> dict:
    """The manifest's ``engines[]`` entry to serve: the one named, else the last one built."""
    engines = manifest.get("engines") or []
    if not engines:
        raise SinglepassError(f"{folder}: no TensorRT engine was built for this artifact (run `singlepass "
                              "build-engine ART`), or use --backend cpu")
    if engine is None:
        entry = engines[-1]
    else:
        found = [e for e in engines if e.get("file") == Path(engine).name]
        if not found:
            raise SinglepassError(f"{folder}: no engine {engine!r} in manifest.json (built: "
                                  f"{', '.join(e.get('file', '?') for e in engines)})")
        entry = found[0]
    if not (folder / entry["file"]).is_file():
        raise SinglepassError(f"{folder}: the engine file {entry['file']} named in manifest.json is missing")
    return entry


def engine_limits(manifest: dict, entry: dict) -> dict:
    """What an engine's optimization profiles allow -> {max_batch, max_prompt, max_seq, dummy_past}."""
    g = manifest["graph"]
    profiles = {p["name"]: p["shapes"] for p in entry["profiles"]}
    first = profiles.get("prefill") or profiles.get("full-sequence") or next(iter(profiles.values()))
    ids_max = first[g["input_ids"]][2]  # (min, opt, max) -> max [B, T]
    if g["kv_cache"]:
        mask_max = profiles.get("decode", first)[g["attention_mask"]][2][1]
        dummy = 1 if entry.get("dummy_past_slot", True) else 0
    else:
        mask_max, dummy = first[g["attention_mask"]][2][1], 0
    return {"max_batch": int(ids_max[0]), "max_prompt": int(ids_max[1]), "max_seq": int(mask_max),
            "dummy_past": dummy}


class TensorRTBackend(Backend):
    """A TensorRT 10 engine: profile 0 = prefill (past length = the dummy slot), 1 = decode.

    Runs with the name-based API (``set_input_shape`` / ``set_tensor_address`` /
    ``execute_async_v3``) on one CUDA stream, device buffers from cuda-python. Each pass copies
    its inputs to the device and its outputs (the presents included) back: simple and correct,
    not the fastest (a device-resident KV cache would avoid the round trip)."""

    def __init__(self, folder: Path, manifest: dict, engine: str | None = None):
        entry = engine_entry(manifest, folder, engine)
        lim = engine_limits(manifest, entry)
        self.max_batch, self.max_prompt, self.max_seq, self.dummy_past = (
            lim["max_batch"], lim["max_prompt"], lim["max_seq"], lim["dummy_past"])
        self.name = f"tensorrt ({entry['file']})"
        self.manifest, self.entry = manifest, entry
        trt = import_tensorrt()
        cudart = import_cudart()
        self.trt, self.cudart = trt, cudart
        logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(logger)
        self.engine = self.runtime.deserialize_cuda_engine((folder / entry["file"]).read_bytes())
        if self.engine is None:
            raise SinglepassError(f"{folder}/{entry['file']}: TensorRT cannot deserialize the engine (built with "
                                  f"TensorRT {entry.get('tensorrt')}, this is {trt.__version__})")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self.stream = self._cuda(cudart.cudaStreamCreate())
        self.buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)
        self.profile = None
        self.kv = manifest["graph"]["kv_cache"]
        self.past0 = manifest["graph"]["past_names"][0] if self.kv else None

    def _cuda(self, result):
        err, *rest = result if isinstance(result, tuple) else (result,)
        if err != self.cudart.cudaError_t.cudaSuccess:
            raise SinglepassError(f"CUDA error: {err}")
        return rest[0] if len(rest) == 1 else (rest or None)

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self.buffers.get(name, (0, 0))
        if nbytes > size:
            if ptr:
                self._cuda(self.cudart.cudaFree(ptr))
            ptr, size = int(self._cuda(self.cudart.cudaMalloc(max(nbytes, 1)))), max(nbytes, 1)
            self.buffers[name] = (ptr, size)
        return ptr

    def run(self, feed: dict, outputs: list[str] | None = None) -> dict:
        cudart, ctx = self.cudart, self.context
        # prefill = the past holds only the dummy slot(s); profile 0, else the decode profile 1
        profile = 0 if not self.kv or feed[self.past0].shape[2] == self.dummy_past else 1
        if profile != self.profile:
            ctx.set_optimization_profile_async(profile, int(self.stream))
            self.profile = profile
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        keep = []  # host arrays must outlive the async copies
        for name in self.inputs:
            host = np.ascontiguousarray(feed[name], dtype=self.dtypes[name])
            keep.append(host)
            if not ctx.set_input_shape(name, host.shape):
                raise SinglepassError(f"TensorRT refuses shape {host.shape} for {name} (outside profile {profile})")
            ptr = self._buffer(name, host.nbytes)
            self._cuda(cudart.cudaMemcpyAsync(ptr, host.ctypes.data, host.nbytes, h2d, self.stream))
            ctx.set_tensor_address(name, ptr)
        result = {}
        for name in self.outputs:
            host = np.empty(tuple(ctx.get_tensor_shape(name)), self.dtypes[name])
            result[name] = host
            ctx.set_tensor_address(name, self._buffer(name, host.nbytes))
        if not ctx.execute_async_v3(int(self.stream)):
            raise SinglepassError("TensorRT failed to run the engine (see the TensorRT log above)")
        for name, host in result.items():
            self._cuda(cudart.cudaMemcpyAsync(host.ctypes.data, self.buffers[name][0], host.nbytes, d2h,
                                              self.stream))
        self._cuda(cudart.cudaStreamSynchronize(self.stream))
        del keep
        want = outputs or list(result)
        return {k: (result[k].astype(np.float32) if result[k].dtype == np.float16 else result[k]) for k in want}

    def __del__(self):
        try:
            for ptr, _ in self.buffers.values():
                self.cudart.cudaFree(ptr)
            self.cudart.cudaStreamDestroy(self.stream)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


# ----------------------------------------------------------------------------- selection

def select(folder: Path, manifest: dict, backend: str = "auto", engine: str | None = None,
           threads: int | None = None) -> Backend:
    if backend not in BACKENDS:
        raise SinglepassError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    graph = folder / manifest["graph"]["file"]
    if backend == "tensorrt":
        return TensorRTBackend(folder, manifest, engine)
    if backend == "auto":
        if manifest.get("engines") or engine:
            try:
                return TensorRTBackend(folder, manifest, engine)
            except SinglepassError:
                if engine:  # asked for by name: say why not
                    raise
        backend = "cuda" if "CUDAExecutionProvider" in ort_providers() else "cpu"
    return OrtBackend(graph, manifest, backend, threads)
