"""Export the networks of ``networks.py`` from PaddlePaddle (``paddle.nn``, NCHW) with paddle2onnx
into ``tests/data/frameworks/paddle2onnx/`` with a ``manifest.json``.

Written as ports of the PyTorch blocks are written in Paddle: ``padding=1`` or ``padding="SAME"``
on the Conv2D, or an explicit ``nn.Pad2D`` before an unpadded one (the TensorFlow-style asymmetric
pad of a stride-2 block), and the DBB padding ring as ``F.pad(y - b) + b`` (``F.pad`` pads with one
scalar). paddle2onnx 2.1 writes the value of such a Pad from memory it never set: an export whose
output differs from Paddle's is made again, and the fixtures keep what it wrote (a denormal such as
4.6e-44, not 0, is no zero padding). Run it in an environment of its own (Paddle is no dependency of onnxrep or its tests)::

    python -m venv /tmp/venvs/paddle && /tmp/venvs/paddle/bin/pip install paddlepaddle paddle2onnx onnxruntime
    /tmp/venvs/paddle/bin/python tests/frameworks/export_paddle.py
"""

from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import paddle  # noqa: E402
import paddle.nn as nn  # noqa: E402
import paddle.nn.functional as F  # noqa: E402
import paddle2onnx  # noqa: E402

import networks as nw  # noqa: E402

EPS = 1e-5  # Paddle's BatchNorm2D default


