"""One runner per engine for ``singlepass bench peers``, with the same interface (Polygraphy's
loader/runner idea): each is fed the same token ids and decodes greedily, end-of-sequence ignored,
so every engine does the same work.

    r = make_runner({"kind": "singlepass", "path": ART}, threads=2)
    first = r.prefill(ids)      # runs the prompt, returns the first generated token
    nxt = r.decode(first)       # one decode step, returns the next token

* ``singlepass``: an artifact through the runtime's one decode path (``runtime/passes.py``);
* ``llama.cpp``: ``llama-cpp-python`` on the GGUF file (``Llama.eval`` + the last row's logits);
* ``onnxruntime-genai``: a folder with a ``genai_config.json`` (its model builder's output, or a
  singlepass artifact), through ``og.Generator``.

Every engine runs with ``threads`` threads as it serves by default: the ONNX Runtime sessions
(singlepass's runtime and onnxruntime-genai's) let idle threads spin briefly, as llama.cpp's
thread pool polls (at batch 1 singlepass decodes 89 tokens/s without spinning, 119 with, in one
A/B on this machine).
Optional engines are imported when a runner is made, never at import.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from singlepass.errors import SinglepassError


class SinglepassRunner:
    def __init__(self, path: str, threads: int):
        from singlepass.runtime.backends import OrtBackend
        from singlepass.runtime.contract import read_artifact

        self.m = read_artifact(path)
        self.backend = OrtBackend(self.m.folder / self.m.graph.file, self.m, "cpu", threads)  # as served
        self.state = None

    def prefill(self, ids: list[int]) -> int:
        from singlepass.runtime.passes import last_logits, prefill

        out, self.state = prefill(self.backend, self.m, [ids])
        return int(last_logits(self.m, out)[0].argmax())

    def decode(self, token: int) -> int:
        from singlepass.runtime.passes import decode_one_token, last_logits

        out, self.state = decode_one_token(self.backend, self.m, self.state, np.array([token], np.int64))
        return int(last_logits(self.m, out)[0].argmax())


class LlamaCppRunner:
    def __init__(self, path: str, threads: int, n_ctx: int = 2048):
        try:
            import llama_cpp
        except ImportError:
            raise SinglepassError("llama-cpp-python is not installed: run `make peers`") from None
        self.llm = llama_cpp.Llama(
            model_path=str(path),
            n_threads=threads,
            n_threads_batch=threads,
            n_ctx=n_ctx,
            n_batch=n_ctx,  # the whole prompt in one batch, as the ONNX graphs take it
            logits_all=False,  # logits of the last position only (as singlepass's prefill)
            verbose=False,
        )

    def logits(self) -> np.ndarray:
        """[V] logits of the last token evaluated (with ``logits_all=False`` llama-cpp-python 0.3
        no longer copies them into ``Llama.scores``: they are read from the context)."""
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),))

    def _next(self) -> int:
        return int(np.argmax(self.logits()))

    def prefill(self, ids: list[int]) -> int:
        self.llm.reset()
        self.llm.eval(list(ids))
        return self._next()

    def decode(self, token: int) -> int:
        self.llm.eval([token])
        return self._next()


class GenaiRunner:
    def __init__(self, path: str, threads: int):
        from singlepass.benchmarks.peer_genai import import_og

        og = import_og()
        if not (Path(path) / "genai_config.json").is_file():
            raise SinglepassError(f"{path}: no genai_config.json (not an onnxruntime-genai model folder)")
        self.og = og
        config = og.Config(str(path))
        options = {"intra_op_num_threads": int(threads)}  # og 0.18's config has no spinning switch
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        self.model = og.Model(config)
        self.context = json.loads((Path(path) / "genai_config.json").read_text())["model"]["context_length"]
        self.gen = None

    def prefill(self, ids: list[int]) -> int:
        params = self.og.GeneratorParams(self.model)
        # decode until told otherwise (within the model's context); min_length: never stop at end-of-sequence
        n = min(len(ids) + 4096, self.context)
        params.set_search_options(do_sample=False, max_length=n, min_length=n)
        self.gen = self.og.Generator(self.model, params)
        self.gen.append_tokens([list(ids)])  # runs the prompt
        self.gen.generate_next_token()
        return int(self.gen.get_next_tokens()[0])

    def decode(self, token: int) -> int:
        self.gen.generate_next_token()
        return int(self.gen.get_next_tokens()[0])


KINDS = {"singlepass": SinglepassRunner, "llama.cpp": LlamaCppRunner, "onnxruntime-genai": GenaiRunner}


def make_runner(spec: dict, threads: int):
    """``spec``: {"kind": one of KINDS, "path": artifact / GGUF file / og folder}."""
    if spec["kind"] not in KINDS:
        raise SinglepassError(f"unknown engine {spec['kind']!r} (known: {', '.join(KINDS)})")
    return KINDS[spec["kind"]](spec["path"], threads)
