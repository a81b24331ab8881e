"""ONNX front end: an int8 ``.onnx`` model (onnxruntime's static quantization) to the integer graph, as it is.

Both formats of ``onnxruntime.quantization.quantize_static`` are read, and run with
onnxruntime's CPU integer arithmetic (the kernels it executes; measured against it):

- QOperator: QLinearConv, QGemm and QLinearMatMul (the multiplying layers),
  QLinearAdd, QLinearGlobalAveragePool, and on 8-bit tensors Pad (constant,
  the zero point), MaxPool, Flatten and Reshape to [batch, features];
- QDQ: the same operators written as DequantizeLinear -> Conv / Gemm / MatMul /
  Add / GlobalAveragePool / Pad / MaxPool / Flatten / Reshape / Relu ->
  QuantizeLinear, read as the integer operator onnxruntime fuses the group into.
  Where onnxruntime cannot fuse a group (for example a DequantizeLinear shared
  by two consumers, unless the model was quantized with
  ``extra_options={"DedicatedQDQPair": True}``) it runs that operator in float
  and its result may differ from the integer one;
- the input: QuantizeLinear of float pixel values 0..255 with scale 1 (uint8
  zero point 0 or int8 zero point -128), optionally after a constant zero Pad;
  the graph ends at the last quantized tensor (the input of the final
  DequantizeLinear, before any Softmax).

Arithmetic, as onnxruntime's MLAS computes it:

- QLinearConv / QGemm / QLinearMatMul: exact integer sums of (x - zp_x) * w
  plus the int32 bias, then ``Requant`` mode "float32": the float32 scale
  (s_x * s_w[f]) / s_y, product and rounding in float32, nearest even, plus
  zp_y, saturated. Weights are int8 with zero point 0 (per channel or per
  tensor): what the MAC array multiplies is (x - zp_x) * w, an unsigned 0..255
  operand after a ReLU (zero point at the type's minimum), as in the TFLite
  import;
- QLinearAdd: ``OrtAdd`` (float32 ratios and fused multiply-adds, its AVX2
  kernel, which x86 CPUs with AVX2 and AVX-512 both run);
- QLinearGlobalAveragePool: the integer sum of q - zp_x requantized by the
  float32 scale s_x / (s_y * count).

Refused with one line naming the node: non-zero weight zero points, uint8
weights, dilations, unequal strides, broadcasting additions, any other
operator, and float operators that are not part of a quantized group. Constant
subgraphs (for example an exporter's computation of Pad's pads) are evaluated
with ``onnx.reference``. Nothing in the file runs code: no external data is
read (a model that needs it is refused) and the file size is bounded before
parsing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from maxdnn.errors import ModelError
from maxdnn.ir.graph import (
    Clamp,
    Flatten,
    MulLayer,
    OrtAdd,
    Pool,
    QParams,
    QuantizedGraph,
    unique_name,
)
from maxdnn.ir.quant import Requant, conv_out_hw

MAX_BYTES = 1 << 30  # protobuf's own limit is 2 GiB
RANGES = {np.dtype(np.uint8): (0, 255), np.dtype(np.int8): (-128, 127)}
FLOAT_GROUP_OPS = ("Conv", "Gemm", "MatMul", "Add", "GlobalAveragePool", "Pad", "MaxPool", "Flatten", "Reshape",
                   "Relu")
PASS_OPS = ("Identity",)
F32 = np.float32


@dataclass
class _QT:
    """A quantized tensor: the node that holds it, its quantization and shape (C, H, W) or (features,)."""

    node: str
    q: QParams
    shape: tuple
    pads: tuple = (0, 0, 0, 0)  # a pending zero-point Pad (left, right, top, bottom), folded into the next conv


@dataclass
class _State:
    path: Path
    const: dict = field(default_factory=dict)  # name -> np.ndarray
    qt: dict = field(default_factory=dict)  # quantized tensor name -> _QT
    dq_act: dict = field(default_factory=dict)  # DequantizeLinear output -> quantized tensor name
    dq_const: dict = field(default_factory=dict)  # DequantizeLinear of a constant -> (ints, scale, zp, axis)
    float_pad: dict = field(default_factory=dict)  # float tensor -> (graph input, pads) before the input Quantize
    consumers: dict = field(default_factory=dict)
    consumed: set = field(default_factory=set)
    nodes: list = field(default_factory=list)
    taken: set = field(default_factory=set)
    input_name: str = ""
    input_q: QParams | None = None
    input_shape: tuple = ()
    final: str | None = None

    def err(self, node, msg: str) -> ModelError:
        what = f"node {node.name or node.op_type} ({node.op_type})" if node is not None else "model"
        return ModelError(f"{self.path}: {what}: {msg}")


def read_onnx(path: str | Path):
    """The parsed ``onnx.ModelProto`` of a file (size bounded, no external data), or one line (ModelError)."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no such model file")
    if path.stat().st_size > MAX_BYTES:
        raise ModelError(f"{path}: {path.stat().st_size} bytes, over the {MAX_BYTES} bytes an ONNX model may have")
    try:
        import onnx
    except ImportError:
        raise ModelError(f"{path}: reading ONNX needs the onnx package (pip install 'maxdnn[onnx]')") from None
    try:
        model = onnx.load_model_from_string(path.read_bytes())
    except Exception as e:  # noqa: BLE001 - any parse failure: not an ONNX model
        raise ModelError(f"{path}: not a readable ONNX model ({type(e).__name__})") from None
    if not model.graph.node:  # protobuf parses many a short foreign file as an empty message
        raise ModelError(f"{path}: not a readable ONNX model (no graph: an empty or foreign file)")
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            raise ModelError(f"{path}: initializer '{init.name}' keeps its data in an external file, which maxdnn "
                             f"does not read")
    return model


