"""linear-affine through layout ops: per-feature affines that reach linear layers through
Reshape / Flatten / Transpose / average pools (NextViT's ``BN(NCHW) -> Reshape -> Transpose -> q, k,
v``, also through its ``AveragePool``; LeViT's ``MatMul -> Flatten(axis=2) -> BN -> Reshape``), on
hand-built graphs and on torch exports of small modules with the same spellings."""

import numpy as np
import onnx
import pytest
from onnx import helper

import onnxrep
from graphs import Builder, histogram
from test_parallel_merge import assert_equivalent

PASSES = ["linear-affine"]


def optimize(model, feeds, passes=PASSES, **kw):
    out, report = onnxrep.optimize(model, passes=list(passes), **kw)
    onnx.checker.check_model(out)
    assert_equivalent(model, out, feeds)
    return out, report


def skips(report):
    return [s["reason"] for p in report.to_dict()["passes"] if p["name"] == "linear-affine" for s in p["skips"]]


def declined(report, condition):
    reasons = skips(report)
    assert any(r.startswith(condition + ":") for r in reasons), reasons
    return reasons


def linear(b, x, k, n, bias=True):
    y = b.node("MatMul", [x, b.const(b.rng.standard_normal((k, n)) / np.sqrt(k))])
    return b.node("Add", [y, b.const(b.rng.standard_normal(n) * 0.1)]) if bias else y


def weights(model):
    return {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}


def nextvit_block(c=8, hw=(4, 4), pool=None, readers=3):
    """``BN(x) -> Reshape [1, C, HW] -> Transpose -> q`` and (with ``pool``) ``-> AveragePool ->
    Transpose -> k, v``, else k and v on the same Transpose."""
    b = Builder(c, spatial=hw)
    t = b.node("Reshape", [b.bn("x", c), b.const_int([1, c, hw[0] * hw[1]])])
    tokens = b.node("Transpose", [t], perm=[0, 2, 1])
    outs = [linear(b, tokens, c, c)]
    src = tokens
    if pool is not None:
        p = b.node("AveragePool", [t], **pool)
        src = b.node("Transpose", [p], perm=[0, 2, 1])
    outs += [linear(b, src, c, c) for _ in range(readers - 1)]
    return b, outs


# positive ------------------------------------------------------------------------------------


def test_nextvit_bn_reshape_transpose_into_q_k_v():
    b, outs = nextvit_block()
    model = b.model(*outs)
    out, report = optimize(model, b.feeds())
    assert histogram(out).get("BatchNormalization", 0) == 0
    assert histogram(out)["MatMul"] == 3 and histogram(out)["Transpose"] == 1 and histogram(out)["Reshape"] == 1
    # every layer's weight absorbed the BN's scale: none of the original matrices is left
    before = {k for k, v in weights(model).items() if v.ndim == 2}
    assert not before & set(weights(out))


def test_nextvit_through_count_include_pad_average_pool():
    b, outs = nextvit_block(pool=dict(kernel_shape=[4], strides=[4], pads=[0, 0], count_include_pad=1))
    out, report = optimize(b.model(*outs), b.feeds())
    assert histogram(out).get("BatchNormalization", 0) == 0
    assert histogram(out)["MatMul"] == 3


def test_pool_bn_then_block_bn_both_fold():
    """NextViT's two BNs: ``norm1`` before the Reshape and ``e_mhsa.norm`` after the pool."""
    c = 8
    b = Builder(c, spatial=(4, 4))
    t = b.node("Reshape", [b.bn("x", c), b.const_int([1, c, 16])])
    q = linear(b, b.node("Transpose", [t], perm=[0, 2, 1]), c, c)
    p = b.bn(b.node("AveragePool", [t], kernel_shape=[4], strides=[4]), c)
    kv = b.node("Transpose", [p], perm=[0, 2, 1])
    out, report = optimize(b.model(q, linear(b, kv, c, c), linear(b, kv, c, c)), b.feeds())
    assert histogram(out).get("BatchNormalization", 0) == 0


