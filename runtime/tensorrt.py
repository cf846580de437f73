"""The TensorRT engine contract, and the backend that serves an engine (numpy only, no torch).

``singlepass build-engine`` (export/tensorrt.py) builds engines to this contract and the
runtime serves them with it; both import it from here, so it is written once:

* two optimization profiles (``profiles``): 0 = prefill, input [B, T], past length exactly
  ``DUMMY_PAST`` = 1 (a masked dummy slot: TensorRT wants every dimension >= 1), attention_mask
  [B, 1 + T] with a 0 in column 0; 1 = decode, input [B, 1], past length 1 .. max_seq - 1. The
  dummy slot stays in the KV cache and its mask column stays 0 for the whole generation.
  Without a KV cache: one "full-sequence" profile.
* the manifest's ``engines[]`` entry records the profiles; ``engine_entry`` picks the engine to
  serve, ``engine_limits`` reads what its profiles allow.

``tensorrt`` and ``cuda-python`` are imported lazily, only by ``import_tensorrt`` /
``import_cudart`` (they need an NVIDIA GPU; neither is installable on this project's machines, so
``TensorRTBackend`` has run only against stand-ins of those APIs in the tests).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from singlepass.errors import SinglepassError
from singlepass.runtime.backends import Backend
from singlepass.runtime.contract import Manifest

DUMMY_PAST = 1  # masked past slots a prefill carries in an engine with a KV cache
SERVE_HINT = "use --backend cpu or cuda"


def import_tensorrt(hint: str = SERVE_HINT):
    """``import tensorrt``, or a SinglepassError that says what to do instead (``hint``)."""
    try:
        import tensorrt as trt  # noqa: PLC0415 - lazy on purpose
    except ImportError:
        raise SinglepassError(
            "TensorRT is not installed (the `tensorrt` Python package; it needs an NVIDIA GPU, a driver and "
            f"NVIDIA's package index): {hint}"
        ) from None
    return trt


def import_cudart():
    """cuda-python's runtime bindings (device buffers and a stream for TensorRT, without torch)."""
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            raise SinglepassError(
                "the TensorRT backend needs the cuda-python package for device memory (pip install cuda-python)"
            ) from None
    return cudart