def is_quantized(model) -> bool:
    return any(n.op_type == "QuantizeLinear" for n in model.graph.node)


def start_state(path: Path, model) -> _State:
    """The conversion's state with the model's constants and its one input (name, [C, H, W]) checked."""
    from onnx import numpy_helper

    g = model.graph
    st = _State(Path(path))
    for init in g.initializer:
        st.const[init.name] = numpy_helper.to_array(init)
    inputs = [i for i in g.input if i.name not in st.const]
    if len(inputs) != 1 or len(g.output) != 1:
        raise ModelError(f"{path}: the model must have one input and one output")
    st.input_name = inputs[0].name
    dims = [d.dim_value for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or not all(dims[1:]):
        raise ModelError(f"{path}: input '{st.input_name}' must be [batch, channels, height, width] with known sizes")
    st.input_shape = tuple(int(d) for d in dims[1:])
    return st


def load_onnx_model(path: str | Path):
    """An int8 ONNX model as its integer graph, a float one as a float network (``onnx_float``)."""
    model = read_onnx(path)
    if is_quantized(model):
        return load_onnx(path, model)
    from maxdnn.frontends.onnx_float import load_float_onnx

    return load_float_onnx(path, model)


def load_onnx(path: str | Path, model=None) -> QuantizedGraph:
    """The integer graph of an int8 ONNX model (see the module docstring)."""
    path = Path(path)
    model = model if model is not None else read_onnx(path)
    g = model.graph
    if not is_quantized(model):
        raise ModelError(f"{path}: a float ONNX model, not an int8 one (maxdnn.load_model reads it as a float "
                         f"network for maxdnn's own quantization)")
    st = start_state(path, model)
    for n in g.node:
        for i in n.input:
            st.consumers.setdefault(i, []).append(n)
    out_name = g.output[0].name
    for n in g.node:
        if n.name in st.consumed:
            continue
        _convert(st, n, out_name)
    if st.final is None:
        if out_name in st.qt:
            st.final = out_name
        else:
            raise ModelError(f"{path}: the model's output is not a quantized tensor of a supported operator")
    if not st.nodes or st.qt[st.final].node != st.nodes[-1].name:
        raise ModelError(f"{path}: the model's output is not the last quantized operator's")
    tensors = {}
    for name, t in st.qt.items():  # the ONNX tensor each node's output is (the first, for pass-through operators)
        tensors.setdefault(t.node, name)
    return QuantizedGraph(st.input_q, st.input_shape, st.nodes,
                          {"source": str(path), "quantization": "the model's own (ONNX, onnxruntime CPU arithmetic)",
                           "onnx_tensors": tensors}, pixel_offset=st.input_q.zero_point)


# ---------------------------------------------------------------- node dispatch


def _convert(st: _State, n, out_name: str) -> None:
    op = n.op_type
    if op == "Constant":
        st.const[n.output[0]] = _constant_value(n)
        return
    if n.domain not in ("", "ai.onnx", "com.microsoft"):
        raise st.err(n, f"operator domain '{n.domain}' is not supported")
    if op not in ("QuantizeLinear", "DequantizeLinear") and n.input and all(
            i == "" or i in st.const for i in n.input):
        _fold(st, n)
        return
    if op == "DequantizeLinear":
        _dequantize(st, n, out_name)
    elif op == "QuantizeLinear":
        _quantize_input(st, n)
    elif op == "Softmax" and n.input[0] in st.dq_act:
        st.final = st.dq_act[n.input[0]]
    elif op in PASS_OPS and n.input[0] in st.qt:
        st.qt[n.output[0]] = st.qt[n.input[0]]
    elif op == "Pad" and n.input[0] == st.input_name:
        _input_pad(st, n)
    elif op in QOPS and (op.startswith("Q") or n.input[0] in st.qt):
        QOPS[op](st, n)
    elif op in FLOAT_GROUP_OPS:
        _qdq_group(st, n)
    else:
        raise st.err(n, "unsupported operator")


def _constant_value(n) -> np.ndarray:
    from onnx import numpy_helper

    for a in n.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name in ("value_float", "value_int"):
            return np.array(a.f if a.name == "value_float" else a.i)
        if a.name in ("value_floats", "value_ints"):
            return np.array(list(a.floats) if a.name == "value_floats" else list(a.ints))
    raise ModelError(f"node {n.name}: a Constant without a value")


def _fold(st: _State, n) -> None:
    """Evaluate a node whose inputs are all constant (onnx's reference evaluator: numpy, no user code)."""
    from onnx.reference import ReferenceEvaluator

    try:
        feeds = {i: st.const[i] for i in n.input if i}
        outs = ReferenceEvaluator(n).run(None, feeds)
    except Exception as e:  # noqa: BLE001 - an operator the evaluator cannot run on these constants
        raise st.err(n, f"cannot evaluate this constant operator ({type(e).__name__})") from None
    for name, v in zip(n.output, outs):
        st.const[name] = np.asarray(v)


def _attrs(n) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in n.attribute}


