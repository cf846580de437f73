"""The thin runtime: tokens and labels from every pass, on numpy + onnxruntime + tokenizers.

Neither torch nor transformers is imported anywhere under ``singlepass.runtime``. The names
below are loaded on first use, so ``singlepass.runtime.contract`` (read by ``export/``) stays
a cheap import. ``runtime/api.py`` holds ``Runtime``, ``load`` and the one-call form
``generate(artifact, prompts, ...)``; ``runtime/passes.py`` the one decode path
(``prefill`` + ``decode_one_token``) that validation, the server and the benchmarks share::

    from singlepass.runtime import load
    rt = load("artifacts/smollm2", policy={"safety": "block"})
    result = rt.generate("What is the capital of France?", max_new_tokens=20)

    from singlepass.runtime import generate
    results = generate("artifacts/smollm2", ["hi", "bye"], 20)
"""

_LAZY = {
    "Runtime": "api",
    "load": "api",
    "generate": "api",
    "Result": "api",
    "Event": "api",
    "Label": "passes",
    "prefill": "passes",
    "decode_one_token": "passes",
    "Manifest": "contract",
    "FusedProbe": "contract",
    "read_artifact": "contract",
    "Rule": "policy",
    "DEFAULT_REFUSAL": "policy",
    "Sampling": "sampling",
}
__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f"singlepass.runtime.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'singlepass.runtime' has no attribute {name!r}")
