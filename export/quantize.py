"""Weight precision of the exported decoder: block-quantised MatMul weights as ONNX Runtime's
``com.microsoft.MatMulNBits`` (one graph transformation on onnx-graphsurgeon, like surgery.py).

    --weights fp32   the weights as the backbone holds them (dequantised from the GGUF)
    --weights int8   every decoder MatMul 8-bit, symmetric, blocks of 32 along K
    --weights int4   the decoder layers 4-bit, asymmetric, blocks of 32; the lm_head 8-bit

Decode on a CPU is memory-bandwidth bound: each new token streams every weight once, so 4-bit
weights are what makes a CPU decode fast (llama.cpp's reason for the same files). The choice
mirrors the default GGUF this tool ships (layers Q4_1, tied embedding / lm_head Q8_0), and the
quantiser *carries those blocks over* where the block format allows it:

* Q8_0 (``w = d * q``, q in [-127, 127], blocks of 32) is symmetric 8-bit: absmax/127 recovers
  ``d`` and ``round(w / d)`` recovers ``q`` exactly; the 8-bit MatMulNBits zero point is 128.
* Q4_1 (``w = d * q + m``, q in [0, 15]) has a float offset ``m``; MatMulNBits (fast path) has an
  integer zero point ``z``: ``w' = d * (q - z)``. (max - min) / 15 recovers ``d``, and ``q`` is
  recovered exactly, but ``m`` is rounded to the nearest multiple of ``d`` (``z = round(-m / d)``):
  a per-block shift of at most d / 2. ORT's float-zero-point variant would be exact but
  dequantises every call: 1.0 ms vs 0.045 ms for one 576x1536 MatMul at batch 1 (measured here).
  A block whose ``-m / d`` falls outside [0, 15] widens its range to include 0 (plain RTN).
  That shift is shared by a block's 32 weights, so it adds up in a dot product instead of
  averaging out; ``gptq_4bit`` keeps the grid and chooses the codes again to minimise each
  layer's output error on calibration prompts (``calibrate.py``, the export's default).

Weights that come from no GGUF (fp16/fp32 checkpoints) are quantised the same way: it is then
plain round-to-nearest with per-block min/max. Probe nodes are never quantised (their weights
are a few KB). The Gather of the embedding table keeps fp32 (it reads B*T rows, not the table).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field

import numpy as np

from singlepass.errors import SinglepassError

WEIGHTS = ("fp32", "int8", "int4")
DEFAULT_WEIGHTS = "int4"
BLOCK = 32  # GGUF's block length for Q4_0/Q4_1/Q8_0
ACCURACY_LEVEL = 4  # MatMulNBits: int8 activations for the dot products (llama.cpp does the same: q8 activations)


@dataclass
class QuantSummary:
    weights: str
    matmuls: int = 0  # MatMuls turned into MatMulNBits
    bytes_before: int = 0  # fp32 bytes of those weights
    bytes_after: int = 0  # packed weights + scales + zero points
    blocks: int = 0
    blocks_exact: int = 0  # blocks whose dequantised values equal the original weights (float32 ==)
    max_abs_error: float = 0.0  # max |w' - w| over all quantised weights
    accuracy_level: int = ACCURACY_LEVEL
    block_size: int = BLOCK
    params: dict = field(default_factory=dict)  # torch parameter name -> bits (the reference's map)
    rounding: str = "nearest"  # 4-bit codes: "nearest" (each weight's own error) or "gptq" (calibrated)
    calibration: dict = field(default_factory=dict)  # what the GPTQ rounding was calibrated on

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- block quantisers


def _blocks(w_nk: np.ndarray) -> np.ndarray:
    """[N, K] -> [N, K/B, B] (K zero-padded to a multiple of B)."""
    n, k = w_nk.shape
    pad = (-k) % BLOCK
    if pad:
        w_nk = np.pad(w_nk, ((0, 0), (0, pad)))
    return w_nk.reshape(n, -1, BLOCK)


def _grid_4bit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Blocks [N, nb, 32] -> each block's 4-bit grid ``d * (q - z)``: scale d [N, nb] f32 and integer
    zero point z [N, nb] (a Q4_1 block's own d and its offset rounded to a whole step)."""
    lo, hi = x.min(-1), x.max(-1)  # [N, nb]
    d = (hi - lo) / 15  # Q4_1's scale, recovered
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.rint(-lo / d)
    bad = ~np.isfinite(z) | (z < 0) | (z > 15)  # offset not representable: widen the range to include 0
    lo0, hi0 = np.minimum(lo, 0), np.maximum(hi, 0)
    d = np.where(bad, (hi0 - lo0) / 15, d)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(bad, np.rint(-lo0 / d), z)
    z = np.nan_to_num(z, nan=0.0)
    d = np.where(d == 0, 1.0, d).astype(np.float32)  # a constant-zero block: any scale
    return d, z


