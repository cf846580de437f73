"""ONNX Runtime operators in the default ONNX domain, made known to the ONNX checker.

ONNX Runtime registers a few operators of its own in the default (``ai.onnx``) domain, not in
``com.microsoft``: ``SimplifiedLayerNormalization`` (RMSNorm) is one, and the graphs of
onnxruntime-genai's model builder use it. ``onnx.checker`` skips the schemas of domains it does not
know (``com.microsoft``), but rejects an unknown op in the default domain ("No Op registered for
SimplifiedLayerNormalization with domain_version of 22"), although ONNX Runtime runs the graph.

``register_onnxruntime_ops(model)`` registers, with ``onnx.defs.register_schema``, ONNX Runtime's
own schema of each default-domain op the model uses that ONNX lacks and ONNX Runtime has, so the
checker then checks those nodes against ONNX Runtime's definition (inputs, outputs, attributes).
Ops neither knows still fail the check. Registration is process-wide and idempotent.
"""

from __future__ import annotations

import onnx
from onnx.defs import OpSchema

DEFAULT_DOMAINS = ("", "ai.onnx")


def _param(p) -> OpSchema.FormalParameter:
    option = getattr(OpSchema.FormalParameterOption, p.option.name)
    return OpSchema.FormalParameter(p.name, p.typeStr, param_option=option, is_homogeneous=p.isHomogeneous)


def _attribute(a) -> OpSchema.Attribute:
    return OpSchema.Attribute(a.name, getattr(OpSchema.AttrType, a.type.name), required=a.required)


def _onnx_schema(s) -> OpSchema:
    """ONNX Runtime's schema (pybind object) as an ``onnx.defs.OpSchema`` in the default domain."""
    return OpSchema(
        s.name,
        "",
        s.since_version,
        inputs=[_param(p) for p in s.inputs],
        outputs=[_param(p) for p in s.outputs],
        type_constraints=[(t.type_param_str, list(t.allowed_type_strs), "") for t in s.type_constraints],
        attributes=[_attribute(a) for a in s.attributes.values()],
    )


def unknown_default_domain_ops(model: onnx.ModelProto) -> set[str]:
    """Op types of the model's default-domain nodes (main graph) that ONNX has no schema for."""
    return {n.op_type for n in model.graph.node if n.domain in DEFAULT_DOMAINS and not onnx.defs.has(n.op_type, "")}


def register_onnxruntime_ops(model: onnx.ModelProto) -> list[str]:
    """Register ONNX Runtime's schemas of the model's default-domain ops unknown to ONNX.
    -> the op types registered now (every version ONNX Runtime defines)."""
    missing = unknown_default_domain_ops(model)
    if not missing:
        return []
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_c

    done = []
    for s in ort_c.get_all_operator_schema():
        if s.name in missing and s.domain in DEFAULT_DOMAINS:
            onnx.defs.register_schema(_onnx_schema(s))
            done.append(s.name)
    return sorted(set(done))
