"""Shapes and cost of a model: inferred shapes, multiply-accumulates and weight counts."""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import onnx
import numpy as np
from onnx import helper, shape_inference

from . import ops
from .io import skeleton

def infer_shapes(model: onnx.ModelProto) -> dict[str, tuple]:
    """Shapes of every tensor that onnx can infer: ints, strings for symbolic dims, None unknown."""
    return infer(model)[0]


def infer(model: onnx.ModelProto) -> tuple[dict[str, tuple], dict[str, np.dtype]]:
    """Shapes (as :func:`infer_shapes`) and element types of every tensor onnx can infer."""
    try:
        inferred = shape_inference.infer_shapes(skeleton(model), strict_mode=False, data_prop=True)
    except Exception:  # shape inference is advisory: an op it does not know leaves shapes unknown
        inferred = skeleton(model)
    shapes: dict[str, tuple] = {}
    dtypes: dict[str, np.dtype] = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        t = vi.type.tensor_type
        if t.elem_type:
            try:
                dtypes[vi.name] = helper.tensor_dtype_to_np_dtype(t.elem_type)
            except Exception:  # noqa: BLE001 - a type numpy cannot hold: leave it unknown
                pass
        if not t.HasField("shape"):
            continue
        shapes[vi.name] = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim
        )
    for init in model.graph.initializer:
        shapes[init.name] = tuple(init.dims)
    return shapes, dtypes


@dataclass
class Cost:
    """Multiply-accumulates of one inference (symbolic dims counted as 1) and weight elements."""

    macs: int
    params: int
    exact: bool  # False when some shape was symbolic or unknown

    def to_dict(self) -> dict:
        return {"macs": self.macs, "params": self.params, "macs_exact": self.exact}


def _dims(shape) -> tuple[int, bool]:
    if shape is None:
        return 0, False
    exact = all(isinstance(d, int) and d > 0 for d in shape)
    return prod(d if isinstance(d, int) and d > 0 else 1 for d in shape), exact


def model_cost(model: onnx.ModelProto, shapes: dict[str, tuple] | None = None) -> Cost:
    """MACs of Conv, ConvTranspose, Gemm and MatMul nodes, and the element count of float weights."""
    shapes = infer_shapes(model) if shapes is None else shapes
    init_dims = {i.name: tuple(i.dims) for i in model.graph.initializer}
    macs, exact = 0, True
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type in (ops.CONV, "ConvTranspose") and len(node.input) > 1:
            # Conv: every output element reads Cin/g * prod(k) inputs. ConvTranspose: every input
            # element is scattered to Cout/g * prod(k) outputs. Both are prod(W.shape[1:]).
            w = shapes.get(node.input[1]) or init_dims.get(node.input[1])
            src = node.output[0] if node.op_type == ops.CONV else node.input[0]
            n, ok = _dims(shapes.get(src))
            if w is None or not n:
                exact = False
                continue
            macs += n * prod(w[1:])
            exact &= ok
        elif node.op_type in (ops.GEMM, ops.MATMUL) and len(node.input) > 1:
            a, b = shapes.get(node.input[0]), shapes.get(node.input[1])
            out_n, ok = _dims(shapes.get(node.output[0]))
            if a is None or b is None or not out_n or not a:
                exact = False
                continue
            trans_a = node.op_type == ops.GEMM and any(at.name == "transA" and at.i for at in node.attribute)
            k = a[0] if trans_a else a[-1]
            macs += int(out_n * (k if isinstance(k, int) else 1))
            exact &= ok and isinstance(k, int)
    params = sum(prod(i.dims) for i in model.graph.initializer if i.data_type in _FLOAT_TYPES)
    return Cost(macs, params, exact)


_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.DOUBLE,
}
