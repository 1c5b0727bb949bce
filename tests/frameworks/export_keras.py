"""Export the networks of ``networks.py`` from Keras (NHWC, ``padding="same"``) with tf2onnx, once
with tf2onnx's default optimizers and once with them disabled, into
``tests/data/frameworks/tf2onnx/`` and ``tests/data/frameworks/tf2onnx_noopt/`` with a
``manifest.json`` each.

Run it in an environment of its own (TensorFlow is no dependency of onnxrep or its tests)::

    python -m venv /tmp/venvs/tf && /tmp/venvs/tf/bin/pip install tensorflow-cpu tf2onnx
    /tmp/venvs/tf/bin/python tests/frameworks/export_keras.py
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf2onnx  # noqa: E402
from tensorflow import keras  # noqa: E402
from tensorflow.keras import layers  # noqa: E402

import networks as nw  # noqa: E402

EPS = 1e-3  # Keras' BatchNormalization default


class Shift(layers.Layer):
    """``x + b`` with a constant per-channel ``b`` (the two halves of a DBB padding ring)."""

    def __init__(self, b, **kw):
        super().__init__(**kw)
        self.b = np.asarray(b, np.float32)

    def call(self, x):
        return x + self.b


class Net:
    """Builds one network with seeded weights; ``bn`` and ``conv`` set the weights as they go."""

    def __init__(self, name: str):
        self.r = nw.rng(name)
        self.inp = keras.Input((nw.SIZE, nw.SIZE, nw.CHANNELS), batch_size=None, name="x")
        self.sets = []  # (layer, weights) set after the model is built

    def bn(self, x, stats=None):
        c = x.shape[-1]
        stats = stats or nw.bn_stats(self.r, c)
        layer = layers.BatchNormalization(epsilon=EPS)
        y = layer(x)
        self.sets.append((layer, [stats["gamma"], stats["beta"], stats["mean"], stats["var"]]))
        return y

    def conv(self, x, cout, k, stride=1, padding="same", bias=False):
        kh, kw = (k, k) if isinstance(k, int) else k
        cin = x.shape[-1]
        layer = layers.Conv2D(cout, (kh, kw), strides=stride, padding=padding, use_bias=bias)
        y = layer(x)
        w = [nw.weights(self.r, (kh, kw, cin, cout), kh * kw * cin)]
        if bias:
            w.append(self.r.normal(0.0, 0.2, cout).astype(np.float32))
        self.sets.append((layer, w))
        return y

    def dwconv(self, x, k, padding="same"):
        c = x.shape[-1]
        layer = layers.DepthwiseConv2D(k, padding=padding, use_bias=False)
        y = layer(x)
        self.sets.append((layer, [nw.weights(self.r, (k, k, c, 1), k * k)]))
        return y

    def dense(self, x, n):
        layer = layers.Dense(n)
        y = layer(x)
        c = x.shape[-1]
        self.sets.append((layer, [nw.weights(self.r, (c, n), c), self.r.normal(0.0, 0.2, n).astype(np.float32)]))
        return y

    def model(self, out, name):
        m = keras.Model(self.inp, out, name=name)
        for layer, w in self.sets:
            layer.set_weights(w)
        return m


def repvgg(net: Net, x, cout, stride):
    terms = [net.bn(net.conv(x, cout, 3, stride)), net.bn(net.conv(x, cout, 1, stride))]
    if stride == 1 and cout == x.shape[-1]:
        terms.append(net.bn(x))
    return layers.ReLU()(layers.Add()(terms))


def bn_at_zero(stats) -> np.ndarray:
    """The BN's value at zero as Keras computes it (``tf.nn.batch_normalization``: ``rsqrt(var + eps)
    * gamma`` first), so that the ring's shift and the BN's offset agree to the bit."""
    inv = tf.math.rsqrt(tf.constant(stats["var"]) + EPS) * tf.constant(stats["gamma"])
    return (tf.constant(stats["beta"]) - tf.constant(stats["mean"]) * inv).numpy()


def ring(net: Net, y, stats):
    """The DBB padding ring with zero padding only: ``ZeroPad(y - b) + b``, ``b`` the BN at zero."""
    b = bn_at_zero(stats)
    return Shift(b)(layers.ZeroPadding2D(1)(Shift(-b)(y)))


def build(name: str):
    net = Net(name)
    x = net.inp
    c = nw.CHANNELS
    if name == "repvgg_s1":
        y = repvgg(net, x, c, 1)
    elif name == "repvgg_s2":
        y = repvgg(net, x, nw.WIDE, 2)
    elif name == "repvgg_stack":
        y = repvgg(net, repvgg(net, x, nw.WIDE, 2), nw.WIDE, 1)
    elif name == "acnet":
        y = layers.ReLU()(layers.Add()([net.bn(net.conv(x, c, k)) for k in (3, (1, 3), (3, 1))]))
    elif name == "mobileone":
        dw = [net.bn(net.dwconv(x, 3)) for _ in range(2)] + [net.bn(net.dwconv(x, 1)), net.bn(x)]
        y = layers.ReLU()(layers.Add()(dw))
        pw = [net.bn(net.conv(y, c, 1)) for _ in range(2)] + [net.bn(y)]
        y = layers.ReLU()(layers.Add()(pw))
    elif name == "dbb":
        s1, s2 = nw.bn_stats(net.r, c), nw.bn_stats(net.r, c)
        chain = net.bn(net.conv(ring(net, net.bn(net.conv(x, c, 1), s1), s1), c, 3, padding="valid"))
        pool = net.bn(layers.AveragePooling2D(3, strides=1, padding="valid")(ring(net, net.bn(net.conv(x, c, 1), s2), s2)))
        y = layers.ReLU()(layers.Add()([net.bn(net.conv(x, c, 3)), net.bn(net.conv(x, c, 1)), chain, pool]))
    elif name == "residual":
        y = layers.ReLU()(layers.Add()([x, net.bn(net.conv(x, c, 3))]))
    elif name == "conv_bn":
        y = layers.ReLU()(net.bn(net.conv(x, c, 3, bias=True)))
        y = net.bn(net.conv(y, c, 3))
    elif name == "head":
        y = layers.GlobalAveragePooling2D()(layers.ReLU()(net.conv(x, nw.WIDE, 3, bias=True)))
        y = net.dense(net.bn(y), nw.CLASSES)
    else:
        raise KeyError(name)
    return net.model(y, name)


def export(model, path: str, optimizers):
    spec = (tf.TensorSpec((None, nw.SIZE, nw.SIZE, nw.CHANNELS), tf.float32, name="x"),)
    kw = {} if optimizers is None else {"optimizers": optimizers}
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=17, output_path=path, **kw)
    return proto


def check(model, path: str):
    """The export computes what Keras computes (onnxruntime, when it is installed here)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return
    x = np.random.default_rng(1).normal(size=(2, nw.SIZE, nw.SIZE, nw.CHANNELS)).astype(np.float32)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    want = model(x, training=False).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


def main():
    versions = {"tensorflow": tf.__version__, "keras": keras.__version__, "tf2onnx": tf2onnx.__version__}
    for exporter, optimizers in (("tf2onnx", None), ("tf2onnx_noopt", {})):
        folder = nw.data_folder(exporter)
        files = {}
        for name in nw.NETWORKS:
            model = build(name)
            path = os.path.join(folder, f"{name}.onnx")
            export(model, path, optimizers)
            check(model, path)
            files[name] = f"{name}.onnx"
            print(exporter, name, os.path.getsize(path), "bytes")
        nw.write_manifest(folder, exporter, {**versions, "optimizers": "default" if optimizers is None else "none"}, files)


if __name__ == "__main__":
    main()
