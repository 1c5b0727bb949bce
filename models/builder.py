"""A small ONNX graph builder with deterministic random weights, and the numpy branch fusion that
the re-parameterizable model families use in their own ``switch_to_deploy``.

Nothing here imports onnxrep: the deploy forms built with :func:`multi_branch` are derived
independently of onnxrep's algebra, so that they can serve as a reference for it.

Weights are float32 and drawn from one ``numpy.random.Generator``. The random draws of a block do
not depend on whether its training or deploy form is emitted, so the two forms of a model built
with the same seed hold the same parameters.

Initialization keeps activations O(1) through deep nets: conv weights are He-initialized
(``std = sqrt(2 / fan_in)``) and scaled by ``1 / sqrt(branches)`` for a sum of ``branches``
summands; BatchNormalization gets random running statistics (``var`` in [0.5, 1.5], small means)
and ``gamma = sqrt(var + eps) * u`` with ``u`` in [0.6, 1.2] (times ``bn_scale``), so that its
effective per-channel gain is near ``bn_scale`` while every parameter stays non-trivial.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
F32 = np.float32


@dataclass
class BNParams:
    """Inference-mode BatchNormalization parameters: ``gamma * (x - mean) / sqrt(var + eps) + beta``."""

    gamma: np.ndarray
    beta: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    eps: float = 1e-5


# --------------------------------------------------------------------------------------------
# Fusion (numpy, float64), as in RepVGG / MobileOne / RepLKNet ``switch_to_deploy``
# --------------------------------------------------------------------------------------------


def fuse_bn(kernel: np.ndarray, bn: BNParams) -> tuple[np.ndarray, np.ndarray]:
    """``BN(conv(x; kernel))`` (conv without bias) as ``conv(x; kernel * t, beta - mean * t)`` with
    ``t = gamma / sqrt(var + eps)``; computed in float64."""
    std = np.sqrt(bn.var.astype(np.float64) + bn.eps)
    t = bn.gamma.astype(np.float64) / std
    k = kernel.astype(np.float64) * t.reshape(-1, 1, 1, 1)
    return k, bn.beta.astype(np.float64) - bn.mean.astype(np.float64) * t


def pad_center(kernel: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad a square ``k x k`` kernel to ``size x size``, centred (``F.pad`` by ``(size - k) // 2``)."""
    k = kernel.shape[-1]
    if k == size:
        return kernel
    p = (size - k) // 2
    return np.pad(kernel, ((0, 0), (0, 0), (p, p), (p, p)))


def identity_kernel(channels: int, groups: int, size: int = 1) -> np.ndarray:
    """The ``size x size`` kernel of a conv with ``groups`` groups that copies its input (float64)."""
    per_group = channels // groups
    k = np.zeros((channels, per_group, size, size), np.float64)
    c = size // 2
    for i in range(channels):
        k[i, i % per_group, c, c] = 1.0
    return k


# --------------------------------------------------------------------------------------------
# Graph builder
# --------------------------------------------------------------------------------------------


