"""singlepass: classification inside the LLM forward pass you already pay for.

Importing the package is cheap: no torch, transformers, onnx or TensorRT is imported here.
The parts live in subpackages that mirror the repository folders:

- singlepass.models     load a frozen decoder LLM, extract hidden states, probes, training, eval
- singlepass.export     ONNX export + graph surgery + probe fusion + parity + TensorRT build
- singlepass.runtime    tokens and labels per pass on ONNX Runtime / TensorRT (no torch)
- singlepass.benchmarks accuracy and latency/memory benchmarks
"""

from singlepass.errors import SinglepassError

__version__ = "0.1.0"
__all__ = ["SinglepassError", "__version__"]