def _pack_4bit(q: np.ndarray, d: np.ndarray, z: np.ndarray):
    """Codes q [N, nb, 32] in 0..15 on the grid (d, z) -> MatMulNBits' (packed [N, nb, 16] uint8, scales
    [N, nb], zero points [N, ceil(nb/2)] uint8) and the dequantised weights [N, nb, 32] f32."""
    q = q.astype(np.uint8)
    z8 = z.astype(np.uint8)  # [N, nb]
    deq = (q.astype(np.float32) - z8[..., None]) * d[..., None]
    packed = q[..., 0::2] | (q[..., 1::2] << 4)  # element 2i in the low nibble
    if z8.shape[1] % 2:
        z8 = np.pad(z8, ((0, 0), (0, 1)))
    zp = z8[:, 0::2] | (z8[:, 1::2] << 4)  # block 2j in the low nibble, per column
    return packed, d, zp, deq


def quantize_4bit(w_nk: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """[N, K] float32 -> (packed [N, K/32, 16] uint8, scales [N, K/32] f32, zero points
    [N, ceil(K/64)] uint8, dequantised [N, K/32, 32] f32 (for the error report)): each weight
    rounded to the nearest point of its block's grid."""
    x = _blocks(w_nk.astype(np.float32))  # [N, nb, 32]
    d, z = _grid_4bit(x)
    q = np.clip(np.rint(x / d[..., None]) + z[..., None], 0, 15)  # [N, nb, 32]
    return _pack_4bit(q, d, z)


def gptq_4bit(w_nk: np.ndarray, hessian, damp: float = 0.01, block: int = 128):
    """``quantize_4bit``'s grid, GPTQ's rounding (Frantar et al. 2022): the codes minimise the error of
    the layer's *output* ``x @ w.T`` over calibration inputs, ``hessian`` = X^T X [K, K] (any float
    tensor), instead of each weight's own error. Columns go in order of decreasing input energy
    ("act order"); each column's rounding error is pushed onto the columns not yet rounded through
    the inverse Hessian's Cholesky factor, ``block`` columns at a time. Same outputs as quantize_4bit;
    K must be a multiple of 32."""
    return gptq_4bit_many([w_nk], [hessian], damp, block)[0]


def gptq_4bit_many(ws: list[np.ndarray], hessians: list, damp: float = 0.01, block: int = 128) -> list[tuple]:
    """``gptq_4bit`` of G matrices of one shape [N, K], each with its own Hessian, at once: the column loop
    runs once over [G, N] slices (SmolLM2's 30 layers' q_proj, say) instead of once per matrix, whose
    ~10 small ops per column made the rounding Python-bound (210 matrices: ~40 s). -> one
    ``gptq_4bit`` result per matrix, in order."""
    import torch

    n, k = ws[0].shape
    if k % BLOCK:
        raise SinglepassError(f"GPTQ rounding needs K a multiple of {BLOCK}, not {k}")
    if any(w.shape != (n, k) for w in ws) or len(hessians) != len(ws):
        raise SinglepassError("gptq_4bit_many takes matrices of one shape, one Hessian each")
    grids = [_grid_4bit(_blocks(w.astype(np.float32))) for w in ws]  # the grid is fixed up front: only codes change
    D = torch.from_numpy(np.stack([np.repeat(d, BLOCK, 1) for d, _ in grids]))  # [G, N, K] each column's scale
    Z = torch.from_numpy(np.stack([np.repeat(z.astype(np.float32), BLOCK, 1) for _, z in grids]))  # zero point
    H = torch.stack([torch.as_tensor(h).to(torch.float64) for h in hessians])  # [G, K, K]
    for h in H:
        dead = torch.diag(h) == 0  # inputs never seen: plain rounding for their columns
        h[dead, dead] = 1.0
        h += damp * torch.diag(h).mean() * torch.eye(k, dtype=torch.float64)
    perm = torch.argsort(torch.diagonal(H, dim1=1, dim2=2), dim=1, descending=True)  # [G, K]
    H = torch.stack([h[p][:, p] for h, p in zip(H, perm)])
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()  # [G, K, K]
    del H
    cols = perm[:, None, :].expand(-1, n, -1)  # [G, N, K]
    W = torch.from_numpy(np.stack([w.astype(np.float32) for w in ws])).gather(2, cols)
    D, Z = D.gather(2, cols), Z.gather(2, cols)
    Q = torch.zeros(len(ws), n, k)  # the codes, permuted
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1, E1 = W[:, :, i1:i2].clone(), torch.zeros(len(ws), n, i2 - i1)  # [G, N, b]
        for i in range(i2 - i1):
            col, c = W1[:, :, i], i1 + i  # [G, N]
            q = torch.clamp(torch.round(col / D[:, :, c] + Z[:, :, c]), 0, 15)
            Q[:, :, c] = q
            err = (col - D[:, :, c] * (q - Z[:, :, c])) / U[:, c, c][:, None]  # [G, N]
            W1[:, :, i:] -= err[:, :, None] * U[:, None, c, c:i2]
            E1[:, :, i] = err
        W[:, :, i2:] -= E1 @ U[:, i1:i2, i2:]  # the block's errors, pushed onto the rest at once
    out = []
    for g, (d, z) in enumerate(grids):
        codes = Q[g][:, torch.argsort(perm[g])].numpy().reshape(n, -1, BLOCK)
        out.append(_pack_4bit(codes, d, z))
    return out


def quantize_8bit(w_nk: np.ndarray) -> tuple[np.ndarray, np.ndarray, None, np.ndarray]:
    """[N, K] -> (q + 128 [N, K/32, 32] uint8, scales [N, K/32], None (zero point 128), dequantised)."""
    x = _blocks(w_nk.astype(np.float32))
    d = np.abs(x).max(-1) / 127  # Q8_0's scale, recovered
    d = np.where(d == 0, 1.0, d).astype(np.float32)
    q = np.clip(np.rint(x / d[..., None]), -127, 127)
    deq = (q * d[..., None]).astype(np.float32)
    return (q + 128).astype(np.uint8), d, None, deq


# ----------------------------------------------------------------------------- the transformation


def _constant_weight(t) -> np.ndarray | None:
    """``t``: a gs.Tensor. The MatMul's B as a float32 [N, K] array: a 2-D initializer ([K, N], transposed here) or a
    Transpose(perm=[1, 0]) of one (a tied lm_head: the embedding table [V, d] itself); None for anything else."""
    import onnx_graphsurgeon as gs

    if isinstance(t, gs.Constant):
        if len(t.shape) == 2 and np.dtype(t.dtype) == np.float32:
            return np.ascontiguousarray(t.values.T)
        return None
    p = t.inputs[0] if t.inputs else None
    if p is not None and p.op == "Transpose" and list(p.attrs.get("perm", [1, 0])) == [1, 0]:
        src = p.inputs[0]
        if isinstance(src, gs.Constant) and len(src.shape) == 2 and np.dtype(src.dtype) == np.float32:
            return np.asarray(src.values)
    return None


def digest(w_nk: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(w_nk, dtype=np.float32).tobytes()).hexdigest()


def parameter_digests(model) -> dict[str, str]:
    """{sha1 of a Linear's weight [out, in]: its parameter name}: how a graph's MatMul weight is
    traced back to the module it came from (a tied lm_head is found as ``lm_head.weight``)."""
    import torch

    out = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, torch.nn.Linear):
            out.setdefault(digest(module.weight.detach().float().numpy()), f"{name}.weight")
    return out