def _scalar(st: _State, n, name: str, what: str):
    if name not in st.const:
        raise st.err(n, f"{what} must be a constant")
    v = np.asarray(st.const[name])
    if v.size != 1:
        raise st.err(n, f"{what} must be a single value (per-tensor)")
    return v.reshape(()).item() if v.dtype.kind == "f" else int(v.reshape(()))


def _qparams(st: _State, n, scale: str, zp: str | None, default_dtype=np.uint8) -> tuple[QParams, np.dtype]:
    s = F32(_scalar(st, n, scale, "a scale"))
    if zp and zp in st.const:
        z = np.asarray(st.const[zp])
        dtype, zv = z.dtype, int(z.reshape(-1)[0]) if z.size == 1 else None
        if zv is None:
            raise st.err(n, "an activation zero point must be a single value")
    else:
        dtype, zv = np.dtype(default_dtype), 0
    if dtype not in RANGES:
        raise st.err(n, f"{dtype} activations are not supported (uint8 or int8)")
    if not s > 0:
        raise st.err(n, f"activation scale {s} must be positive")
    lo, hi = RANGES[dtype]
    return QParams(float(s), zv, lo, hi), dtype


def _layer_name(st: _State, n, fallback: str) -> str:
    parts = [p for p in (n.name or "").split("/") if p]
    if len(parts) > 1:
        parts = parts[:-1]
    base = ".".join(parts) or fallback
    return unique_name(base.removesuffix("_quant"), st.taken)