def profiles(manifest: Manifest, max_batch: int, max_seq: int) -> list[dict]:
    """[{name, shapes: {input: (min, opt, max)}}] for prefill and (with a KV cache) decode."""
    m = manifest
    g = m.graph
    if max_batch < 1 or max_seq < 2:
        raise SinglepassError("--max-batch must be >= 1 and --max-seq >= 2")
    opt_b, prompt = max(1, max_batch // 2), min(max_seq - 1, m.limits.max_prompt_length)
    heads, head_dim = m.kv_shape
    if not g.kv_cache:
        shapes = {
            n: ((1, 1), (opt_b, max_seq // 2), (max_batch, max_seq))  # [B, T]
            for n in (g.input_ids, g.attention_mask, g.position_ids)
            if n
        }
        return [{"name": "full-sequence", "shapes": shapes}]
    d = DUMMY_PAST
    pre = {
        g.input_ids: ((1, 1), (opt_b, max(1, prompt // 2)), (max_batch, prompt)),  # [B, T]
        g.attention_mask: ((1, d + 1), (opt_b, d + max(1, prompt // 2)), (max_batch, d + prompt)),
    }  # [B, d + T]
    dec = {
        g.input_ids: ((1, 1), (opt_b, 1), (max_batch, 1)),  # [B, 1]
        g.attention_mask: ((1, d + 1), (opt_b, max_seq // 2 + 1), (max_batch, max_seq)),
    }  # [B, past + 1]
    if g.position_ids:
        pre[g.position_ids] = pre[g.input_ids]
        dec[g.position_ids] = dec[g.input_ids]
    for n in g.past_names:  # [B, kv_heads, past, head_dim]
        pre[n] = tuple((b, heads, d, head_dim) for b in (1, opt_b, max_batch))
        dec[n] = (
            (1, heads, d, head_dim),
            (opt_b, heads, max_seq // 2, head_dim),
            (max_batch, heads, max_seq - 1, head_dim),
        )
    return [{"name": "prefill", "shapes": pre}, {"name": "decode", "shapes": dec}]


def engine_entry(manifest: Manifest, folder: Path, engine: str | None = None) -> dict:
    """The manifest's ``engines[]`` entry to serve: the one named, else the last one built."""
    engines = manifest.engines
    if not engines:
        raise SinglepassError(
            f"{folder}: no TensorRT engine was built for this artifact (run `singlepass "
            "build-engine ART`), or use --backend cpu"
        )
    if engine is None:
        entry = engines[-1]
    else:
        found = [e for e in engines if e.get("file") == Path(engine).name]
        if not found:
            raise SinglepassError(
                f"{folder}: no engine {engine!r} in manifest.json (built: "
                f"{', '.join(e.get('file', '?') for e in engines)})"
            )
        entry = found[0]
    if not (Path(folder) / entry["file"]).is_file():
        raise SinglepassError(f"{folder}: the engine file {entry['file']} named in manifest.json is missing")
    return entry


def engine_limits(manifest: Manifest, entry: dict) -> dict:
    """What an engine's optimization profiles allow -> {max_batch, max_prompt, max_seq, dummy_past}."""
    g = manifest.graph
    profs = {p["name"]: p["shapes"] for p in entry["profiles"]}
    first = profs.get("prefill") or profs.get("full-sequence") or next(iter(profs.values()))
    ids_max = first[g.input_ids][2]  # (min, opt, max) -> max [B, T]
    if g.kv_cache:
        mask_max = profs.get("decode", first)[g.attention_mask][2][1]
        dummy = DUMMY_PAST if entry.get("dummy_past_slot", True) else 0
    else:
        mask_max, dummy = first[g.attention_mask][2][1], 0
    return {"max_batch": int(ids_max[0]), "max_prompt": int(ids_max[1]), "max_seq": int(mask_max), "dummy_past": dummy}


# ----------------------------------------------------------------------------- serving


class TensorRTBackend(Backend):
    """A TensorRT 10 engine: profile 0 = prefill (past length = the dummy slot), 1 = decode.

    Runs with the name-based API (``set_input_shape`` / ``set_tensor_address`` /
    ``execute_async_v3``) on one CUDA stream, device buffers from cuda-python. Each pass copies
    its inputs to the device and its outputs (the presents included) back: simple and correct,
    not the fastest (a device-resident KV cache would avoid the round trip)."""

    def __init__(self, folder: Path, manifest: Manifest, engine: str | None = None):
        entry = engine_entry(manifest, folder, engine)
        lim = engine_limits(manifest, entry)
        self.max_batch, self.max_prompt, self.max_seq, self.dummy_past = (
            lim["max_batch"],
            lim["max_prompt"],
            lim["max_seq"],
            lim["dummy_past"],
        )
        self.name = f"tensorrt ({entry['file']})"
        self.manifest, self.entry = manifest, entry
        trt = import_tensorrt()
        cudart = import_cudart()
        self.trt, self.cudart = trt, cudart
        self.stream, self.buffers = None, {}  # name -> (device pointer, bytes)
        logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(logger)
        self.engine = self.runtime.deserialize_cuda_engine((Path(folder) / entry["file"]).read_bytes())
        if self.engine is None:
            raise SinglepassError(
                f"{folder}/{entry['file']}: TensorRT cannot deserialize the engine (built with "
                f"TensorRT {entry.get('tensorrt')}, this is {trt.__version__})"
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self.stream = self._cuda(cudart.cudaStreamCreate())
        self.profile = None
        self.kv = manifest.graph.kv_cache
        self.past0 = manifest.graph.past_names[0] if self.kv else None

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

    def run(
        self,
        feed: dict,
        outputs: list[str] | None = None,
        inplace: dict[str, str] | None = None,
        carry: dict[str, str] | None = None,
    ) -> dict:
        if inplace:
            raise SinglepassError("the TensorRT backend cannot write the KV cache in place")
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
            self._cuda(cudart.cudaMemcpyAsync(host.ctypes.data, self.buffers[name][0], host.nbytes, d2h, self.stream))
        self._cuda(cudart.cudaStreamSynchronize(self.stream))
        del keep
        want = outputs or list(result)
        return {k: (result[k].astype(np.float32) if result[k].dtype == np.float16 else result[k]) for k in want}

    def __del__(self):
        try:
            for ptr, _ in self.buffers.values():
                self.cudart.cudaFree(ptr)
            if self.stream is not None:
                self.cudart.cudaStreamDestroy(self.stream)
        except Exception:  # noqa: BLE001 - interpreter shutdown, or a constructor that failed half way
            pass