def test_shift_through_padded_pool_without_pad_count():
    """count_include_pad=0 divides each window by the input elements it reads: a shift commutes."""
    b, outs = nextvit_block(pool=dict(kernel_shape=[3], strides=[2], pads=[1, 1], count_include_pad=0))
    out, report = optimize(b.model(*outs), b.feeds())
    assert histogram(out).get("BatchNormalization", 0) == 0


def test_scale_through_padded_pool_with_pad_count():
    """A scale alone commutes with any average, padded zeros counted or not."""
    c = 8
    b = Builder(c, spatial=(4, 4))
    t = b.node("Reshape", [b.mul_const("x", b.rng.uniform(0.5, 1.5, (1, c, 1, 1))), b.const_int([1, c, 16])])
    p = b.node("AveragePool", [t], kernel_shape=[3], strides=[2], pads=[1, 1], count_include_pad=1)
    y = linear(b, b.node("Transpose", [p], perm=[0, 2, 1]), c, c)
    out, report = optimize(b.model(y), b.feeds())
    assert histogram(out).get("Mul", 0) == 0


def test_levit_matmul_flatten_bn_reshape():
    """LeViT's LinearNorm (TorchScript): ``MatMul -> Flatten(axis=2) -> BN -> Reshape back``: one
    MatMul + bias, the Flatten and Reshape gone."""
    c, n = 8, 16
    b = Builder(c, input_shape=[2, 5, c])
    m = linear(b, "x", c, n, bias=False)
    f = b.node("Flatten", [m], axis=2)
    r = b.node("Reshape", [b.bn(f, n), b.const_int([2, 5, n])])
    out, report = optimize(b.model(b.relu(r)), b.feeds())
    assert histogram(out) == {"MatMul": 1, "Add": 1, "Relu": 1}


def test_levit_dynamo_reshape_bn_reshape_to_heads():
    """dynamo: ``MatMul -> Reshape [B*N, C] -> BN -> Reshape [B, N, h, d]``: one Reshape left."""
    c, n = 8, 16
    b = Builder(c, input_shape=[2, 5, c])
    m = linear(b, "x", c, n, bias=False)
    f = b.node("Reshape", [m, b.const_int([10, n])])
    r = b.node("Reshape", [b.bn(f, n), b.const_int([2, 5, 4, 4])])
    out, report = optimize(b.model(b.relu(r)), b.feeds())
    assert histogram(out) == {"MatMul": 1, "Add": 1, "Reshape": 1, "Relu": 1}


def test_levit_reshape_as_reads_the_shape_of_the_layer_output():
    """TorchScript without constant folding: ``reshape_as(x)`` is ``Reshape(BN(Flatten(x)),
    Shape(x))``; the Shape reads the new layer's output instead."""
    c, n = 8, 16
    b = Builder(c, input_shape=[2, 5, c])
    m = linear(b, "x", c, n, bias=False)
    f = b.node("Flatten", [m], axis=2)
    r = b.node("Reshape", [b.bn(f, n), b.node("Shape", [m])])
    out, report = optimize(b.model(b.relu(r)), b.feeds())
    assert histogram(out).get("BatchNormalization", 0) == 0 and histogram(out)["Shape"] == 1


def test_after_through_transpose_keeps_the_layout_ops():
    c, n = 8, 6
    b = Builder(c, input_shape=[2, 5, c])
    t = b.node("Transpose", [linear(b, "x", c, n)], perm=[0, 2, 1])
    y = b.relu(b.bn(t, n))
    out, report = optimize(b.model(y), b.feeds())
    assert histogram(out) == {"MatMul": 1, "Add": 1, "Transpose": 1, "Relu": 1}


def test_bn2d_flatten_classifier():
    """``BN2d -> Flatten -> Gemm`` (C x H x W features): the BN repeats over each channel's block."""
    c = 4
    b = Builder(c, spatial=(2, 3))
    f = b.node("Flatten", [b.bn("x", c)], axis=1)
    k = c * 6
    y = b.node("Gemm", [f, b.const(b.rng.standard_normal((5, k))), b.const(b.rng.standard_normal(5))], transB=1)
    out, report = optimize(b.model(y), b.feeds())
    assert histogram(out) == {"Flatten": 1, "Gemm": 1}


