"""TFLite front end: an int8 ``.tflite`` flatbuffer to the integer graph, as it is (no re-quantization).

The flatbuffer is read with the ``tflite`` package (the schema's Python
bindings; no TensorFlow). The graph keeps the model's own scales, zero points
and int32 biases, and follows TFLite's reference kernels exactly:

- CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED: sum over in-bounds taps of
  (x - zp_x) * w (int8 symmetric weights, per channel or per tensor) plus the
  int32 bias, MultiplyByQuantizedMultiplier (SaturatingRoundingDoublingHighMul,
  then RoundingDivideByPOT) with the multiplier QuantizeMultiplier derives from
  s_x * s_w / s_y in double precision, plus zp_y, clamped to the fused
  activation's range. FULLY_CONNECTED rounds once instead,
  (acc * m + 2^(30 - shift)) >> (31 - shift): that is what LiteRT's reference
  kernel computes (ai-edge-litert 2.3 with BUILTIN_REF: all 11,000 test
  images agree; the double-rounding form differs on 149 of 10,000 logits of
  the 1,000 lossless test images);
- ADD: both inputs (q - zp) << 20, each scaled by its multiplier, summed,
  scaled to the output, plus zp_y, clamped;
- AVERAGE_POOL_2D (raw values' in-bounds sum over their count, rounded half
  away from zero), MAX_POOL_2D, RESHAPE to [batch, features];
- QUANTIZE of the float input (scale 1: one step per pixel value) and a final
  SOFTMAX or DEQUANTIZE: the graph stops before them, so its output is the int8
  tensor that feeds the softmax, and accuracy is its argmax.

What a MAC array multiplies is (x - zp_x) * w: for inputs with zero point -128
(every post-ReLU tensor of MLPerf Tiny's ResNet-8) an unsigned 0..255 operand,
the same ROUP multipliers as everywhere; other zero points give a 9-bit
operand, which the exact engines handle and the approximate path refuses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from maxdnn.ir.graph import Flatten, MulLayer, Pool, QParams, QuantizedGraph, TfliteAdd, unique_name
from maxdnn.errors import ModelError
from maxdnn.ir.quant import Requant, conv_out_hw, same_padding

INT8, INT32, UINT8, FLOAT32 = 9, 2, 3, 0
RANGES = {INT8: (-128, 127), UINT8: (0, 255)}


def _op_names():
    import tflite

    return {v: k for k, v in vars(tflite.BuiltinOperator).items() if not k.startswith("_")}


class _Reader:
    def __init__(self, path: Path):
        import tflite

        self.tflite = tflite
        self.path = path
        try:
            buf = path.read_bytes()
            self.model = tflite.Model.GetRootAsModel(buf, 0)
            if self.model.SubgraphsLength() < 1:
                raise ValueError("no subgraph")
            self.sg = self.model.Subgraphs(0)
        except Exception as e:  # noqa: BLE001 - any parse failure: not a TFLite model
            raise ModelError(f"{path}: not a readable TFLite model ({type(e).__name__})") from None
        self.names = _op_names()

    def err(self, msg):
        return ModelError(f"{self.path}: {msg}")

    def tensor(self, i):
        return self.sg.Tensors(i)

    def shape(self, i):
        return tuple(int(v) for v in self.tensor(i).ShapeAsNumpy())

    def qparams(self, i, what=""):
        t = self.tensor(i)
        q = t.Quantization()
        if t.Type() not in RANGES or q is None or q.ScaleLength() != 1:
            raise self.err(f"tensor '{t.Name().decode()}'{what}: expected a per-tensor int8 activation")
        lo, hi = RANGES[t.Type()]
        return QParams(float(np.float32(q.Scale(0))), int(q.ZeroPoint(0)), lo, hi)

    def scales(self, i):
        return np.asarray(self.tensor(i).Quantization().ScaleAsNumpy(), dtype=np.float32)

    def data(self, i, dtype):
        t = self.tensor(i)
        raw = self.model.Buffers(t.Buffer()).DataAsNumpy()
        if isinstance(raw, int) or raw is None or len(raw) == 0:
            raise self.err(f"tensor '{t.Name().decode()}' has no constant data")
        return np.frombuffer(raw.tobytes(), dtype=dtype).reshape(self.shape(i)).astype(np.int64)

    def options(self, op, cls):
        o = getattr(self.tflite, cls)()
        bo = op.BuiltinOptions()
        o.Init(bo.Bytes, bo.Pos)
        return o


def _act_range(act: int, q: QParams, where) -> tuple[int, int]:
    """TFLite's CalculateActivationRangeQuantized."""

    def rnd(f):  # TfLiteRound: half away from zero, on float32
        v = np.float32(f) / np.float32(q.scale)
        return q.zero_point + int(np.sign(v) * np.floor(np.abs(v) + np.float32(0.5)))

    if act == 0:
        return q.lo, q.hi
    if act == 1:  # RELU
        return max(q.lo, rnd(0.0)), q.hi
    if act == 3:  # RELU6
        return max(q.lo, rnd(0.0)), min(q.hi, rnd(6.0))
    if act == 2:  # RELU_N1_TO_1
        return max(q.lo, rnd(-1.0)), min(q.hi, rnd(1.0))
    raise ModelError(f"{where}: fused activation {act} is not supported")