def _act(st: _State, n, name: str) -> _QT:
    if name in st.qt:
        return st.qt[name]
    raise st.err(n, f"input '{name}' is not a quantized tensor of a supported operator")


# ---------------------------------------------------------------- quantize / dequantize


def _quantize_input(st: _State, n) -> None:
    src = n.input[0]
    pads = (0, 0, 0, 0)
    if src in st.float_pad:
        src, pads = st.float_pad[src]
    if src != st.input_name:
        raise st.err(n, "quantizes a float tensor that is not the model input (a float operator outside a "
                        "quantized group)")
    if st.input_q is not None:
        raise st.err(n, "the model input is quantized twice")
    q, _ = _qparams(st, n, n.input[1], n.input[2] if len(n.input) > 2 else None)
    if q.scale != 1.0:
        raise st.err(n, f"input scale {q.scale}: only inputs quantized at one step per pixel value (float pixels "
                        f"0..255, scale 1) are supported")
    if q.zero_point + 255 > q.hi or q.zero_point < q.lo:
        raise st.err(n, f"input zero point {q.zero_point} clips pixel values 0..255")
    st.input_q = q
    st.qt[n.output[0]] = _QT("input", q, st.input_shape, pads)


def _input_pad(st: _State, n) -> None:
    st.float_pad[n.output[0]] = (n.input[0], _pad_amounts(st, n, 0.0))


def _dequantize(st: _State, n, out_name: str) -> None:
    x = n.input[0]
    if x in st.const:
        a = _attrs(n)
        scale = np.asarray(st.const[n.input[1]], dtype=np.float32)
        zp = np.asarray(st.const[n.input[2]]) if len(n.input) > 2 and n.input[2] else np.zeros(1, np.int64)
        st.dq_const[n.output[0]] = (np.asarray(st.const[x]), scale, zp, int(a.get("axis", 1)))
        return
    t = _act(st, n, x)
    q, _ = _qparams(st, n, n.input[1], n.input[2] if len(n.input) > 2 else None)
    if (F32(q.scale), q.zero_point) != (F32(t.q.scale), t.q.zero_point):
        raise st.err(n, "dequantizes with other parameters than the tensor was quantized with")
    st.dq_act[n.output[0]] = x
    if n.output[0] == out_name:
        st.final = x