class GraphBuilder:
    """Collects nodes and initializers; every ``add_*`` method returns the output tensor name."""

    @classmethod
    def for_form(cls, family: str, deploy: bool, seed: int) -> "GraphBuilder":
        """A builder named after the family and form (``<family>_train`` / ``<family>_deploy``)."""
        return cls(seed, family + ("_deploy" if deploy else "_train"))

    def __init__(self, seed: int = 0, name: str = "model"):
        self.rng = np.random.default_rng(seed)
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._names: set[str] = set()

    # -- names and constants ---------------------------------------------------------------

    def unique(self, base: str) -> str:
        name, i = base, 0
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name

    def constant(self, name: str, values: np.ndarray, dtype=F32) -> str:
        name = self.unique(name)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(values, dtype=dtype), name))
        return name

    def _node(self, op: str, name: str, inputs: Sequence[str], **attrs) -> str:
        node_name = self.unique(name)
        out = self.unique(f"{node_name}:0")
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=node_name, **attrs))
        return out

    # -- random parameters -----------------------------------------------------------------

    def conv_weight(self, cout: int, cin_per_group: int, k: int, branches: int = 1) -> np.ndarray:
        """He-initialized ``(cout, cin_per_group, k, k)`` kernel scaled by ``1 / sqrt(branches)``."""
        std = np.sqrt(2.0 / (cin_per_group * k * k)) / np.sqrt(branches)
        return (self.rng.standard_normal((cout, cin_per_group, k, k)) * std).astype(F32)

    def bn_params(self, channels: int, scale: float = 1.0) -> BNParams:
        """Random running statistics; effective gain ``gamma / sqrt(var + eps)`` in ``scale * [0.6, 1.2]``."""
        var = self.rng.uniform(0.5, 1.5, channels)
        mean = self.rng.normal(0.0, 0.1, channels)
        beta = self.rng.normal(0.0, 0.1, channels)
        gamma = np.sqrt(var + 1e-5) * self.rng.uniform(0.6, 1.2, channels) * scale
        return BNParams(gamma.astype(F32), beta.astype(F32), mean.astype(F32), var.astype(F32), 1e-5)

    def linear_params(self, out_features: int, in_features: int) -> tuple[np.ndarray, np.ndarray]:
        w = self.rng.standard_normal((out_features, in_features)) / np.sqrt(in_features)
        b = self.rng.normal(0.0, 0.01, out_features)
        return w.astype(F32), b.astype(F32)

    # -- nodes ---------------------------------------------------------------------------------

    def conv(
        self,
        x: str,
        weight: np.ndarray,
        bias: np.ndarray | None = None,
        stride: int = 1,
        pad: int | None = None,
        group: int = 1,
        name: str = "conv",
    ) -> str:
        k = int(weight.shape[-1])
        p = k // 2 if pad is None else pad
        inputs = [x, self.constant(f"{name}.weight", weight)]
        if bias is not None:
            inputs.append(self.constant(f"{name}.bias", bias))
        return self._node(
            "Conv",
            name,
            inputs,
            kernel_shape=[k, k],
            strides=[stride, stride],
            pads=[p, p, p, p],
            dilations=[1, 1],
            group=group,
        )

    def batch_norm(self, x: str, bn: BNParams, name: str = "bn") -> str:
        inputs = [x] + [
            self.constant(f"{name}.{field}", getattr(bn, field)) for field in ("gamma", "beta", "mean", "var")
        ]
        return self._node("BatchNormalization", name, inputs, epsilon=float(bn.eps))

    def relu(self, x: str, name: str = "relu") -> str:
        return self._node("Relu", name, [x])

    def add(self, a: str, b: str, name: str = "add") -> str:
        return self._node("Add", name, [a, b])

    def sum(self, terms: Sequence[str], name: str = "add") -> str:
        """A left-to-right chain of Add nodes over ``terms``."""
        acc = terms[0]
        for i, t in enumerate(terms[1:]):
            acc = self.add(acc, t, f"{name}{i}" if len(terms) > 2 else name)
        return acc

    def node(self, op: str, inputs: Sequence[str], name: str | None = None, **attrs) -> str:
        """Any single-output node (``name`` defaults to the op type)."""
        return self._node(op, name or op.lower(), inputs, **attrs)

    def sub(self, a: str, b: str, name: str = "sub") -> str:
        return self._node("Sub", name, [a, b])

    def mul(self, a: str, b: str, name: str = "mul") -> str:
        return self._node("Mul", name, [a, b])

    def max_pool(self, x: str, k: int, stride: int, pad: int, name: str = "maxpool") -> str:
        return self._node("MaxPool", name, [x], kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4)

    def average_pool(self, x: str, k: int, stride: int, pad: int = 0, name: str = "avgpool") -> str:
        return self._node(
            "AveragePool", name, [x], kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4,
            count_include_pad=1, ceil_mode=0,
        )

    def global_average_pool(self, x: str, name: str = "gap") -> str:
        return self._node("GlobalAveragePool", name, [x])

    def flatten(self, x: str, name: str = "flatten") -> str:
        return self._node("Flatten", name, [x], axis=1)

    def gemm(self, x: str, weight: np.ndarray, bias: np.ndarray, name: str = "fc") -> str:
        inputs = [x, self.constant(f"{name}.weight", weight), self.constant(f"{name}.bias", bias)]
        return self._node("Gemm", name, inputs, transB=1)

    def classifier(self, x: str, channels: int, classes: int = 1000, name: str = "head", live=None) -> str:
        """GlobalAveragePool, Flatten, Gemm over ``channels`` features; ``live``: the indices of
        the features ``x`` still has (a pruned deploy form), whose weight columns are kept."""
        w, b = self.linear_params(classes, channels)
        if live is not None:
            w = np.ascontiguousarray(w[:, live])
        h = self.global_average_pool(x, f"{name}/gap")
        h = self.flatten(h, f"{name}/flatten")
        return self.gemm(h, w, b, f"{name}/fc")

    # -- model -----------------------------------------------------------------------------------

    def image_model(self, logits: str, batch: int | str, resolution: int, classes: int = 1000) -> onnx.ModelProto:
        """The model of a classifier: input ``"input"`` [batch, 3, r, r], output ``"logits"``."""
        return self.build("input", [batch, 3, resolution, resolution], logits, "logits", [batch, classes])

    def build(
        self,
        input_name: str,
        input_shape: Sequence[int | str],
        output: str,
        output_name: str,
        output_shape: Sequence[int | str],
    ) -> onnx.ModelProto:
        """Rename the last tensor to ``output_name`` and make a checked opset-17 model."""
        for node in self.nodes:
            for i, o in enumerate(node.output):
                if o == output:
                    node.output[i] = output_name
        graph = helper.make_graph(
            self.nodes,
            self.name,
            [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, list(input_shape))],
            [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, list(output_shape))],
            self.initializers,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="onnxrep.models")
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model


