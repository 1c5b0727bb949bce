"""Export the networks of ``networks.py`` from Flax (``flax.nnx``, NHWC, ``padding="SAME"``) with
jax2onnx into ``tests/data/frameworks/jax2onnx/`` with a ``manifest.json``.

jax2onnx 0.17 keeps the NHWC ``value_info`` of tensors its layout pass moved to NCHW (a BN that reads
a ReLU's output), which onnxruntime refuses; for those exports the declarations are dropped and the
manifest says so under ``repairs``. The DBB padding ring is built from ``jnp.concatenate`` of constant strips (``jnp.pad`` pads with
one scalar per axis, not one value per channel). Run it in an environment of its own (JAX is no
dependency of onnxrep or its tests)::

    python -m venv /tmp/venvs/jax && /tmp/venvs/jax/bin/pip install jax flax jax2onnx onnxruntime
    /tmp/venvs/jax/bin/python tests/frameworks/export_flax.py
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax2onnx  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402
from flax import nnx  # noqa: E402

import networks as nw  # noqa: E402

EPS = 1e-5  # Flax's BatchNorm default


class Block(nnx.Module):
    """One network; layers are made as the forward function first asks for them (seeded weights)."""

    def __init__(self, name: str):
        self.name = name
        self.r = nw.rng(name)
        self.rngs = nnx.Rngs(0)

    # builders used while tracing the structure ------------------------------------------------
    def bn(self, c, stats=None):
        stats = stats or nw.bn_stats(self.r, c)
        layer = nnx.BatchNorm(c, use_running_average=True, epsilon=EPS, rngs=self.rngs)
        layer.scale.value = jnp.asarray(stats["gamma"])
        layer.bias.value = jnp.asarray(stats["beta"])
        layer.mean.value = jnp.asarray(stats["mean"])
        layer.var.value = jnp.asarray(stats["var"])
        return layer

    def conv(self, cin, cout, k, stride=1, padding="SAME", bias=False, groups=1):
        kh, kw = (k, k) if isinstance(k, int) else k
        layer = nnx.Conv(cin, cout, (kh, kw), strides=stride, padding=padding, use_bias=bias,
                         feature_group_count=groups, rngs=self.rngs)
        layer.kernel.value = jnp.asarray(nw.weights(self.r, (kh, kw, cin // groups, cout), kh * kw * cin // groups))
        if bias:
            layer.bias.value = jnp.asarray(self.r.normal(0.0, 0.2, cout).astype(np.float32))
        return layer

    def dense(self, cin, n):
        layer = nnx.Linear(cin, n, rngs=self.rngs)
        layer.kernel.value = jnp.asarray(nw.weights(self.r, (cin, n), cin))
        layer.bias.value = jnp.asarray(self.r.normal(0.0, 0.2, n).astype(np.float32))
        return layer


def ring(y, b):
    """The DBB padding ring: ``y`` framed by one row / column of the per-channel value ``b``."""
    n, h, w, c = y.shape
    col = jnp.broadcast_to(b, (n, h, 1, c))
    y = jnp.concatenate([col, y, col], axis=2)
    row = jnp.broadcast_to(b, (n, 1, w + 2, c))
    return jnp.concatenate([row, y, row], axis=1)


class RepVGG(nnx.Module):
    def __init__(self, net: Block, cin, cout, stride):
        self.k3 = net.conv(cin, cout, 3, stride)
        self.b3 = net.bn(cout)
        self.k1 = net.conv(cin, cout, 1, stride)
        self.b1 = net.bn(cout)
        self.bid = net.bn(cin) if stride == 1 and cin == cout else None

    def __call__(self, x):
        y = self.b3(self.k3(x)) + self.b1(self.k1(x))
        if self.bid is not None:
            y = y + self.bid(x)
        return nnx.relu(y)


class Net(nnx.Module):
    def __init__(self, name: str):
        net = Block(name)
        c, wide = nw.CHANNELS, nw.WIDE
        self.kind = name
        if name == "repvgg_s1":
            self.blocks = nnx.List([RepVGG(net, c, c, 1)])
        elif name == "repvgg_s2":
            self.blocks = nnx.List([RepVGG(net, c, wide, 2)])
        elif name == "repvgg_stack":
            self.blocks = nnx.List([RepVGG(net, c, wide, 2), RepVGG(net, wide, wide, 1)])
        elif name == "acnet":
            self.convs = nnx.List([net.conv(c, c, k) for k in (3, (1, 3), (3, 1))])
            self.bns = nnx.List([net.bn(c) for _ in range(3)])
        elif name == "mobileone":
            self.dw = nnx.List([net.conv(c, c, 3, groups=c), net.conv(c, c, 3, groups=c), net.conv(c, c, 1, groups=c)])
            self.dwbn = nnx.List([net.bn(c) for _ in range(4)])
            self.pw = nnx.List([net.conv(c, c, 1), net.conv(c, c, 1)])
            self.pwbn = nnx.List([net.bn(c) for _ in range(3)])
        elif name == "dbb":
            s1, s2 = nw.bn_stats(net.r, c), nw.bn_stats(net.r, c)
            self.k3, self.b3 = net.conv(c, c, 3), net.bn(c)
            self.k1, self.b1 = net.conv(c, c, 1), net.bn(c)
            self.c1, self.c1bn = net.conv(c, c, 1), net.bn(c, s1)
            self.c3, self.c3bn = net.conv(c, c, 3, padding="VALID"), net.bn(c)
            self.a1, self.a1bn = net.conv(c, c, 1), net.bn(c, s2)
            self.abn = net.bn(c)
            self.ring1 = nnx.Variable(jnp.asarray(nw.bn_at_zero(s1, EPS)))
            self.ring2 = nnx.Variable(jnp.asarray(nw.bn_at_zero(s2, EPS)))
        elif name == "residual":
            self.k3, self.b3 = net.conv(c, c, 3), net.bn(c)
        elif name == "conv_bn":
            self.c1, self.b1 = net.conv(c, c, 3, bias=True), net.bn(c)
            self.c2, self.b2 = net.conv(c, c, 3), net.bn(c)
        elif name == "head":
            self.c1 = net.conv(c, wide, 3, bias=True)
            self.bn = net.bn(wide)
            self.fc = net.dense(wide, nw.CLASSES)
        else:
            raise KeyError(name)

    def __call__(self, x):
        k = self.kind
        if k.startswith("repvgg"):
            for b in self.blocks:
                x = b(x)
            return x
        if k == "acnet":
            return nnx.relu(sum(bn(conv(x)) for conv, bn in zip(self.convs, self.bns)))
        if k == "mobileone":
            y = sum(bn(conv(x)) for conv, bn in zip(self.dw, self.dwbn)) + self.dwbn[3](x)
            y = nnx.relu(y)
            z = sum(bn(conv(y)) for conv, bn in zip(self.pw, self.pwbn)) + self.pwbn[2](y)
            return nnx.relu(z)
        if k == "dbb":
            chain = self.c3bn(self.c3(ring(self.c1bn(self.c1(x)), self.ring1.value)))
            pooled = nnx.avg_pool(ring(self.a1bn(self.a1(x)), self.ring2.value), window_shape=(3, 3), strides=(1, 1),
                                  padding="VALID")
            return nnx.relu(self.b3(self.k3(x)) + self.b1(self.k1(x)) + chain + self.abn(pooled))
        if k == "residual":
            return nnx.relu(x + self.b3(self.k3(x)))
        if k == "conv_bn":
            return self.b2(self.c2(nnx.relu(self.b1(self.c1(x)))))
        if k == "head":
            y = jnp.mean(nnx.relu(self.c1(x)), axis=(1, 2))
            return self.fc(self.bn(y))
        raise KeyError(k)


def check(model, path: str):
    """The export computes what Flax computes (onnxruntime, when it is installed here)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return
    x = np.random.default_rng(1).normal(size=(2, nw.SIZE, nw.SIZE, nw.CHANNELS)).astype(np.float32)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    want = np.asarray(model(jnp.asarray(x)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


def main():
    versions = {"jax": jax.__version__, "flax": flax.__version__, "jax2onnx": getattr(jax2onnx, "__version__", "?")}
    exporter = "jax2onnx"
    folder = nw.data_folder(exporter)
    files, failures, repairs = {}, {}, {}
    for name in nw.NETWORKS:
        model = Net(name)
        path = os.path.join(folder, f"{name}.onnx")
        try:
            jax2onnx.to_onnx(model, [("B", nw.SIZE, nw.SIZE, nw.CHANNELS)], model_name=name, opset=18,
                             return_mode="file", output_path=path)
            try:
                check(model, path)
            except Exception as e:  # noqa: BLE001
                if "ShapeInferenceError" not in str(e):
                    raise
                # jax2onnx moves a tensor to NCHW and keeps its NHWC value_info: onnxruntime refuses
                # the model. The declarations are dropped (the nodes are as exported).
                proto = onnx.load(path)
                del proto.graph.value_info[:]
                onnx.save(proto, path)
                check(model, path)
                repairs[name] = "value_info dropped: " + str(e).splitlines()[0][-160:]
        except Exception as e:  # an export onnxruntime cannot load, or that computes something else
            failures[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            if os.path.exists(path):
                os.remove(path)
            print(exporter, name, "export failed:", failures[name])
            continue
        files[name] = f"{name}.onnx"
        print(exporter, name, os.path.getsize(path), "bytes")
    nw.write_manifest(folder, exporter, versions, files, failures, repairs)


if __name__ == "__main__":
    main()