def _qdq_group(st: _State, n) -> None:
    """DequantizeLinear -> float operator -> QuantizeLinear, read as the integer operator onnxruntime runs."""
    acts = [i for i in n.input if i in st.dq_act]
    if not acts or n.input[0] not in st.dq_act:
        raise st.err(n, "onnxruntime runs this operator in float (its input is not a dequantized 8-bit tensor); "
                        "maxdnn imports integer operators only")
    users = st.consumers.get(n.output[0], [])
    if not users or any(u.op_type != "QuantizeLinear" for u in users):
        raise st.err(n, "its output is not quantized by a QuantizeLinear (onnxruntime runs it in float)")
    qn = users[0]
    yq, _ = _qparams(st, qn, qn.input[1], qn.input[2] if len(qn.input) > 2 else None)
    for u in users:  # DedicatedQDQPair: one QuantizeLinear per consumer, all alike
        uq, _ = _qparams(st, u, u.input[1], u.input[2] if len(u.input) > 2 else None)
        if (F32(uq.scale), uq.zero_point, uq.lo) != (F32(yq.scale), yq.zero_point, yq.lo):
            raise st.err(n, "its output is quantized twice with different parameters")
        st.consumed.add(u.name)
    x = st.dq_act[n.input[0]]
    y = qn.output[0]
    aliases = [u.output[0] for u in users[1:]]
    op = n.op_type
    if op in ("Conv", "Gemm", "MatMul"):
        w_name = n.input[1]
        if w_name not in st.dq_const:
            raise st.err(n, "weights must be a dequantized int8 constant")
        w, ws, wz, axis = st.dq_const[w_name]
        out_axis = 1 if op == "MatMul" or (op == "Gemm" and not _attrs(n).get("transB", 0)) else 0
        if ws.size > 1 and axis % w.ndim != out_axis:
            raise st.err(n, f"weights quantized per axis {axis}, not per output channel")
        bias = None
        if len(n.input) > 2 and n.input[2]:
            if n.input[2] not in st.dq_const:
                raise st.err(n, "the bias must be a dequantized int32 constant")
            bias = st.dq_const[n.input[2]][0]
        _multiplying(st, n, op, x, w, ws, wz, bias, yq, y, _attrs(n))
    elif op == "Add":
        if len(acts) != 2:
            raise st.err(n, "only additions of two quantized activations are supported")
        _add(st, n, st.dq_act[n.input[0]], st.dq_act[n.input[1]], yq, y)
    elif op == "GlobalAveragePool":
        _global_avg(st, n, x, yq, y)
    else:
        t = st.qt[x]
        if (F32(yq.scale), yq.zero_point) != (F32(t.q.scale), t.q.zero_point):
            raise st.err(n, "requantizes its input (only the same parameters on both sides are supported)")
        if op == "Pad":
            _pad(st, n, x, y, 0.0)
        elif op == "Relu":
            _no_pending_pad(st, n, t)
            out = QParams(t.q.scale, t.q.zero_point, max(t.q.lo, t.q.zero_point), t.q.hi)
            st.qt[y] = _QT(_append(st, Clamp(unique_name(f"relu{len(st.nodes)}", st.taken), [t.node], out)), out,
                           t.shape)
        else:
            _shape_op(st, n, x, y)
    for a in aliases:
        st.qt[a] = st.qt[y]


# ---------------------------------------------------------------- QOperator operators


def _input(st: _State, n, x: str, scale: str, zp: str) -> _QT:
    """A QOperator operator's quantized input, checked against the (scale, zero point) the operator names."""
    t = _act(st, n, x)
    q, _ = _qparams(st, n, scale, zp)
    if (F32(q.scale), q.zero_point) != (F32(t.q.scale), t.q.zero_point):
        raise st.err(n, f"the scale / zero point of input '{x}' differ from the tensor's quantization")
    return t


def _weights(st: _State, n, w: str, ws: str, wz: str):
    """(int weights, float32 scales, zero points) of a constant weight operand."""
    if w not in st.const:
        raise st.err(n, "weights must be a constant")
    return (np.asarray(st.const[w]), np.asarray(st.const[ws], np.float32),
            np.asarray(st.const[wz]) if wz else np.zeros(1, np.int64))


def _q_conv(st: _State, n) -> None:
    i = list(n.input) + [""] * (9 - len(n.input))
    _input(st, n, i[0], i[1], i[2])
    yq, _ = _qparams(st, n, i[6], i[7])
    bias = np.asarray(st.const[i[8]]) if i[8] else None
    _multiplying(st, n, "Conv", i[0], *_weights(st, n, i[3], i[4], i[5]), bias, yq, n.output[0], _attrs(n))


def _q_gemm(st: _State, n) -> None:
    i = list(n.input) + [""] * (9 - len(n.input))
    _input(st, n, i[0], i[1], i[2])
    if not i[7]:
        raise st.err(n, "a QGemm with a float output is not supported")
    yq, _ = _qparams(st, n, i[7], i[8])
    bias = np.asarray(st.const[i[6]]) if i[6] else None
    _multiplying(st, n, "Gemm", i[0], *_weights(st, n, i[3], i[4], i[5]), bias, yq, n.output[0], _attrs(n))


def _q_matmul(st: _State, n) -> None:
    i = list(n.input)
    _input(st, n, i[0], i[1], i[2])
    yq, _ = _qparams(st, n, i[6], i[7])
    _multiplying(st, n, "MatMul", i[0], *_weights(st, n, i[3], i[4], i[5]), None, yq, n.output[0], {})