def _pads(padding: int, in_hw, k_hw, stride) -> tuple[int, int, int, int]:
    if padding == 1:  # VALID
        return (0, 0, 0, 0)
    t, b = same_padding(in_hw[0], k_hw[0], stride)
    left, r = same_padding(in_hw[1], k_hw[1], stride)
    return (left, r, t, b)


def _layer_name(r: _Reader, wi: int, taken: set, fallback: str) -> str:
    name = r.tensor(wi).Name().decode()
    parts = [p for p in name.split(";")[0].split("/") if p]
    if len(parts) >= 2 and parts[0] == "model":
        parts = parts[1:]
    return unique_name(parts[0] if parts else fallback, taken)


@dataclass
class _State:
    """What the operators converted so far have made: nodes, and per tensor its node, QParams and NCHW shape."""

    r: "_Reader"
    path: Path
    value: dict = field(default_factory=dict)  # tensor index -> node name ("input" for the graph input)
    qp: dict = field(default_factory=dict)
    shape_nchw: dict = field(default_factory=dict)
    nodes: list = field(default_factory=list)
    taken: set = field(default_factory=set)


def load_tflite(path: str | Path) -> QuantizedGraph:
    """The integer graph of an int8 TFLite model (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no such model file")
    r = _Reader(path)
    sg = r.sg
    if sg.InputsLength() != 1 or sg.OutputsLength() != 1:
        raise r.err("the model must have one input and one output")
    ops = [sg.Operators(i) for i in range(sg.OperatorsLength())]
    opname = [r.names.get(max(r.model.OperatorCodes(o.OpcodeIndex()).BuiltinCode(),
                              r.model.OperatorCodes(o.OpcodeIndex()).DeprecatedBuiltinCode()), "?") for o in ops]
    in_t = sg.Inputs(0)
    st = _State(r, path)
    first = 0
    if r.tensor(in_t).Type() == FLOAT32:
        if not ops or opname[0] != "QUANTIZE":
            raise r.err("a float input must be followed by QUANTIZE")
        in_t = ops[0].Outputs(0)
        first = 1
    q_in = r.qparams(in_t, " (model input)")
    if q_in.scale != 1.0:
        raise r.err(f"input scale {q_in.scale}: only inputs quantized at one step per pixel value are supported")
    n, h, w, c = r.shape(in_t)
    st.value[in_t], st.qp[in_t], st.shape_nchw[in_t] = "input", q_in, (c, h, w)
    last = len(ops)
    while last > first and opname[last - 1] in ("SOFTMAX", "DEQUANTIZE"):
        last -= 1
    for i in range(first, last):
        op, name = ops[i], opname[i]
        ins = [op.Inputs(j) for j in range(op.InputsLength())]
        out = op.Outputs(0)
        if ins and ins[0] not in st.value:
            raise r.err(f"operator {name} (#{i}) reads a tensor no supported operator produced")
        convert = OPERATORS.get(name)
        if convert is None:
            raise ModelError(f"{path}: operator {name} (#{i}): unsupported operator")
        convert(st, op, name, i, ins, out, f"{path}: operator {name} (#{i})")
    if not st.nodes or st.value.get(sg.Outputs(0)) is None and last == len(ops):
        raise r.err("the model's output is not produced by a supported operator")
    return QuantizedGraph(q_in, st.shape_nchw[in_t], st.nodes,
                          {"source": str(path), "quantization": "the model's own (TFLite)"}, pixel_offset=q_in.zero_point)


def _produced(st: _State, out: int, node) -> None:
    st.nodes.append(node)
    st.value[out], st.qp[out] = node.name, node.out


def _conv_geometry(st: _State, op, name: str, x: int, wq: np.ndarray, where: str):
    """(weight [F, C/groups, kh, kw], groups, stride, fused activation, pads, op kind) of a multiplying operator."""
    r = st.r
    if name == "CONV_2D":
        o = r.options(op, "Conv2DOptions")
        if o.DilationHFactor() != 1 or o.DilationWFactor() != 1 or o.StrideH() != o.StrideW():
            raise ModelError(f"{where}: dilation and unequal strides are not supported")
        weight, groups, stride, act = wq.transpose(0, 3, 1, 2), 1, o.StrideW(), o.FusedActivationFunction()
        return weight, groups, stride, act, _pads(o.Padding(), st.shape_nchw[x][1:], weight.shape[2:], stride), "conv"
    if name == "DEPTHWISE_CONV_2D":
        o = r.options(op, "DepthwiseConv2DOptions")
        if o.DilationHFactor() != 1 or o.DilationWFactor() != 1 or o.StrideH() != o.StrideW():
            raise ModelError(f"{where}: dilation and unequal strides are not supported")
        weight = wq[0].transpose(2, 0, 1)[:, None]  # [1, kh, kw, C*M] -> [C*M, 1, kh, kw]
        groups, stride, act = st.shape_nchw[x][0], o.StrideW(), o.FusedActivationFunction()
        return weight, groups, stride, act, _pads(o.Padding(), st.shape_nchw[x][1:], weight.shape[2:], stride), "conv"
    o = r.options(op, "FullyConnectedOptions")
    weight = wq[:, :, None, None]
    feat = st.shape_nchw[x]
    if len(feat) == 3:  # flattened NHWC: reorder the columns to maxdnn's NCHW flattening
        cc, hh, ww = feat
        idx = np.arange(cc * hh * ww).reshape(hh, ww, cc).transpose(2, 0, 1).reshape(-1)
        weight = weight[:, idx]
    if weight.shape[1] != int(np.prod(feat)):
        raise ModelError(f"{where}: weights expect {weight.shape[1]} inputs, the input has {int(np.prod(feat))}")
    return weight, 1, 1, o.FusedActivationFunction(), (0, 0, 0, 0), "linear"


def _multiplying(st: _State, op, name: str, i: int, ins: list, out: int, where: str) -> None:
    r = st.r
    x, wi = ins[0], ins[1]
    bias = r.data(ins[2], np.int32) if len(ins) > 2 and ins[2] >= 0 else None
    q_x, q_y = st.qp[x], r.qparams(out)
    if r.tensor(wi).Type() != INT8:
        raise ModelError(f"{where}: weights must be int8")
    wq = r.data(wi, np.int8)
    s_w = r.scales(wi)
    weight, groups, stride, act, pads, op_kind = _conv_geometry(st, op, name, x, wq, where)
    f = weight.shape[0]
    s_w = np.broadcast_to(s_w, (f,)).astype(np.float32)
    real = [float(np.float32(q_x.scale)) * float(sw) / float(np.float32(q_y.scale)) for sw in s_w]
    lo, hi = _act_range(act, q_y, where)
    in_hw = (1, 1) if op_kind == "linear" else st.shape_nchw[x][1:]
    layer = MulLayer(_layer_name(r, wi, st.taken, f"layer{i}"), [st.value[x]], QParams(q_y.scale, q_y.zero_point, lo, hi),
                     op=op_kind, weight=np.ascontiguousarray(weight), bias=np.zeros(f, np.int64) if bias is None else bias,
                     w_scale=s_w.astype(np.float64),
                     requant=Requant.tflite(real, "tflite-single" if op_kind == "linear" else "tflite"), in_q=q_x,
                     stride=int(stride), pads=tuple(int(p) for p in pads), groups=int(groups), in_hw=tuple(in_hw))
    ho, wo = layer.out_hw if op_kind == "conv" else (1, 1)
    st.shape_nchw[out] = (f, ho, wo) if op_kind == "conv" else (f,)
    _produced(st, out, layer)


def _add(st: _State, op, name: str, i: int, ins: list, out: int, where: str) -> None:
    if len(ins) != 2 or ins[1] not in st.value:
        raise ModelError(f"{where}: only additions of two activations are supported")
    if st.shape_nchw[ins[0]] != st.shape_nchw[ins[1]]:
        raise ModelError(f"{where}: broadcasting additions are not supported")
    q1, q2, q_y = st.qp[ins[0]], st.qp[ins[1]], st.r.qparams(out)
    o = st.r.options(op, "AddOptions")
    twice = 2.0 * max(q1.scale, q2.scale)
    rq = [Requant.tflite([q1.scale / twice]), Requant.tflite([q2.scale / twice])]
    out_rq = Requant.tflite([twice / ((1 << 20) * q_y.scale)])
    lo, hi = _act_range(o.FusedActivationFunction(), q_y, where)
    st.shape_nchw[out] = st.shape_nchw[ins[0]]
    _produced(st, out, TfliteAdd(f"add{i}", [st.value[ins[0]], st.value[ins[1]]],
                                 QParams(q_y.scale, q_y.zero_point, lo, hi), in_zps=[q1.zero_point, q2.zero_point],
                                 requants=rq, left_shift=20, out_requant=out_rq))


def _pool(st: _State, op, name: str, i: int, ins: list, out: int, where: str) -> None:
    o = st.r.options(op, "Pool2DOptions")
    q_x, q_y = st.qp[ins[0]], st.r.qparams(out)
    if (q_x.scale, q_x.zero_point) != (q_y.scale, q_y.zero_point):
        raise ModelError(f"{where}: input and output quantization differ")
    if o.StrideH() != o.StrideW():
        raise ModelError(f"{where}: unequal strides are not supported")
    k = (o.FilterHeight(), o.FilterWidth())
    c_, h_, w_ = st.shape_nchw[ins[0]]
    pads = _pads(o.Padding(), (h_, w_), k, o.StrideW())
    lo, hi = _act_range(o.FusedActivationFunction(), q_y, where)
    st.shape_nchw[out] = (c_,) + conv_out_hw((h_, w_), k, o.StrideW(), pads)
    _produced(st, out, Pool(f"pool{i}", [st.value[ins[0]]], QParams(q_y.scale, q_y.zero_point, lo, hi),
                            op="avg" if name == "AVERAGE_POOL_2D" else "max", kernel=k, stride=o.StrideW(),
                            pads=pads, count_include_pad=False, rounding="tflite"))


def _reshape(st: _State, op, name: str, i: int, ins: list, out: int, where: str) -> None:
    if len(st.r.shape(out)) != 2:
        raise ModelError(f"{where}: only reshapes to [batch, features] are supported")
    q_x = st.qp[ins[0]]
    _produced(st, out, Flatten(f"flatten{i}", [st.value[ins[0]]], q_x))
    st.shape_nchw[out] = st.shape_nchw[ins[0]]  # kept unflattened: a following FC reorders its columns


OPERATORS = {"CONV_2D": _multiplying, "DEPTHWISE_CONV_2D": _multiplying, "FULLY_CONNECTED": _multiplying,
             "ADD": _add, "AVERAGE_POOL_2D": _pool, "MAX_POOL_2D": _pool, "RESHAPE": _reshape}