def with_weights(model, weights: dict[str, np.ndarray]):
    """A copy of ``model`` whose named Linear weights are replaced (the reference of a quantised
    graph). A tied lm_head is untied: the graph's embedding Gather keeps the fp32 table."""
    import copy

    import torch

    ref = copy.deepcopy(model)
    for name, w in weights.items():
        owner, leaf = name.rsplit(".", 1)
        module = ref.get_submodule(owner)
        old = getattr(module, leaf)
        setattr(module, leaf, torch.nn.Parameter(torch.from_numpy(w).to(old.dtype), requires_grad=False))
    return ref


def quantize_weights(
    graph,
    weights: str,
    nodes: list,
    lm_head: str | None,
    names: dict[str, str] | None = None,
    rounded: dict[str, tuple] | None = None,
) -> QuantSummary:
    """Replace each MatMul among ``nodes`` whose B is a constant float32 matrix by MatMulNBits,
    in place. ``lm_head`` (the node name) gets 8 bits under int4. ``names`` (``parameter_digests``)
    names the new initializers ``singlepass/q{bits}/<parameter>/...`` so that validation can
    rebuild the same weights in the PyTorch reference. ``rounded`` ({parameter: gptq_4bit's
    (packed, scales, zero points)}, ``export/calibrate.py``) replaces round-to-nearest for the 4-bit
    weights it names. Run ``graph.cleanup()`` after."""
    import onnx_graphsurgeon as gs

    if weights not in WEIGHTS:
        raise SinglepassError(f"--weights must be one of {', '.join(WEIGHTS)}, not {weights!r}")
    summary = QuantSummary(weights)
    if weights == "fp32":
        return summary
    for k, node in enumerate(nodes):
        if node.op != "MatMul":
            continue
        w_nk = _constant_weight(node.inputs[1])  # [N, K]
        if w_nk is None:
            continue
        n, kdim = w_nk.shape
        bits = 8 if weights == "int8" or (node.name or node.outputs[0].name) == lm_head else 4
        param = (names or {}).get(digest(w_nk))
        if bits == 4 and param in (rounded or {}):
            packed, scales, zp = rounded[param]
            if packed.shape[:2] != (n, kdim // BLOCK):
                raise SinglepassError(
                    f"{param}: calibrated 4-bit codes {packed.shape} do not fit its {n}x{kdim} weight"
                )
            deq = dequantize(packed, scales, zp, 4, kdim).reshape(n, -1, BLOCK)
            summary.rounding = "gptq"
        else:
            packed, scales, zp, deq = (quantize_4bit if bits == 4 else quantize_8bit)(w_nk)
        x = _blocks(w_nk)
        err = np.abs(deq - x)
        summary.matmuls += 1
        summary.bytes_before += w_nk.nbytes
        summary.bytes_after += packed.nbytes + scales.nbytes + (zp.nbytes if zp is not None else 0)
        summary.blocks += err.shape[0] * err.shape[1]
        summary.blocks_exact += int((err.max(-1) == 0).sum())
        summary.max_abs_error = max(summary.max_abs_error, float(err.max()))
        if names is not None and param is None:
            raise SinglepassError(
                f"--weights {weights}: the weight of MatMul {node.name!r} ({kdim}x{n}) is none of the model's "
                "Linear weights (a graph whose weights were fused or transformed by another tool), so the export "
                "cannot be validated against the model: export it with --weights fp32 (the graph's own weights)"
            )
        base = f"singlepass/q{bits}/{param or node.name or k}"
        if param:
            summary.params[param] = bits
        inputs = [
            node.inputs[0],
            gs.Constant(f"{base}/B", packed.reshape(n, -1, packed.shape[-1] if bits == 4 else BLOCK)),
            gs.Constant(f"{base}/scales", scales.reshape(-1)),
        ]
        if zp is not None:
            inputs.append(gs.Constant(f"{base}/zero_points", zp))
        node.op, node.domain = "MatMulNBits", "com.microsoft"
        node.attrs = {"K": kdim, "N": n, "bits": bits, "block_size": BLOCK, "accuracy_level": ACCURACY_LEVEL}
        node.inputs.clear()
        node.inputs.extend(inputs)
        del w_nk, x, deq, err
    if summary.matmuls and not any(d.domain == "com.microsoft" for d in graph.import_domains or []):
        import onnx

        graph.import_domains = list(graph.import_domains or []) + [onnx.helper.make_opsetid("com.microsoft", 1)]
    return summary


def dequantize(B: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int, k: int) -> np.ndarray:
    """MatMulNBits' (B, scales, zero points) -> the float32 weight [N, K] it multiplies by."""
    n = B.shape[0]
    if bits == 4:
        q = np.stack([B & 0x0F, B >> 4], -1).reshape(n, -1, BLOCK)  # [N, nb, 32]
        nb = q.shape[1]
        z = (
            np.stack([zero_points & 0x0F, zero_points >> 4], -1).reshape(n, -1)[:, :nb]
            if zero_points is not None
            else 8
        )
    else:
        q, nb = B.reshape(n, -1, BLOCK), B.shape[1]
        z = zero_points.reshape(n, -1)[:, :nb] if zero_points is not None else 128
    z = np.broadcast_to(np.asarray(z, np.float32), (n, nb))
    w = (q.astype(np.float32) - z[..., None]) * scales.reshape(n, nb)[..., None]
    return w.reshape(n, -1)[:, :k]


def packed_name(names: list[str], rows: list[int]) -> str | None:
    """The initializer name of MatMulNBits weights stacked along N (export/ortfuse.py packs a
    layer's q/k/v) from initializers named ``singlepass/q{bits}/<parameter>/<part>`` holding
    ``rows`` rows each: ``singlepass/q{bits}/<parameter>@<rows>+<parameter>@<rows>.../<part>``,
    which ``graph_weights`` splits back. None when one is not named after a parameter."""
    parts = [n.split("/") for n in names]
    if any(len(p) != 4 or p[0] != "singlepass" or not p[1].startswith("q") for p in parts):
        return None
    if len({(p[1], p[3]) for p in parts}) != 1:
        return None
    stacked = "+".join(f"{p[2]}@{n}" for p, n in zip(parts, rows))
    return "/".join([parts[0][0], parts[0][1], stacked, parts[0][3]])


def graph_weights(folder) -> dict[str, np.ndarray]:
    """{torch parameter name: float32 [out, in]} of every MatMulNBits weight an export named after
    its parameter (``singlepass/q{bits}/<parameter>/B``, or ``packed_name``'s stack of several),
    read back from an artifact's graph (only those initializers are loaded from the external data
    file)."""
    from pathlib import Path

    import onnx
    from onnx import numpy_helper
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    from singlepass.export.manifest import GRAPH

    model = onnx.load(str(Path(folder) / GRAPH), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}

    def array(name: str) -> np.ndarray | None:
        if not name:
            return None
        t = inits[name]
        if uses_external_data(t):
            load_external_data_for_tensor(t, str(folder))
        return numpy_helper.to_array(t)

    out = {}
    for node in model.graph.node:
        if node.op_type != "MatMulNBits" or not node.input[1].startswith("singlepass/q"):
            continue
        attrs = {a.name: a.i for a in node.attribute}
        param = node.input[1].split("/", 2)[2].rsplit("/", 1)[0]
        zp = array(node.input[3]) if len(node.input) > 3 else None
        w = dequantize(array(node.input[1]), array(node.input[2]), zp, attrs["bits"], attrs["K"])  # [N, K]
        stacked = [p.rsplit("@", 1) for p in param.split("+")] if "@" in param else [(param, w.shape[0])]
        for (name, _), rows in zip(stacked, np.split(w, np.cumsum([int(n) for _, n in stacked])[:-1])):
            out[name] = rows
    return out
