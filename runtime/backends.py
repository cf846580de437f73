"""Backends behind one interface: ``run(feed) -> {output name: numpy array}``.

* ``cpu``       ONNX Runtime, CPUExecutionProvider (always there);
* ``cuda``      ONNX Runtime, CUDAExecutionProvider (needs onnxruntime-gpu and a GPU);
* ``tensorrt``  a serialized engine built by ``singlepass build-engine`` (needs the ``tensorrt``
                and ``cuda-python`` packages and a GPU; both imported lazily, by
                runtime/tensorrt.py only).
* ``auto``      tensorrt if an engine was built and TensorRT imports, else cuda if ONNX Runtime
                has the provider, else cpu.

A backend also says what its shapes allow: ``max_batch``, ``max_prompt`` and ``max_seq`` (None =
no limit of its own) and ``dummy_past``, the masked past slots a prefill must carry (the
TensorRT profiles want a past length >= 1; the engine contract and ``TensorRTBackend`` live in
``runtime/tensorrt.py``).
"""

from __future__ import annotations

import operator
import threading
from pathlib import Path

import numpy as np

from singlepass.errors import SinglepassError
from singlepass.runtime.contract import Manifest

BACKENDS = ("auto", "cpu", "cuda", "tensorrt")
NP_DTYPES = {"int64": np.int64, "int32": np.int32, "float32": np.float32, "float16": np.float16, "bool": np.bool_}


class Backend:
    """One loaded graph. Subclasses set ``name`` and implement ``run``."""

    name = "backend"
    dummy_past = 0
    max_batch: int | None = None
    max_prompt: int | None = None
    max_seq: int | None = None  # longest attention mask (dummy slots + prompt + generated) a pass may take

    inplace = False  # can ``run`` write outputs into input buffers (``inplace=``)?

    def release(self) -> None:
        """Let go of what the backend keeps between passes for this thread (ONNX Runtime: the last
        in-place pass's binding, which holds its KV buffers, the response state's arrays and their
        scratch buffers): call it when the decode state goes."""

    def run(
        self,
        feed: dict,
        outputs: list[str] | None = None,
        inplace: dict[str, str] | None = None,
        carry: dict[str, str] | None = None,
    ) -> dict:
        """-> {output name: array}. ``inplace`` {output: input}: the output is written into that
        input's buffer (the in-place KV cache, ``export/kvcache.py``) and returned as that array.
        ``carry`` {output: input}: the output is that input's next value (a response probe's state),
        which the graph cannot write where it reads it: a backend may copy it into that input's array
        after the pass and return that array (as ``inplace`` does, in two steps)."""
        raise NotImplementedError

    def check_request(self, batch: int, prompt_len: int) -> None:
        """Raise SinglepassError when a prefill of ``batch`` rows of ``prompt_len`` tokens cannot run."""
        if self.max_batch is not None and batch > self.max_batch:
            raise SinglepassError(
                f"a batch of {batch} prompts is larger than the {self.name} backend allows "
                f"(max batch {self.max_batch}): pass batch_size <= {self.max_batch} "
                f"(--batch-size) or fewer prompts"
            )
        if self.max_prompt is not None and prompt_len > self.max_prompt:
            raise SinglepassError(
                f"a prompt of {prompt_len} tokens is longer than the {self.name} backend's prefill "
                f"allows ({self.max_prompt})"
            )


# ----------------------------------------------------------------------------- ONNX Runtime


def ort_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def ort_session(
    path,
    threads: int | None = None,
    device: str = "cpu",
    spinning: bool = True,
    arena: bool = True,
    profile: str | None = None,
):
    """The one ONNX Runtime session loader (runtime backends, validation, guards, benchmarks).

    ``path``: a graph file (or its serialized bytes). ``threads``: intra-op threads (inter-op 1).
    ``spinning=False`` stops idle intra-op threads from busy-waiting: slower alone, but fair when
    several sessions share one process or the cores are shared (the latency benchmark).
    ``arena=False``: no CPU memory arena. The arena keeps (and fragments) the memory of the largest
    shapes it has seen, which suits one shape repeated; a server's passes come in every batch size and
    width, and with the arena its RSS grew 223 -> 1,295 MiB over 60 mixed passes where without it
    it stayed at ~0.5 GiB, at the same step time (measured here on the int4 serving artifact).
    ``profile``: ONNX Runtime's profiler on, its JSON file named from this prefix
    (``session.end_profiling()`` writes it; ``benchmarks/roofline.py``)."""
    import onnxruntime as ort

    if device not in ("cpu", "cuda"):
        raise SinglepassError(f"ONNX Runtime device must be cpu or cuda, not {device!r}")
    providers = ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in ort_providers():
            raise SinglepassError(
                "ONNX Runtime's CUDA provider is not available here (it needs the "
                "onnxruntime-gpu package and an NVIDIA GPU): use --backend cpu"
            )
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not arena:
        so.enable_cpu_mem_arena = False
    if profile:
        so.enable_profiling, so.profile_file_prefix = True, str(profile)
    # Nodes ordered by priority rather than ONNX Runtime's default topological order: a fused prompt
    # probe's per-layer If (surgery.layer_stages) then runs right after its layer, so the layer's
    # [B, T, d] states are freed as the decoder moves on; in the default order every such If ran
    # after the last layer, which kept all L+1 states alive (benchmarks/results/prefill_memory.md:
    # the MHA artifact's peak at 4 x 400 tokens 706 -> 536 MiB, the base's 505-506 MiB).
    so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    where = "the graph" if isinstance(path, (bytes, bytearray)) else str(path)
    try:
        session = ort.InferenceSession(
            path if isinstance(path, (bytes, bytearray)) else str(path), so, providers=providers
        )
    except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
        raise SinglepassError(f"{where}: ONNX Runtime cannot load the graph ({str(e).splitlines()[0][:300]})") from None
    if device == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
        raise SinglepassError(
            "ONNX Runtime fell back to the CPU (the CUDA libraries did not load): use "
            "--backend cpu or fix the CUDA installation"
        )
    return session


