"""Rewrites that let ONNX Runtime's own fusions fire on a decoder graph (onnx-graphsurgeon).

ONNX Runtime fuses RMSNorm into one ``SimplifiedLayerNormalization`` kernel when it sees the
textbook pattern ``x / Sqrt(ReduceMean(Pow(x, 2)) + eps) * w``; torch's exporter writes
``rsqrt`` as ``Reciprocal(Sqrt(...))`` times ``x``, which the fusion does not match, so each norm
stays 7 kernels (61 norms in SmolLM2: 427 kernel launches per decode step for a few KB of math).
``rmsnorm_as_div`` turns ``Mul(x, Reciprocal(Sqrt(v)))`` into ``Div(x, Sqrt(v))``: the same
function in standard ops (the file stays plain ONNX for every runtime), and ONNX Runtime then
fuses it at session load. Tensor names are kept, so the residual stream the probes read is
untouched.
"""

from __future__ import annotations


def rmsnorm_as_div(graph, nodes: list) -> int:
    """In place, for the ``nodes`` of ``graph`` (gs): Mul(x, Reciprocal(Sqrt(v))) -> Div(x, Sqrt(v))
    where the Sqrt's input comes from a ReduceMean of Pow(x, 2) (plus eps). -> number rewritten.
    Run ``graph.cleanup()`` after (the Reciprocal is left without readers)."""
    done = 0
    for r in [n for n in nodes if n.op == "Reciprocal"]:
        sqrt = r.inputs[0].inputs[0] if r.inputs[0].inputs else None
        if sqrt is None or sqrt.op != "Sqrt" or _rms_input(sqrt) is None:
            continue
        x = _rms_input(sqrt)
        for mul in list(r.outputs[0].outputs):
            if mul.op != "Mul" or x not in mul.inputs:
                continue
            mul.op = "Div"
            mul.inputs.clear()
            mul.inputs.extend([x, sqrt.outputs[0]])
            done += 1
    return done


def _rms_input(sqrt):
    """The x of Sqrt(Add(ReduceMean(Pow(x, 2)), eps)) (the Add optional), else None."""
    t = sqrt.inputs[0]
    node = t.inputs[0] if t.inputs else None
    if node is not None and node.op == "Add":
        node = next((i.inputs[0] for i in node.inputs if i.inputs and i.inputs[0].op == "ReduceMean"), None)
    if node is None or node.op != "ReduceMean":
        return None
    pw = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
    if pw is None or pw.op != "Pow":
        return None
    return pw.inputs[0]