class Maker:
    def __init__(self, name: str):
        self.r = nw.rng(name)

    def bn(self, c, stats=None, one_d=False):
        stats = stats or nw.bn_stats(self.r, c)
        layer = (nn.BatchNorm1D if one_d else nn.BatchNorm2D)(c, epsilon=EPS)
        layer.weight.set_value(stats["gamma"])
        layer.bias.set_value(stats["beta"])
        layer._mean.set_value(stats["mean"])
        layer._variance.set_value(stats["var"])
        return layer

    def conv(self, cin, cout, k, stride=1, padding=None, bias=False, groups=1):
        kh, kw = (k, k) if isinstance(k, int) else k
        if padding is None:
            padding = (kh // 2, kw // 2)
        layer = nn.Conv2D(cin, cout, (kh, kw), stride=stride, padding=padding, groups=groups,
                          bias_attr=None if bias else False)
        layer.weight.set_value(nw.weights(self.r, (cout, cin // groups, kh, kw), kh * kw * cin // groups))
        if bias:
            layer.bias.set_value(self.r.normal(0.0, 0.2, cout).astype(np.float32))
        return layer

    def dense(self, cin, n):
        layer = nn.Linear(cin, n)
        layer.weight.set_value(nw.weights(self.r, (cin, n), cin))
        layer.bias.set_value(self.r.normal(0.0, 0.2, n).astype(np.float32))
        return layer


class RepVGG(nn.Layer):
    """``pad``: how the 3x3 pads: 1 (PyTorch style), "SAME", or "explicit" (a Pad2D before it)."""

    def __init__(self, m: Maker, cin, cout, stride, pad=1):
        super().__init__()
        self.pad = nn.Pad2D([0, 1, 0, 1]) if pad == "explicit" else None
        self.k3 = m.conv(cin, cout, 3, stride, padding=0 if pad == "explicit" else pad)
        self.b3 = m.bn(cout)
        self.k1 = m.conv(cin, cout, 1, stride, padding=0)
        self.b1 = m.bn(cout)
        self.bid = m.bn(cin) if stride == 1 and cin == cout else None

    def forward(self, x):
        y = self.b3(self.k3(x if self.pad is None else self.pad(x))) + self.b1(self.k1(x))
        if self.bid is not None:
            y = y + self.bid(x)
        return F.relu(y)


class Net(nn.Layer):
    def __init__(self, name: str):
        super().__init__()
        m = Maker(name)
        c, wide = nw.CHANNELS, nw.WIDE
        self.kind = name
        if name == "repvgg_s1":
            self.blocks = nn.LayerList([RepVGG(m, c, c, 1)])
        elif name == "repvgg_s2":
            self.blocks = nn.LayerList([RepVGG(m, c, wide, 2, pad="explicit")])
        elif name == "repvgg_stack":
            self.blocks = nn.LayerList([RepVGG(m, c, wide, 2, pad="SAME"), RepVGG(m, wide, wide, 1, pad="SAME")])
        elif name == "acnet":
            self.convs = nn.LayerList([m.conv(c, c, k) for k in (3, (1, 3), (3, 1))])
            self.bns = nn.LayerList([m.bn(c) for _ in range(3)])
        elif name == "mobileone":
            self.dw = nn.LayerList([m.conv(c, c, 3, groups=c), m.conv(c, c, 3, groups=c), m.conv(c, c, 1, groups=c)])
            self.dwbn = nn.LayerList([m.bn(c) for _ in range(4)])
            self.pw = nn.LayerList([m.conv(c, c, 1), m.conv(c, c, 1)])
            self.pwbn = nn.LayerList([m.bn(c) for _ in range(3)])
        elif name == "dbb":
            s1, s2 = nw.bn_stats(m.r, c), nw.bn_stats(m.r, c)
            self.k3, self.b3 = m.conv(c, c, 3), m.bn(c)
            self.k1, self.b1 = m.conv(c, c, 1), m.bn(c)
            self.c1, self.c1bn = m.conv(c, c, 1), m.bn(c, s1)
            self.c3, self.c3bn = m.conv(c, c, 3, padding=0), m.bn(c)
            self.a1, self.a1bn = m.conv(c, c, 1), m.bn(c, s2)
            self.pool = nn.AvgPool2D(3, stride=1, padding=0)
            self.abn = m.bn(c)
            self.ring1 = paddle.to_tensor(nw.bn_at_zero(s1, EPS).reshape(1, c, 1, 1))
            self.ring2 = paddle.to_tensor(nw.bn_at_zero(s2, EPS).reshape(1, c, 1, 1))
        elif name == "residual":
            self.k3, self.b3 = m.conv(c, c, 3), m.bn(c)
        elif name == "conv_bn":
            self.c1, self.b1 = m.conv(c, c, 3, bias=True), m.bn(c)
            self.c2, self.b2 = m.conv(c, c, 3), m.bn(c)
        elif name == "head":
            self.c1 = m.conv(c, wide, 3, bias=True)
            self.bn = m.bn(wide, one_d=True)
            self.fc = m.dense(wide, nw.CLASSES)
        else:
            raise KeyError(name)

    def forward(self, x):
        k = self.kind
        if k.startswith("repvgg"):
            for b in self.blocks:
                x = b(x)
            return x
        if k == "acnet":
            return F.relu(sum(bn(conv(x)) for conv, bn in zip(self.convs, self.bns)))
        if k == "mobileone":
            y = F.relu(sum(bn(conv(x)) for conv, bn in zip(self.dw, self.dwbn)) + self.dwbn[3](x))
            return F.relu(sum(bn(conv(y)) for conv, bn in zip(self.pw, self.pwbn)) + self.pwbn[2](y))
        if k == "dbb":
            chain = self.c3bn(self.c3(F.pad(self.c1bn(self.c1(x)) - self.ring1, [1, 1, 1, 1]) + self.ring1))
            pooled = self.pool(F.pad(self.a1bn(self.a1(x)) - self.ring2, [1, 1, 1, 1]) + self.ring2)
            return F.relu(self.b3(self.k3(x)) + self.b1(self.k1(x)) + chain + self.abn(pooled))
        if k == "residual":
            return F.relu(x + self.b3(self.k3(x)))
        if k == "conv_bn":
            return self.b2(self.c2(F.relu(self.b1(self.c1(x)))))
        if k == "head":
            y = F.adaptive_avg_pool2d(F.relu(self.c1(x)), 1).flatten(1)
            return self.fc(self.bn(y))
        raise KeyError(k)


def check(model, path: str):
    """The export computes what Paddle computes (onnxruntime, when it is installed here)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return
    x = np.random.default_rng(1).normal(size=(2, nw.CHANNELS, nw.SIZE, nw.SIZE)).astype(np.float32)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    want = model(paddle.to_tensor(x)).numpy()
    err = float(np.abs(got - want).max())
    assert err <= 1e-4 * float(np.abs(want).max()), f"max error {err:.3g}, max |ref| {float(np.abs(want).max()):.3g}"


def export(model, path: str):
    spec = [paddle.static.InputSpec([None, nw.CHANNELS, nw.SIZE, nw.SIZE], "float32", "x")]
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "model")
        paddle.onnx.export(model, prefix, input_spec=spec, opset_version=17)
        os.replace(prefix + ".onnx", path)


def main():
    paddle.set_device("cpu")
    versions = {"paddlepaddle": paddle.__version__, "paddle2onnx": paddle2onnx.__version__}
    exporter = "paddle2onnx"
    folder = nw.data_folder(exporter)
    files, failures = {}, {}
    for name in nw.NETWORKS:
        model = Net(name)
        model.eval()
        path = os.path.join(folder, f"{name}.onnx")
        try:
            for attempt in range(3):
                export(model, path)
                try:
                    check(model, path)
                    break
                except AssertionError:
                    # paddle2onnx 2.1 writes the value of a pad3d's Pad from memory it never set (often
                    # 0 or a denormal, now and then a large number): export again
                    if attempt == 2:
                        raise
        except Exception as e:  # an export onnxruntime cannot load, or that computes something else
            failures[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            if os.path.exists(path):
                os.remove(path)
            print(exporter, name, "export failed:", failures[name])
            continue
        files[name] = f"{name}.onnx"
        print(exporter, name, os.path.getsize(path), "bytes")
    nw.write_manifest(folder, exporter, versions, files, failures)


if __name__ == "__main__":
    main()