class OrtBackend(Backend):
    def __init__(
        self,
        path: Path,
        manifest: Manifest,
        device: str = "cpu",
        threads: int | None = None,
        spinning: bool = True,
        arena: bool = True,
    ):
        self.session = ort_session(path, threads, device, spinning, arena)
        self.name = f"onnxruntime-{device}"
        self.inplace = device == "cpu"  # the buffers are host memory
        cache = set(manifest.graph.past_names)
        self.convert = {  # input -> the dtype the graph takes (the KV cache aside: see run)
            i["name"]: NP_DTYPES[i["dtype"]]
            for i in manifest.graph.inputs
            if i["dtype"] in NP_DTYPES and i["name"] not in cache
        }
        self._local = threading.local()  # .binding: this thread's _Binding (runs may come from several threads)

    def run(
        self,
        feed: dict,
        outputs: list[str] | None = None,
        inplace: dict[str, str] | None = None,
        carry: dict[str, str] | None = None,
    ) -> dict:
        # an input fed in another dtype than the graph's is converted (the KV cache is not checked: its
        # arrays are the graph's own presents or empty_past's float32, the one KV dtype an export writes)
        wrong = [k for k, want in self.convert.items() if k in feed and feed[k].dtype != want]
        if wrong:
            feed = feed | {k: feed[k].astype(self.convert[k]) for k in wrong}
        names = outputs or [o.name for o in self.session.get_outputs()]
        if not inplace:
            return dict(zip(names, self.session.run(names, feed)))
        if not self.inplace:
            raise SinglepassError(f"the {self.name} backend cannot write the KV cache in place")
        binding = getattr(self._local, "binding", None)
        carry = carry or {}
        if any(o not in names for o in carry):
            carry = {o: i for o, i in carry.items() if o in names}  # only outputs this pass fetches
        if binding is None or not binding.serves(feed, names, inplace, carry):
            binding = self._local.binding = _Binding(self.session, feed, names, inplace, carry)
        return binding.run(feed)

    def release(self) -> None:
        self._local.binding = None