# --------------------------------------------------------------------------------------------
# The re-parameterizable block
# --------------------------------------------------------------------------------------------


def multi_branch(
    b: GraphBuilder,
    x: str,
    cin: int,
    cout: int,
    kernels: Sequence[int],
    stride: int = 1,
    group: int = 1,
    identity: bool = False,
    deploy: bool = False,
    bn_scale: float = 1.0,
    name: str = "block",
) -> str:
    """``sum_i BN_i(conv_i(x)) [+ BN_id(x)]`` (training) or its fused single Conv (deploy).

    Every branch ``i`` is a ``kernels[i] x kernels[i]`` conv without bias, padding ``k // 2``, with
    the same ``stride`` and ``group``; ``identity`` adds a BN of ``x`` itself (needs ``stride == 1``
    and ``cin == cout``). Deploy: each branch's BN is fused into its kernel, kernels are padded to
    the largest size and summed with the identity kernel, biases summed. No activation is applied.
    """
    if identity and (stride != 1 or cin != cout):
        raise ValueError("an identity branch needs stride 1 and cin == cout")
    n = len(kernels) + int(identity)
    scale = bn_scale / np.sqrt(n)
    params = []
    for k in kernels:  # draw order: (weight, bn) per branch, then the identity BN
        w = b.conv_weight(cout, cin // group, k)
        params.append((w, b.bn_params(cout, scale)))
    id_bn = b.bn_params(cout, scale) if identity else None

    if not deploy:
        terms = []
        for i, (k, (w, bn)) in enumerate(zip(kernels, params)):
            y = b.conv(x, w, None, stride, k // 2, group, f"{name}/branch{i}_{k}x{k}/conv")
            terms.append(b.batch_norm(y, bn, f"{name}/branch{i}_{k}x{k}/bn"))
        if id_bn is not None:
            terms.append(b.batch_norm(x, id_bn, f"{name}/identity/bn"))
        return terms[0] if len(terms) == 1 else b.sum(terms, f"{name}/add")

    size = max(kernels)
    kernel = np.zeros((cout, cin // group, size, size), np.float64)
    bias = np.zeros(cout, np.float64)
    for w, bn in params:
        kw, kb = fuse_bn(w, bn)
        kernel += pad_center(kw, size)
        bias += kb
    if id_bn is not None:
        kw, kb = fuse_bn(identity_kernel(cin, group, size), id_bn)
        kernel += kw
        bias += kb
    return b.conv(x, kernel.astype(F32), bias.astype(F32), stride, size // 2, group, f"{name}/reparam/conv")


def conv_bn(b: GraphBuilder, x: str, cin: int, cout: int, k: int, stride: int = 1, group: int = 1,
            deploy: bool = False, bn_scale: float = 1.0, name: str = "conv_bn") -> str:
    """A single conv -> BN (deploy: the BN fused into the conv)."""
    return multi_branch(b, x, cin, cout, [k], stride, group, False, deploy, bn_scale, name)


def scaled(width: int, width_scale: float, minimum: int = 8) -> int:
    return max(minimum, int(round(width * width_scale)))


def conv_out(size: int, k: int, stride: int = 1, pad: int | None = None) -> int:
    """Spatial output size of a conv or pool (``ceil_mode=0``); ``pad`` defaults to ``k // 2``."""
    p = k // 2 if pad is None else pad
    return (size + 2 * p - k) // stride + 1