def test_token_affine_exactly_per_feature():
    """``MatMul -> Flatten(axis=1) -> BN(N * C)`` whose parameters repeat per token is exactly a
    per-feature affine: it folds."""
    c, n, tokens = 4, 3, 5
    b = Builder(c, input_shape=[2, tokens, c])
    m = linear(b, "x", c, n)
    f = b.node("Flatten", [m], axis=1)
    params = [np.tile(p, tokens) for p in b.bn_params(n)]
    bn = b.node("BatchNormalization", [f] + [b.const(p) for p in params], epsilon=1e-5)
    out, report = optimize(b.model(b.relu(bn)), b.feeds())
    assert histogram(out).get("BatchNormalization", 0) == 0


def test_mul_on_channel_axis_then_transpose_fan_out():
    c = 8
    b = Builder(c, input_shape=[1, c, 6])
    s = b.mul_const("x", b.rng.uniform(0.5, 1.5, (c, 1)))
    t = b.node("Transpose", [s], perm=[0, 2, 1])
    out, report = optimize(b.model(linear(b, t, c, 4), linear(b, t, c, 5)), b.feeds())
    assert histogram(out).get("Mul", 0) == 0


def test_torchscript_export_of_nextvit_and_levit_blocks(tmp_path):
    torch = pytest.importorskip("torch")
    from torch_export import TORCHSCRIPT, DYNAMO, assert_close, export, op_count, run_ort

    nn = torch.nn

    class NextViTAttn(nn.Module):
        def __init__(self, c=16):
            super().__init__()
            self.norm1, self.norm = nn.BatchNorm2d(c), nn.BatchNorm1d(c)
            self.q, self.k, self.v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
            self.pool = nn.AvgPool1d(4, 4)

        def forward(self, x):
            B, C, H, W = x.shape
            out = self.norm1(x).reshape(B, C, -1).transpose(-1, -2)
            q = self.q(out)
            x_ = self.norm(self.pool(out.transpose(1, 2))).transpose(1, 2)
            return torch.cat([q, self.k(x_), self.v(x_)], dim=1)

    class LinearNorm(nn.Module):
        def __init__(self, cin=16, cout=24):
            super().__init__()
            self.linear, self.bn = nn.Linear(cin, cout, bias=False), nn.BatchNorm1d(cout)

        def forward(self, x):
            x = self.linear(x)
            return torch.relu(self.bn(x.flatten(0, 1)).reshape_as(x))

    g = torch.Generator().manual_seed(0)
    for module, shape in ((NextViTAttn(), (1, 16, 4, 4)), (LinearNorm(), (2, 7, 16))):
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                with torch.no_grad():
                    m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                    m.running_var.copy_(0.5 + 1.5 * torch.rand(m.running_var.shape, generator=g))
                    m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
        module.eval()
        x = torch.randn(shape, generator=g)
        for exporter in (TORCHSCRIPT, DYNAMO):
            model = export(module, x, tmp_path / f"{type(module).__name__}-{exporter}.onnx", exporter)
            assert op_count(model, "BatchNormalization") > 0 or exporter == DYNAMO
            out, report = onnxrep.optimize(model)
            assert op_count(out, "BatchNormalization") == 0, (exporter, histogram(out), skips(report))
            with torch.no_grad():
                ref = module(x).numpy()
            assert_close(run_ort(out, x.numpy()), ref)


# negative ------------------------------------------------------------------------------------


def test_reshape_mixing_channels_into_features_is_declined():
    """``[1, C, H, W] -> Reshape [1, HW, C]`` without a transpose: each 'feature' mixes channels."""
    c = 8
    b = Builder(c, spatial=(4, 4))
    t = b.node("Reshape", [b.bn("x", c), b.const_int([1, 16, c])])
    out, report = optimize(b.model(linear(b, t, c, 4), linear(b, t, c, 4)), b.feeds())
    declined(report, "per_feature")
    assert histogram(out)["BatchNormalization"] == 1


def test_reader_that_is_not_linear_is_declined():
    b, outs = nextvit_block(readers=2)
    tokens = [n for n in b.nodes if n.op_type == "Transpose"][0].output[0]
    out, report = optimize(b.model(*outs, b.relu(tokens)), b.feeds())
    declined(report, "readers")
    assert histogram(out)["BatchNormalization"] == 1


