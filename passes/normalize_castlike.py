"""Normalize CastLike: ``CastLike(c, x)`` with a constant ``c`` and ``x`` of known element type
becomes a constant of that type.

The dynamo exporter with ``optimize=False`` gives a bias-free conv a computed zero bias,
``Expand(CastLike(0, x), shape)``: ``x`` is the conv's data input, so nothing downstream is a
constant and every fold declines the conv (``constant_weights``). A CastLike reads only the
*type* of ``x``, never its values: with ``c`` constant it is the constant ``Cast(c, to=type(x))``,
and constant-fold then folds the Expand.

Evaluation. The constant is computed by onnxruntime (the runtime the model is verified and
deployed in), from a model holding the CastLike node itself with ``c`` and an empty tensor of
``x``'s type as initializers, at the model's opsets: bit for bit the runtime's cast (rounding,
``saturate``), not numpy's.

Conditions (checked in this order):
  1. ``known_dtype``   the element type of ``x`` is known (declared or inferred).
  2. ``graph_output``  the CastLike's result is not a graph output (its producer stays).
  3. ``evaluates``     onnxruntime computes the cast (the reason quotes the first line of its error).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from onnxrep import ops
from onnxrep.equivalence import reference_session
from onnxrep.errors import first_line
from onnxrep.graph import GraphView
from onnxrep.rewrite import Context, Decline, Match, Plan, run_checks

from . import register
from ._common import is_op
from .constant_fold import _read, runtime_ir_version


def _target_dtype(node: gs.Node, ctx: Context) -> np.dtype | None:
    return ctx.dtype(node.inputs[1])


def _check_dtype(node: gs.Node, view: GraphView, ctx: Context) -> str | None:
    if _target_dtype(node, ctx) is None:
        return f"the element type of '{node.inputs[1].name}' is not known"
    return None


def _check_output(node: gs.Node, view: GraphView, ctx: Context) -> str | None:
    if view.escapes(node.outputs[0]):
        return f"tensor '{node.outputs[0].name}' is a graph output"
    return None


def _evaluate(node: gs.Node, view: GraphView, ctx: Context) -> np.ndarray | str:
    """The runtime's value of the CastLike, or the first line of its error."""
    source, like = node.inputs[0], node.inputs[1]
    try:
        elem = helper.np_dtype_to_tensor_dtype(_target_dtype(node, ctx))
        empty = onnx.TensorProto(name=like.name, data_type=elem, dims=[0])
        value = numpy_helper.from_array(np.asarray(view.constant(source)), source.name)
        proto = OnnxExporter.export_node(node)
        out = helper.make_value_info(node.outputs[0].name, onnx.TypeProto())
        graph = helper.make_graph([proto], "castlike", [], [out], [value, empty])
        model = helper.make_model(graph, opset_imports=list(ctx.opsets))
        model.ir_version = max(runtime_ir_version(), 3)
        result = reference_session(model).run_with_ort_values(None, {})[0]
        return _read(result)
    except Exception as exc:  # noqa: BLE001 - any failure declines the candidate with its message
        return first_line(exc)


def _check_evaluates(node: gs.Node, view: GraphView, ctx: Context) -> str | None:
    value = _evaluate(node, view, ctx)
    return f"onnxruntime cannot compute it: {value}" if isinstance(value, str) else None


CONDITIONS = [
    ("known_dtype", _check_dtype),
    ("graph_output", _check_output),
    ("evaluates", _check_evaluates),
]


@register
class NormalizeCastLike:
    name = "normalize-castlike"
    summary = "CastLike(constant, x) with x of known type -> a constant of that type"

    def match(self, view: GraphView, ctx: Context):
        for node in view.graph.nodes:
            if is_op(node, ops.CAST_LIKE) and len(node.inputs) == 2 and view.is_constant(node.inputs[0]):
                yield Match(node.outputs[0].name, [node], node)

    def check(self, match: Match, view: GraphView, ctx: Context) -> Decline | None:
        return run_checks(CONDITIONS, match.data, view, ctx)

    def rewrite(self, match: Match, view: GraphView, ctx: Context) -> Plan:
        node: gs.Node = match.data
        value = _evaluate(node, view, ctx)
        return Plan(node.outputs[0], [], f"CastLike -> constant {value.dtype} {list(value.shape)}", constant=value)