def _q_add(st: _State, n) -> None:
    i = list(n.input)
    _input(st, n, i[0], i[1], i[2])
    _input(st, n, i[3], i[4], i[5])
    yq, _ = _qparams(st, n, i[6], i[7] if len(i) > 7 else None)
    _add(st, n, i[0], i[3], yq, n.output[0])


def _q_gap(st: _State, n) -> None:
    i = list(n.input)
    if _attrs(n).get("channels_last", 0):
        raise st.err(n, "channels_last QLinearGlobalAveragePool is not supported")
    _input(st, n, i[0], i[1], i[2])
    yq, _ = _qparams(st, n, i[3], i[4])
    _global_avg(st, n, i[0], yq, n.output[0])


def _q_shape(st: _State, n) -> None:
    if n.op_type == "Pad":
        t = _act(st, n, n.input[0])
        _pad(st, n, n.input[0], n.output[0], t.q.zero_point)
    else:
        _shape_op(st, n, n.input[0], n.output[0])


# ---------------------------------------------------------------- builders


def _append(st: _State, node):
    st.nodes.append(node)
    return node.name


def _pad_amounts(st: _State, n, zero) -> tuple[int, int, int, int]:
    a = _attrs(n)
    if a.get("mode", b"constant") not in (b"constant", "constant"):
        raise st.err(n, "only constant padding is supported")
    pads = a.get("pads")
    if pads is None:
        if len(n.input) < 2 or n.input[1] not in st.const:
            raise st.err(n, "pads must be a constant")
        pads = st.const[n.input[1]]
    pads = [int(p) for p in np.asarray(pads).reshape(-1)]
    if len(n.input) > 2 and n.input[2]:
        value = np.asarray(st.const.get(n.input[2], np.array(np.nan))).reshape(-1)
        if value.size and not (value[0] == zero):
            raise st.err(n, f"pads with {value[0]}, not the zero point {zero}")
    if len(n.input) > 3 and n.input[3]:
        raise st.err(n, "padding selected axes is not supported")
    if len(pads) != 8 or any(pads[k] for k in (0, 1, 4, 5)) or any(p < 0 for p in pads):
        raise st.err(n, f"pads {pads}: only non-negative padding of height and width is supported")
    return (pads[3], pads[7], pads[2], pads[6])


def _pad(st: _State, n, x: str, y: str, zero) -> None:
    t = st.qt[x]
    p = _pad_amounts(st, n, zero)
    st.qt[y] = _QT(t.node, t.q, t.shape, tuple(a + b for a, b in zip(t.pads, p)))


def _no_pending_pad(st: _State, n, t: _QT) -> None:
    if any(t.pads):
        raise st.err(n, "a Pad feeds an operator other than a convolution")


def _shape_op(st: _State, n, x: str, y: str) -> None:
    t = st.qt[x]
    _no_pending_pad(st, n, t)
    if n.op_type == "MaxPool":
        a = _attrs(n)
        k = tuple(int(v) for v in a["kernel_shape"])
        strides = [int(v) for v in a.get("strides", [1, 1])]
        if len(set(strides)) != 1 or any(int(d) != 1 for d in a.get("dilations", [1, 1])) or a.get("ceil_mode", 0):
            raise st.err(n, "unequal strides, dilations and ceil_mode are not supported")
        pads = _conv_pads(st, n, a, t.shape[1:], k, strides[0])
        c, h, w = t.shape
        name = _append(st, Pool(unique_name(f"maxpool{len(st.nodes)}", st.taken), [t.node], t.q, op="max", kernel=k,
                                stride=strides[0], pads=pads))
        st.qt[y] = _QT(name, t.q, (c,) + conv_out_hw((h, w), k, strides[0], pads))
        return
    if n.op_type == "Flatten":
        if int(_attrs(n).get("axis", 1)) != 1:
            raise st.err(n, "only Flatten with axis 1 is supported")
    elif n.op_type == "Reshape":
        shape = [int(v) for v in np.asarray(st.const.get(n.input[1], np.zeros(0))).reshape(-1)]
        if len(shape) != 2 or shape[1] not in (-1, int(np.prod(t.shape))):
            raise st.err(n, f"only reshapes to [batch, features] are supported (got {shape})")
    if len(t.shape) == 1:
        st.qt[y] = t
        return
    name = _append(st, Flatten(unique_name(f"flatten{len(st.nodes)}", st.taken), [t.node], t.q))
    st.qt[y] = _QT(name, t.q, (int(np.prod(t.shape)),))