def test_graph_output_in_the_tree_is_declined():
    b, outs = nextvit_block(readers=2)
    tokens = [n for n in b.nodes if n.op_type == "Transpose"][0].output[0]
    out, report = optimize(b.model(*outs, tokens), b.feeds())
    declined(report, "single_use")


def test_unknown_shape_is_declined():
    """A Reshape to a shape given at run time: nothing is known about the tokens' layout."""
    c = 8
    b = Builder(c, spatial=(4, 4))
    b.inputs.append(helper.make_tensor_value_info("shape", onnx.TensorProto.INT64, [3]))
    t = b.node("Reshape", [b.bn("x", c), "shape"])
    tokens = b.node("Transpose", [t], perm=[0, 2, 1])
    model = b.model(linear(b, tokens, c, 4), linear(b, tokens, c, 4))
    feeds = {**b.feeds(), "shape": np.array([1, c, 16], np.int64)}
    out, report = optimize(model, feeds, verify=False)
    declined(report, "static_shape")
    assert histogram(out)["BatchNormalization"] == 1


def test_shift_through_pool_counting_padded_zeros_is_declined():
    """count_include_pad=1 with padding: a border window over r of k elements averages the shift
    to t r / k, not t."""
    b, outs = nextvit_block(pool=dict(kernel_shape=[3], strides=[2], pads=[1, 1], count_include_pad=1))
    out, report = optimize(b.model(*outs), b.feeds())
    declined(report, "pool_border")
    assert histogram(out)["BatchNormalization"] == 1


def test_ceil_mode_pool_with_shift_is_declined():
    b, outs = nextvit_block(pool=dict(kernel_shape=[3], strides=[2], ceil_mode=1))
    out, report = optimize(b.model(*outs), b.feeds())
    declined(report, "pool_border")


def test_after_affine_varying_per_token_is_declined():
    c, n, tokens = 4, 3, 5
    b = Builder(c, input_shape=[2, tokens, c])
    f = b.node("Flatten", [linear(b, "x", c, n)], axis=1)
    out, report = optimize(b.model(b.relu(b.bn(f, n * tokens))), b.feeds())
    declined(report, "per_feature")
    assert histogram(out)["BatchNormalization"] == 1


def test_after_chain_read_elsewhere_is_declined():
    c, n = 8, 16
    b = Builder(c, input_shape=[2, 5, c])
    f = b.node("Flatten", [linear(b, "x", c, n, bias=False)], axis=2)
    out, report = optimize(b.model(b.relu(b.bn(f, n)), b.relu(f)), b.feeds())
    declined(report, "single_use")


def test_fixed_point():
    b, outs = nextvit_block(pool=dict(kernel_shape=[4], strides=[4]))
    out, _ = optimize(b.model(*outs), b.feeds())
    again, report = onnxrep.optimize(out, passes=PASSES)
    assert report.rewritten == 0


# timm ----------------------------------------------------------------------------------------


@pytest.mark.zoo
@pytest.mark.parametrize("name", ["nextvit_small", "levit_128s"])
def test_timm_torchscript_export_reaches_deploy_bn_count(name, tmp_path):
    """NextViT and LeViT (TorchScript, 64x64, random BN statistics): no more BatchNormalization
    nor linear layers than the export of timm's deploy form, and the same outputs."""
    pytest.importorskip("torch")
    zm = pytest.importorskip("zoo_models")
    try:
        zm.import_timm()
    except ImportError:
        pytest.skip("timm is not importable")
    from torch_export import assert_close, op_count, run_ort

    model = zm.build(name)
    train = onnx.load(zm.export(model, zm.example_input(name), tmp_path / "train.onnx", zm.TORCHSCRIPT))
    deploy = onnx.load(zm.export(zm.deploy_form(model), zm.example_input(name), tmp_path / "deploy.onnx", zm.TORCHSCRIPT))
    out, report = onnxrep.optimize(train)
    assert op_count(out, "BatchNormalization") <= op_count(deploy, "BatchNormalization")
    assert op_count(out, "Gemm", "MatMul", "Conv") <= op_count(deploy, "Gemm", "MatMul", "Conv")
    x = zm.example_input(name, seed=1)
    assert_close(run_ort(out, x), run_ort(train, x), rel=1e-4)
