"""Kernels onnxruntime runs a model as: the node count of its own optimized graph.

onnxruntime (CPU execution provider, ``ORT_ENABLE_ALL``, the level a deployment uses) fuses
decompositions (GELU, LayerNorm, Conv + activation, MatMul + Add, ...) into single kernels and
inserts layout conversions (NCHWc reorders) around the kernels that need them; it can save the
graph it runs (``SessionOptions.optimized_model_filepath``). Every node of that graph is one kernel
launch. The engine compares this count for its input and its output (:func:`count_kernels`): a
run that would end with more kernels than its input broke a fusion that the catalogue of
:mod:`passes._fusions` does not know of, and is repeated with the rewrites responsible left out
(condition ``kernel_count``).

Limit. Building a session costs about 1 s per 40 MB of weights on a small CPU; the count is taken
only for models of at most :data:`MAX_WEIGHT_BYTES` of initializer data and :data:`MAX_NODES`
nodes (subgraphs included). Beyond that, or where onnxruntime cannot build a session (custom
ops, an opset it lacks), the check is not made and the report says why.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field

import onnx

from . import io, ops

#: Initializer bytes (inline, external, lazy, Constant nodes) above which no session is built.
MAX_WEIGHT_BYTES = 64 << 20
#: Nodes (subgraphs included) above which no session is built.
MAX_NODES = 5000


@dataclass
class KernelCount:
    """onnxruntime's optimized graph of a model: its node count and op histogram (``domain:op``),
    or ``count`` None and ``reason`` why it was not taken."""

    count: int | None
    ops: dict[str, int] = field(default_factory=dict)
    reason: str = ""

    @property
    def taken(self) -> bool:
        return self.count is not None


def _graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _graphs(g)


def size(model: onnx.ModelProto) -> tuple[int, int]:
    """``(weight bytes, nodes)`` of ``model``, subgraphs included (what :data:`MAX_WEIGHT_BYTES`
    and :data:`MAX_NODES` bound)."""
    return io.tensor_bytes(model), sum(len(g.node) for g in _graphs(model.graph))


#: Ops whose CPU kernels onnxruntime registers with ``Alias(0, 0)``: the output is the input's
#: buffer under another shape, no data is moved (onnxruntime/core/providers/cpu/tensor/reshape.cc,
#: squeeze.cc, unsqueeze.cc, flatten.cc, and cpu/nn/identity_op.cc). They are in the histogram but
#: not counted as kernels: a fold that makes onnxruntime wrap a rank-3 MatMul + Add in two Reshapes
#: around one Gemm runs no more kernels for it.
ALIAS_OPS = frozenset({ops.RESHAPE, ops.FLATTEN, ops.SQUEEZE, ops.UNSQUEEZE, ops.IDENTITY})


def _histogram(model: onnx.ModelProto) -> tuple[int, dict[str, int]]:
    histogram: dict[str, int] = {}
    count = 0
    for g in _graphs(model.graph):
        for node in g.node:
            key = f"{node.domain}:{node.op_type}" if node.domain else node.op_type
            histogram[key] = histogram.get(key, 0) + 1
            count += not (node.domain in ops.DEFAULT_DOMAINS and node.op_type in ALIAS_OPS)
    return count, dict(sorted(histogram.items()))


def optimized_graph(model: onnx.ModelProto, folder: str | os.PathLike) -> onnx.ModelProto:
    """onnxruntime's optimized graph of ``model`` (CPU, ``ORT_ENABLE_ALL``), saved in ``folder``
    and loaded back. Raises what onnxruntime raises."""
    import onnxruntime as ort

    path = os.path.join(os.fspath(folder), "optimized.onnx")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = path
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # its warning that an NCHWc graph is specific to this machine
    ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return onnx.load(path, load_external_data=False)


def count_kernels(model: onnx.ModelProto, max_weight_bytes: int = MAX_WEIGHT_BYTES, max_nodes: int = MAX_NODES) -> KernelCount:
    """The node count of onnxruntime's optimized graph of ``model`` (not modified), or why not."""
    weights, nodes = size(model)
    if weights > max_weight_bytes:
        return KernelCount(None, reason=f"{weights} bytes of weights, more than the {max_weight_bytes} the check builds a session for")
    if nodes > max_nodes:
        return KernelCount(None, reason=f"{nodes} nodes, more than the {max_nodes} the check builds a session for")
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    try:
        io.materialize(copy)  # lazy initializers read in
    except Exception as exc:  # noqa: BLE001 - the check is skipped with the error
        return KernelCount(None, reason=f"its weights cannot be read: {_first_line(exc)}")
    if io.uses_external_data(copy):
        return KernelCount(None, reason="its weights are in external files the check does not read")
    try:
        with tempfile.TemporaryDirectory(prefix="onnxrep-kernels-") as folder:
            graph = optimized_graph(copy, folder)
    except Exception as exc:  # noqa: BLE001
        return KernelCount(None, reason=f"onnxruntime cannot build a session: {_first_line(exc)}")
    count, histogram = _histogram(graph)
    return KernelCount(count, histogram)


def _first_line(exc: BaseException) -> str:
    from .errors import first_line

    return first_line(exc)
