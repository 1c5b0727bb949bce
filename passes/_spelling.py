"""Pieces the normalize-* passes share: operands that are an attribute at one opset and an input
at another (axes, pads), read as integer lists, and dtype tests."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxrep.graph import GraphView


class NotConstant(str):
    """The reason an operand that must be a constant is not one (a str, so it reads as a reason)."""


def int_operand(node: gs.Node, attr: str, index: int, view: GraphView) -> list[int] | None | NotConstant:
    """An integer list given as attribute ``attr`` (older opsets) or as input ``index`` (newer ones):
    the values, None when neither is given, or a :class:`NotConstant` reason."""
    if attr in node.attrs:
        return [int(v) for v in np.ravel(node.attrs[attr])]
    if len(node.inputs) > index and node.inputs[index] is not None and node.inputs[index].name:
        value = view.constant(node.inputs[index])
        if value is None:
            return NotConstant(f"{node.op} '{node.name}' input '{node.inputs[index].name}' is not a constant")
        return [int(v) for v in np.ravel(value)]
    return None


def is_float(dtype) -> bool:
    return dtype is not None and (np.dtype(dtype).kind == "f" or str(dtype) == "bfloat16")


def normalize_axes(axes: list[int], rank: int | None) -> list[int] | None:
    """``axes`` made non-negative for a tensor of ``rank`` dims; None when an axis is negative and
    the rank is unknown, or an axis is out of range."""
    out = []
    for a in axes:
        if a < 0:
            if rank is None:
                return None
            a += rank
        if a < 0 or (rank is not None and a >= rank):
            return None
        out.append(a)
    return out