class _Binding:
    """One IOBinding reused by consecutive in-place passes with the same inputs and outputs (decode
    steps): the outputs are bound to their past inputs' own buffers, so the cache is not copied.
    The 2 x L cache buffers are bound once and kept while the passes bring the same arrays (one
    identity check of the list; a widened cache is new buffers, bound again); a pass binds only its
    small per-step inputs and the outputs ONNX Runtime would allocate. Binding every buffer every
    pass cost ~0.3 ms of Python at batch 1 (0.75 ms of a 5.2 ms step in all, SmolLM2 int4), and
    checking each one every pass ~0.1 ms more: this Python runs right after the pass has streamed
    the weights through the CPU caches, so every object it touches is a cache miss. A buffer is
    recognised by identity: the binding references every array bound to it, so an array seen again
    is the one bound (same memory, same shape).

    The ``carry`` outputs (a response probe's state: a pass reads all of it before it writes, so it
    cannot be written where it is read) go to a scratch buffer bound once, then are copied into their
    input's array, which is returned: the state stays in the same arrays from pass to pass, bound
    once, like the cache (a few KiB copied, where ONNX Runtime allocated each present, it was copied
    out and bound again as the next past). An input bound as a copy (not C-contiguous) or that is
    read-only gets a copy of the new state instead; one converted to the graph's dtype on the way
    is the array bound, written and returned."""

    def __init__(self, session, feed: dict, names: list[str], inplace: dict[str, str], carry: dict[str, str]):
        self.session, self.io = session, session.io_binding()
        self.names, self.inplace, self.carry, self.inputs = list(names), dict(inplace), dict(carry), frozenset(feed)
        self.bound: dict[tuple[bool, str], np.ndarray] = {}  # (output?, name) -> the array bound to it
        self.scratch: dict[str, np.ndarray] = {}  # carried output -> the buffer the pass writes it into
        self.lead = next(iter(feed))  # the first input (the ids [B, S]): a pass's output shapes follow its shape
        self.shapes: dict[tuple, tuple] = {}  # (lead's shape, output) -> (shape, dtype) the last such pass returned
        self.cache_out = [n for n in self.names if n in self.inplace]  # the presents, each written into its past
        self.cache_in = [self.inplace[n] for n in self.cache_out]
        cached = set(self.cache_in)
        self.small = [k for k in feed if k not in cached]  # ids, mask, positions, probe state
        self.fresh = [n for n in self.names if n not in self.inplace]  # logits, probe outputs, carried state
        self.cache: list[np.ndarray] | None = None  # the cache arrays bound as themselves (None: bind again)

    def serves(self, feed: dict, names: list[str], inplace: dict[str, str], carry: dict[str, str]) -> bool:
        same = feed.keys() == self.inputs and self.carry == carry and self.inplace == inplace
        return same and self.names == names

    def _bind(self, name: str, arr: np.ndarray, output: bool) -> None:
        # ONNX Runtime binds a C-contiguous, aligned, writeable array's own memory (else a copy,
        # which a later pass must not reuse: such an array is bound again every pass)
        if self.bound.get((output, name)) is arr and arr.flags.aligned and arr.flags.writeable:
            return
        if output:
            self.io.bind_output(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
        else:
            self.io.bind_cpu_input(name, arr)
        self.bound[(output, name)] = arr

    def _bind_cache(self, cache: list[np.ndarray]) -> list[np.ndarray] | None:
        """Bind each cache array as its past input and as its present output -> ``cache``, or None
        when one of them is bound as a copy (then the next pass binds them again)."""
        for i, o, a in zip(self.cache_in, self.cache_out, cache):
            if not a.flags.c_contiguous:
                raise SinglepassError(f"internal error: {i} must be one contiguous buffer")
            self._bind(i, a, output=False)
            self._bind(o, a, output=True)
        return cache if all(a.flags.aligned and a.flags.writeable for a in cache) else None

    def run(self, feed: dict) -> dict:
        cache = [feed[i] for i in self.cache_in]
        if self.cache is None or not all(map(operator.is_, cache, self.cache)):
            self.cache = None  # until every array is bound (a bind that raises leaves some bound)
            self.cache = self._bind_cache(cache)
        for k in self.small:
            self._bind(k, np.ascontiguousarray(feed[k]), output=False)
        written, learn, key = dict(zip(self.cache_out, cache)), [], feed[self.lead].shape
        for n in self.fresh:
            if n in self.carry:
                src, buf = feed[self.carry[n]], self.scratch.get(n)
                if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
                    buf = self.scratch[n] = np.empty(src.shape, src.dtype)  # [the state's shape]
                self._bind(n, buf, output=True)
            elif (key, n) in self.shapes:  # a new array each pass: the arrays returned before stay valid
                # (bound where ONNX Runtime would allocate it and copy it out: no OrtValues to wrap)
                shape, dtype = self.shapes[(key, n)]
                written[n] = np.empty(shape, dtype)
                self.io.bind_output(n, "cpu", 0, dtype, list(shape), written[n].ctypes.data)
            else:
                self.io.bind_output(n, "cpu")  # ONNX Runtime allocates it; its shape is learnt
                learn.append(n)
        self.session.run_with_iobinding(self.io)
        for n, i in self.carry.items():
            src, buf = feed[i], self.scratch[n]
            if self.bound.get((False, i)) is src and src.flags.writeable:
                np.copyto(src, buf)  # the pass has read src: it takes the new state
                written[n] = src
            else:
                written[n] = buf.copy()
        if learn:
            got = dict(zip(self.cache_out + self.fresh, self.io.get_outputs()))  # OrtValues in the order first bound
            for n in learn:
                written[n] = got[n].numpy()
                self.shapes[(key, n)] = (written[n].shape, written[n].dtype)
        return written


# ----------------------------------------------------------------------------- selection


def select(
    folder: Path,
    manifest: Manifest,
    backend: str = "auto",
    engine: str | None = None,
    threads: int | None = None,
    arena: bool = True,
) -> Backend:
    if backend not in BACKENDS:
        raise SinglepassError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    graph = folder / manifest.graph.file
    if backend == "tensorrt" and manifest.graph.inplace:
        raise SinglepassError(
            f"{folder}: this artifact writes its KV cache in place (GroupQueryAttention), which TensorRT "
            "does not run: export with --kv-cache concat --weights fp32 --opset 18 for TensorRT"
        )
    if backend == "tensorrt":
        from singlepass.runtime.tensorrt import TensorRTBackend

        return TensorRTBackend(folder, manifest, engine)
    if backend == "auto":
        if manifest.engines or engine:
            from singlepass.runtime.tensorrt import TensorRTBackend

            try:
                return TensorRTBackend(folder, manifest, engine)
            except SinglepassError:
                if engine:  # asked for by name: say why not
                    raise
        backend = "cpu" if manifest.graph.inplace or "CUDAExecutionProvider" not in ort_providers() else "cuda"
    if manifest.graph.inplace and backend != "cpu":
        raise SinglepassError(
            f"{folder}: this artifact writes its KV cache in place (export --kv-cache inplace), which the "
            f"{backend} backend cannot: use --backend cpu, or export with --kv-cache concat"
        )
    return OrtBackend(graph, manifest, backend, threads, arena=arena)
