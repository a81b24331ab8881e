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
    value: dict[int, str] = {}  # tensor index -> node name ("input" for the graph input)
    qp: dict[int, QParams] = {}
    shape_nchw: dict[int, tuple] = {}
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
    value[in_t], qp[in_t], shape_nchw[in_t] = "input", q_in, (c, h, w)
    nodes = []
    taken: set = set()
    last = len(ops)
    while last > first and opname[last - 1] in ("SOFTMAX", "DEQUANTIZE"):
        last -= 1
    for i in range(first, last):
        op, name = ops[i], opname[i]
        where = f"{path}: operator {name} (#{i})"
        ins = [op.Inputs(j) for j in range(op.InputsLength())]
        out = op.Outputs(0)
        if ins and ins[0] not in value:
            raise r.err(f"operator {name} (#{i}) reads a tensor no supported operator produced")
        if name in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
            x, wi = ins[0], ins[1]
            bias = r.data(ins[2], np.int32) if len(ins) > 2 and ins[2] >= 0 else None
            q_x, q_y = qp[x], r.qparams(out)
            if r.tensor(wi).Type() != INT8:
                raise ModelError(f"{where}: weights must be int8")
            wq = r.data(wi, np.int8)
            s_w = r.scales(wi)
            if name == "CONV_2D":
                o = r.options(op, "Conv2DOptions")
                if o.DilationHFactor() != 1 or o.DilationWFactor() != 1 or o.StrideH() != o.StrideW():
                    raise ModelError(f"{where}: dilation and unequal strides are not supported")
                weight, groups, stride, act = wq.transpose(0, 3, 1, 2), 1, o.StrideW(), o.FusedActivationFunction()
                pads = _pads(o.Padding(), shape_nchw[x][1:], weight.shape[2:], stride)
                op_kind = "conv"
            elif name == "DEPTHWISE_CONV_2D":
                o = r.options(op, "DepthwiseConv2DOptions")
                if o.DilationHFactor() != 1 or o.DilationWFactor() != 1 or o.StrideH() != o.StrideW():
                    raise ModelError(f"{where}: dilation and unequal strides are not supported")
                weight = wq[0].transpose(2, 0, 1)[:, None]  # [1, kh, kw, C*M] -> [C*M, 1, kh, kw]
                groups, stride, act = shape_nchw[x][0], o.StrideW(), o.FusedActivationFunction()
                pads = _pads(o.Padding(), shape_nchw[x][1:], weight.shape[2:], stride)
                op_kind = "conv"
            else:
                o = r.options(op, "FullyConnectedOptions")
                act, stride, groups, pads = o.FusedActivationFunction(), 1, 1, (0, 0, 0, 0)
                weight = wq[:, :, None, None]
                op_kind = "linear"
                feat = shape_nchw[x]
                if len(feat) == 3:  # flattened NHWC: reorder the columns to maxdnn's NCHW flattening
                    cc, hh, ww = feat
                    idx = np.arange(cc * hh * ww).reshape(hh, ww, cc).transpose(2, 0, 1).reshape(-1)
                    weight = weight[:, idx]
                if weight.shape[1] != int(np.prod(feat)):
                    raise ModelError(f"{where}: weights expect {weight.shape[1]} inputs, the input has {int(np.prod(feat))}")
            f = weight.shape[0]
            s_w = np.broadcast_to(s_w, (f,)).astype(np.float32)
            real = [float(np.float32(q_x.scale)) * float(sw) / float(np.float32(q_y.scale)) for sw in s_w]
            lo, hi = _act_range(act, q_y, where)
            in_hw = (1, 1) if op_kind == "linear" else shape_nchw[x][1:]
            layer = MulLayer(_layer_name(r, wi, taken, f"layer{i}"), [value[x]], QParams(q_y.scale, q_y.zero_point, lo, hi),
                             op=op_kind, weight=np.ascontiguousarray(weight), bias=np.zeros(f, np.int64) if bias is None else bias,
                             w_scale=s_w.astype(np.float64),
                             requant=Requant.tflite(real, "tflite-single" if op_kind == "linear" else "tflite"), in_q=q_x, stride=int(stride),
                             pads=tuple(int(p) for p in pads), groups=int(groups), in_hw=tuple(in_hw))
            nodes.append(layer)
            ho, wo = layer.out_hw if op_kind == "conv" else (1, 1)
            shape_nchw[out] = (f, ho, wo) if op_kind == "conv" else (f,)
        elif name == "ADD":
            if len(ins) != 2 or ins[1] not in value:
                raise ModelError(f"{where}: only additions of two activations are supported")
            if shape_nchw[ins[0]] != shape_nchw[ins[1]]:
                raise ModelError(f"{where}: broadcasting additions are not supported")
            q1, q2, q_y = qp[ins[0]], qp[ins[1]], r.qparams(out)
            o = r.options(op, "AddOptions")
            twice = 2.0 * max(q1.scale, q2.scale)
            rq = [Requant.tflite([q1.scale / twice]), Requant.tflite([q2.scale / twice])]
            out_rq = Requant.tflite([twice / ((1 << 20) * q_y.scale)])
            lo, hi = _act_range(o.FusedActivationFunction(), q_y, where)
            nodes.append(TfliteAdd(f"add{i}", [value[ins[0]], value[ins[1]]], QParams(q_y.scale, q_y.zero_point, lo, hi),
                                   in_zps=[q1.zero_point, q2.zero_point], requants=rq, left_shift=20, out_requant=out_rq))
            shape_nchw[out] = shape_nchw[ins[0]]
        elif name in ("AVERAGE_POOL_2D", "MAX_POOL_2D"):
            o = r.options(op, "Pool2DOptions")
            q_x, q_y = qp[ins[0]], r.qparams(out)
            if (q_x.scale, q_x.zero_point) != (q_y.scale, q_y.zero_point):
                raise ModelError(f"{where}: input and output quantization differ")
            if o.StrideH() != o.StrideW():
                raise ModelError(f"{where}: unequal strides are not supported")
            k = (o.FilterHeight(), o.FilterWidth())
            c_, h_, w_ = shape_nchw[ins[0]]
            pads = _pads(o.Padding(), (h_, w_), k, o.StrideW())
            lo, hi = _act_range(o.FusedActivationFunction(), q_y, where)
            node = Pool(f"pool{i}", [value[ins[0]]], QParams(q_y.scale, q_y.zero_point, lo, hi),
                        op="avg" if name == "AVERAGE_POOL_2D" else "max", kernel=k, stride=o.StrideW(),
                        pads=pads, count_include_pad=False, rounding="tflite")
            nodes.append(node)
            shape_nchw[out] = (c_,) + conv_out_hw((h_, w_), k, o.StrideW(), pads)
        elif name == "RESHAPE":
            tgt = r.shape(out)
            if len(tgt) != 2:
                raise ModelError(f"{where}: only reshapes to [batch, features] are supported")
            q_x = qp[ins[0]]
            nodes.append(Flatten(f"flatten{i}", [value[ins[0]]], q_x))
            qp[out], value[out] = q_x, nodes[-1].name
            shape_nchw[out] = shape_nchw[ins[0]]  # kept unflattened: a following FC reorders its columns
            continue
        else:
            raise ModelError(f"{where}: unsupported operator")
        value[out], qp[out] = nodes[-1].name, nodes[-1].out
    if not nodes or value.get(sg.Outputs(0)) is None and last == len(ops):
        raise r.err("the model's output is not produced by a supported operator")
    return QuantizedGraph(q_in, shape_nchw[in_t], nodes, {"source": str(path), "quantization": "the model's own (TFLite)"},
                          pixel_offset=q_in.zero_point)
