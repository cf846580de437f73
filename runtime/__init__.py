"""The thin runtime: tokens and labels from every pass, on numpy + onnxruntime + tokenizers.

Neither torch nor transformers is imported anywhere under ``singlepass.runtime``. The names
below are loaded on first use, so ``singlepass.runtime.contract`` (read by ``export/``) stays
a cheap import. ``singlepass.runtime.generate`` is the module; its ``generate(artifact, prompts,
...)`` function is the one-call form::

    from singlepass.runtime import load
    rt = load("artifacts/smollm2", policy={"safety": "block"})
    result = rt.generate("What is the capital of France?", max_new_tokens=20)

    from singlepass.runtime.generate import generate
    results = generate("artifacts/smollm2", ["hi", "bye"], 20)
"""

_LAZY = {
    "Runtime": "generate", "load": "generate", "Result": "generate", "Event": "generate",
    "Label": "generate", "Rule": "policy", "DEFAULT_REFUSAL": "policy", "Sampling": "sampling",
}
__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f"singlepass.runtime.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'singlepass.runtime' has no attribute {name!r}")