def _conv_pads(st: _State, n, a: dict, in_hw, k, stride) -> tuple[int, int, int, int]:
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        out = []
        for size, kk in zip(in_hw, k):
            total = max((-(-size // stride) - 1) * stride + kk - size, 0)
            small = total // 2
            out.append((small, total - small) if auto == "SAME_UPPER" else (total - small, small))
        (t, b), (left, r) = out
        return (left, r, t, b)
    if auto == "VALID":
        return (0, 0, 0, 0)
    p = [int(v) for v in a.get("pads", [0, 0, 0, 0])]
    return (p[1], p[3], p[0], p[2])


def _multiplying(st: _State, n, op: str, x: str, w, ws, wz, bias, yq: QParams, y: str, a: dict) -> None:
    t = _act(st, n, x)
    if np.asarray(w).dtype != np.int8:
        raise st.err(n, f"{np.asarray(w).dtype} weights: maxdnn's multipliers take int8 weights (quantize with "
                        f"weight_type=QuantType.QInt8)")
    if np.any(np.asarray(wz) != 0):
        raise st.err(n, "a non-zero weight zero point: maxdnn's multipliers take symmetric int8 weights "
                        "(the default of quantize_static)")
    w = np.asarray(w).astype(np.int64)
    ws = np.asarray(ws, np.float32).reshape(-1)
    if op == "Conv":
        if w.ndim != 4:
            raise st.err(n, "only 2-D convolutions are supported")
        if any(int(d) != 1 for d in a.get("dilations", [1, 1])):
            raise st.err(n, "dilation is not supported")
        strides = [int(v) for v in a.get("strides", [1, 1])]
        if len(set(strides)) != 1:
            raise st.err(n, "unequal strides are not supported")
        groups = int(a.get("group", 1))
        if len(t.shape) != 3 or t.shape[0] != w.shape[1] * groups:
            raise st.err(n, f"weights {list(w.shape)} do not fit the input {list(t.shape)}")
        stride = strides[0]
        own = _conv_pads(st, n, a, t.shape[1:], w.shape[2:], stride)
        pads = tuple(p + q for p, q in zip(own, t.pads))
        kind, in_hw = "conv", t.shape[1:]
    else:
        _no_pending_pad(st, n, t)
        if op == "Gemm":
            if a.get("transA", 0) or float(a.get("alpha", 1.0)) != 1.0 or float(a.get("beta", 1.0)) != 1.0:
                raise st.err(n, "only Gemm with transA 0, alpha 1 and beta 1 is supported")
            if not a.get("transB", 0):
                w = w.T
        else:
            w = w.T  # MatMul: b is [K, N]
        feat = int(np.prod(t.shape))
        if w.ndim != 2 or w.shape[1] != feat:
            raise st.err(n, f"weights {list(w.shape)} do not fit {feat} input features")
        w = w[:, :, None, None]
        groups, stride, pads, kind, in_hw = 1, 1, (0, 0, 0, 0), "linear", (1, 1)
    f = w.shape[0]
    if ws.size not in (1, f):
        raise st.err(n, f"{ws.size} weight scales for {f} output channels")
    ws = np.broadcast_to(ws, (f,)).astype(np.float32)
    scales = (F32(t.q.scale) * ws) / F32(yq.scale)  # onnxruntime: (x_scale * w_scale[f]) / y_scale, float32
    b = np.zeros(f, np.int64) if bias is None else np.asarray(bias).astype(np.int64).reshape(-1)
    if b.size != f:
        raise st.err(n, f"{b.size} biases for {f} output channels")
    layer = MulLayer(_layer_name(st, n, f"layer{len(st.nodes)}"), [t.node], yq, op=kind,
                     weight=np.ascontiguousarray(w), bias=b, w_scale=ws.astype(np.float64),
                     requant=Requant.float32(scales), in_q=t.q, stride=stride, pads=pads, groups=groups,
                     in_hw=tuple(int(v) for v in in_hw))
    _append(st, layer)
    st.qt[y] = _QT(layer.name, yq, (f,) + layer.out_hw if kind == "conv" else (f,))


def _add(st: _State, n, x0: str, x1: str, yq: QParams, y: str) -> None:
    a, b = st.qt[x0], st.qt[x1]
    _no_pending_pad(st, n, a)
    _no_pending_pad(st, n, b)
    if a.shape != b.shape:
        raise st.err(n, f"broadcasting additions are not supported ({list(a.shape)} + {list(b.shape)})")
    if a.q.lo != yq.lo or b.q.lo != yq.lo:
        raise st.err(n, "inputs and output of different 8-bit types are not supported")
    r0, r1 = F32(a.q.scale) / F32(yq.scale), F32(b.q.scale) / F32(yq.scale)
    # onnxruntime's build contracts r0 * zp0 + r1 * zp1 into fma(r0, zp0, r1 * zp1) (measured: the separate
    # roundings differ on 5 bytes of a uint8 model's additions, the fused form on none)
    fixed = F32(yq.zero_point) - _fma32(r0, a.q.zero_point, F32(r1 * F32(b.q.zero_point)))
    _check_fma_exact(st, n, [r0, r1], fixed)
    name = _append(st, OrtAdd(unique_name(f"add{len(st.nodes)}", st.taken), [a.node, b.node], yq,
                              in_zps=[a.q.zero_point, b.q.zero_point], requants=[None, None],
                              ratios=[float(r0), float(r1)], fixed=float(fixed)))
    st.qt[y] = _QT(name, yq, a.shape)


def _fma32(a, b, c) -> np.float32:
    """float32 a * b + c rounded once (exact rationals; float64's nearest, then float32's, is exact here since
    a * b + c of two float32 and an 8-bit integer fits 53 bits)."""
    from fractions import Fraction

    exact = Fraction(float(F32(a))) * Fraction(float(b)) + Fraction(float(F32(c)))
    if exact != Fraction(float(exact)):
        raise ValueError("inexact float32 fma emulation")
    return F32(float(exact))


def _check_fma_exact(st: _State, n, ratios, fixed) -> None:
    """The engines emulate each float32 FMA in float64: exact when every addend's bits fit 53 bits."""
    parts = [abs(float(r)) for r in ratios if r] + ([abs(float(fixed))] if fixed else [])
    lsb = min(np.frexp(v)[1] for v in parts) - 24
    top = np.frexp(256.0 * sum(parts) + 256.0)[1]
    if top - lsb > 52:
        raise st.err(n, "scales too far apart for an exact emulation of onnxruntime's float32 addition")


def _global_avg(st: _State, n, x: str, yq: QParams, y: str) -> None:
    t = st.qt[x]
    _no_pending_pad(st, n, t)
    if len(t.shape) != 3:
        raise st.err(n, "global pooling needs a [C, H, W] input")
    c, h, w = t.shape
    scale = F32(t.q.scale) / (F32(yq.scale) * F32(h * w))  # onnxruntime: ScaleInput / (ScaleOutput * ImageSize)
    if not (2.0 ** -32 <= scale < 256.0):
        raise st.err(n, "scale out of onnxruntime's range for QLinearGlobalAveragePool")
    name = _append(st, Pool(unique_name(f"avgpool{len(st.nodes)}", st.taken), [t.node], yq, op="avg", kernel=None,
                            rounding="float32", in_zp=t.q.zero_point, scale=float(scale)))
    st.qt[y] = _QT(name, yq, (c, 1, 1))


QOPS = {"QLinearConv": _q_conv, "QGemm": _q_gemm, "QLinearMatMul": _q_matmul, "QLinearAdd": _q_add,
        "QLinearGlobalAveragePool": _q_gap, "Flatten": _q_shape, "Reshape": _q_shape, "Pad": _q_shape,
        "MaxPool": _q_shape}
