"""Hand-built ONNX graphs and a direct numpy convolution for the tests."""

from __future__ import annotations

import os
from itertools import product

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper


def examples(n: int) -> int:
    """Hypothesis examples for a property test: ``n`` in CI, times ``ONNXREP_FUZZ_SCALE`` when set
    (``benchmarks/fuzz.py`` runs the property tests that way, 10,000 cases and more)."""
    return max(1, int(n * float(os.environ.get("ONNXREP_FUZZ_SCALE", "1"))))


def conv_ref(x, w, b=None, strides=None, pads=None, dilations=None, groups=1):
    """Direct N-d convolution with ONNX Conv semantics (zero padding, groups, dilation), float64."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    r = x.ndim - 2
    strides = strides or (1,) * r
    dilations = dilations or (1,) * r
    pads = pads or (0,) * (2 * r)
    xp = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + r]) for i in range(r)])
    cout, cin_g = w.shape[:2]
    k = w.shape[2:]
    out = [(xp.shape[2 + i] - dilations[i] * (k[i] - 1) - 1) // strides[i] + 1 for i in range(r)]
    y = np.zeros((x.shape[0], cout, *out))
    cout_g = cout // groups
    for g in range(groups):
        xs = xp[:, g * cin_g : (g + 1) * cin_g]
        ws = w[g * cout_g : (g + 1) * cout_g]
        for offs in product(*[range(kk) for kk in k]):
            sl = tuple(
                slice(o * d, o * d + s * (n - 1) + 1, s) for o, d, s, n in zip(offs, dilations, strides, out)
            )
            patch = xs[(slice(None), slice(None)) + sl]
            y[:, g * cout_g : (g + 1) * cout_g] += np.einsum("nc...,oc->no...", patch, ws[(slice(None), slice(None)) + offs])
    if b is not None:
        y += np.asarray(b, np.float64).reshape((1, -1) + (1,) * r)
    return y


def run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    """Run in onnxruntime on the CPU with its graph optimizations disabled."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def count(model: onnx.ModelProto, op: str) -> int:
    return sum(1 for n in model.graph.node if n.op_type == op)


def histogram(model: onnx.ModelProto) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in model.graph.node:
        out[n.op_type] = out.get(n.op_type, 0) + 1
    return out


class Builder:
    """Builds a float graph with one input ``x`` of shape (N, C, *spatial) step by step."""

    def __init__(self, channels=4, spatial=(8, 8), batch=1, seed=0, dtype=np.float32, opset=17, input_shape=None):
        self.rng = np.random.default_rng(seed)
        self.dtype = np.dtype(dtype)
        self.elem = helper.np_dtype_to_tensor_dtype(self.dtype)
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        shape = input_shape if input_shape is not None else [batch, channels, *spatial]
        self.inputs = [helper.make_tensor_value_info("x", self.elem, shape)]
        self.channels = channels
        self.spatial = tuple(spatial)
        self._n = 0

    def name(self, base: str) -> str:
        self._n += 1
        return f"{base}{self._n}"

    def const(self, values, base="c") -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(values).astype(self.dtype), name))
        return name

    def const_int(self, values, base="i") -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(values, np.int64), name))
        return name

    def node(self, op, inputs, n_out=1, **attrs) -> str:
        outs = [self.name(op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.name(op + "_node"), **attrs))
        return outs[0]

    def weight(self, cout, cin_g, kernel):
        kernel = (kernel,) * 2 if isinstance(kernel, int) else tuple(kernel)
        return self.rng.standard_normal((cout, cin_g, *kernel)) / np.sqrt(cin_g * np.prod(kernel))

    def conv(self, x, cin, cout, kernel=3, stride=1, pads=None, dilation=1, groups=1, bias=True, w=None, **attrs):
        kernel = (kernel,) * 2 if isinstance(kernel, int) else tuple(kernel)
        r = len(kernel)
        w = self.weight(cout, cin // groups, kernel) if w is None else w
        inputs = [x, self.const(w, "w")]
        if bias:
            inputs.append(self.const(self.rng.standard_normal(cout) * 0.1, "b"))
        if pads is None and "auto_pad" not in attrs:
            pads = [dilation * (k - 1) // 2 for k in kernel] * 2
        if pads is not None:
            attrs["pads"] = list(pads)
        stride = (stride,) * r if isinstance(stride, int) else tuple(stride)
        dilation = (dilation,) * r if isinstance(dilation, int) else tuple(dilation)
        return self.node("Conv", inputs, kernel_shape=list(kernel), strides=list(stride), dilations=list(dilation), group=groups, **attrs)

    def bn_params(self, c):
        return [
            self.rng.uniform(0.5, 1.5, c),
            self.rng.standard_normal(c) * 0.1,
            self.rng.standard_normal(c) * 0.1,
            self.rng.uniform(0.5, 2.0, c),
        ]

    def bn(self, x, c, **attrs):
        return self.node("BatchNormalization", [x] + [self.const(p, "bn") for p in self.bn_params(c)], epsilon=1e-5, **attrs)

    def avgpool(self, x, kernel=3, stride=1, pads=None, count_include_pad=1, **attrs):
        kernel = (kernel,) * 2 if isinstance(kernel, int) else tuple(kernel)
        pads = [(k - 1) // 2 for k in kernel] * 2 if pads is None else list(pads)
        return self.node(
            "AveragePool", [x], kernel_shape=list(kernel), strides=[stride] * len(kernel), pads=pads,
            count_include_pad=count_include_pad, **attrs,
        )

    def add(self, a, b):
        return self.node("Add", [a, b])

    def sub(self, a, b):
        return self.node("Sub", [a, b])

    def mul_const(self, x, values):
        return self.node("Mul", [x, self.const(values, "s")])

    def sum(self, terms):
        acc = terms[0]
        for t in terms[1:]:
            acc = self.add(acc, t)
        return acc

    def relu(self, x):
        return self.node("Relu", [x])

    def model(self, *outputs, output_shapes=None) -> onnx.ModelProto:
        outs = [
            helper.make_tensor_value_info(o, self.elem, None if output_shapes is None else output_shapes[i])
            for i, o in enumerate(outputs)
        ]
        graph = helper.make_graph(self.nodes, "test", self.inputs, outs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = 8
        if output_shapes is None:  # take the output shapes that onnx infers
            inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(model).graph.output}
            for out in model.graph.output:
                if inferred[out.name].type.tensor_type.HasField("shape"):
                    out.CopyFrom(inferred[out.name])
        onnx.checker.check_model(model)
        return model

    def feeds(self, seed=1, shape=None):
        rng = np.random.default_rng(seed)
        dims = shape or [d.dim_value or 2 for d in self.inputs[0].type.tensor_type.shape.dim]
        return {"x": rng.standard_normal(dims).astype(self.dtype)}

