"""The real-model zoo: timm models whose ``timm.utils.reparameterize_model`` changes the network
(RepVGG and MobileOne blocks, FastViT RepMixers, RepGhost, GhostNetV3, LCNetV2, Next-ViT, RepViT,
EfficientViT-MSRA, LeViT, TinyViT, SHViT, EfficientViM, iFormer), built with random weights,
exported in their training form and their deploy form with three exporter settings, and measured.

No tests here: ``tests/test_zoo.py`` checks onnxrep on these exports and ``benchmarks/zoo.py``
writes the table in ``ZOO.md``; the latency benchmarks import the export functions too. This
module needs torch, timm and onnx, onnxruntime; it does not import pytest.

Each model is the smallest variant of its family, built with ``pretrained=False`` (no network),
seeded, with its BatchNorm statistics and affine parameters and its layer scales randomized (see
:func:`randomize`) so that no fold is the identity, in eval mode, batch 1, at the smallest input
resolution that runs through every stage with more than one pixel at the end (64x64; LeViT takes
its resolution at construction: ``img_size=64``). The deploy form is
``timm.utils.reparameterize_model(copy.deepcopy(model))``.

Exporters (``EXPORTERS``):

* ``torchscript``: ``torch.onnx.export(dynamo=False, do_constant_folding=True)``, opset 17;
* ``torchscript-nofold``: the same with ``do_constant_folding=False`` (BatchNormalization nodes
  and constant subgraphs as the module computes them);
* ``dynamo``: ``torch.onnx.export(dynamo=True)`` with its defaults.

``KNOWN_MISSES`` is the table of (model, exporter) cases where onnxrep does not yet reach the
deploy form's node counts, with what is left over; ``tests/test_zoo.py`` marks them
``xfail(strict=True)``, so a case that starts to pass fails until its row is removed here.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import json
import pathlib
from collections import Counter

import numpy as np

# --------------------------------------------------------------------------------------------
# torchvision without its C++ extension
# --------------------------------------------------------------------------------------------

#: the ``torch.library.Library`` that defines ``torchvision::nms`` / ``qnms`` when torchvision's
#: own extension could not define them; kept alive here (its definitions go with it)
_TORCHVISION_SHIM = None


def ensure_torchvision() -> None:
    """Make ``import torchvision`` (and so ``import timm``, which imports it) work with a CPU build
    of torch.

    The torchvision wheel on PyPI is built against the CUDA build of torch: with the CPU build its
    ``_C`` extension does not load (undefined symbols), torchvision carries on without its C++
    ops, and then ``torchvision/_meta_registrations.py`` registers fake kernels for
    ``torchvision::nms`` and ``torchvision::qnms`` unconditionally, which raises ``RuntimeError:
    operator torchvision::nms does not exist`` at import. When (and only when) the extension does
    not load, this defines the two operators' schemas (without kernels) so that those
    registrations succeed. The zoo's classification models never call nms; a call would fail
    with "no kernel", never compute something wrong. A working extension is left alone.
    """
    global _TORCHVISION_SHIM
    import sys

    import torch

    if _TORCHVISION_SHIM is not None or "torchvision" in sys.modules:
        return
    if _has_torchvision_nms(torch):
        return
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return  # not installed: the caller's import fails with the usual ImportError
    for folder in spec.submodule_search_locations:
        for lib_path in sorted(pathlib.Path(folder).glob("_C.*")):
            if lib_path.suffix in (".so", ".pyd", ".dylib"):
                with contextlib.suppress(OSError, ImportError):
                    torch.ops.load_library(str(lib_path))  # what torchvision.extension does
    if _has_torchvision_nms(torch):
        return
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION_SHIM = lib


def _has_torchvision_nms(torch) -> bool:
    try:
        torch.ops.torchvision.nms  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


def import_timm():
    """``timm``, imported after :func:`ensure_torchvision`."""
    ensure_torchvision()
    import timm

    return timm


# --------------------------------------------------------------------------------------------
# the zoo
# --------------------------------------------------------------------------------------------

TORCHSCRIPT, TORCHSCRIPT_NOFOLD, DYNAMO = "torchscript", "torchscript-nofold", "dynamo"
EXPORTERS = (TORCHSCRIPT, TORCHSCRIPT_NOFOLD, DYNAMO)
TORCHSCRIPT_OPSET = 17
SEED = 0
RESOLUTION = 64


@dataclasses.dataclass(frozen=True)
class ZooModel:
    name: str  # timm model name
    family: str  # timm module (what reparameterize_model folds in it)
    kwargs: tuple = ()  # extra create_model keyword arguments, as (key, value) pairs
    resolution: int = RESOLUTION

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (1, 3, self.resolution, self.resolution)


#: the smallest variant of every timm family that ``reparameterize_model`` changes, in timm 1.0.31
#: (64x64 is the smallest input that leaves every model more than 1x1 pixels in its last stage:
#: ghostnetv3_050 fails below 64; LeViT's attention biases are sized by ``img_size``)
ZOO = (
    ZooModel("repvgg_a0", "byobnet"),
    ZooModel("mobileone_s0", "byobnet"),
    ZooModel("fastvit_t8", "fastvit"),
    ZooModel("fastvit_mci0", "fastvit (MobileCLIP)"),
    ZooModel("repghostnet_050", "repghost"),
    ZooModel("ghostnetv3_050", "ghostnet"),
    ZooModel("lcnetv2_small", "lcnetv2"),
    ZooModel("nextvit_small", "nextvit"),
    ZooModel("repvit_m0_9", "repvit"),
    ZooModel("efficientvit_m0", "efficientvit_msra"),
    ZooModel("levit_128s", "levit", (("img_size", 64),)),
    ZooModel("levit_conv_128s", "levit (conv)", (("img_size", 64),)),
    ZooModel("tiny_vit_5m_224", "tiny_vit"),
    ZooModel("shvit_s1", "shvit"),
    ZooModel("efficientvim_m1", "efficientvim"),
    ZooModel("iformer_t", "iformer"),
)
BY_NAME = {m.name: m for m in ZOO}

#: families asked for that this timm lacks: name -> reason (none in timm 1.0.31)
ABSENT: dict[str, str] = {}

#: (model, exporter) -> what onnxrep leaves over compared with the deploy export (node counts:
#: optimized training export minus deploy export); the cases tests/test_zoo.py marks
#: xfail(strict=True). Regenerate with ``python benchmarks/zoo.py`` (ZOO.md, "left over").
KNOWN_MISSES: dict[tuple[str, str], str] = {}


def absent_models() -> dict[str, str]:
    """Zoo names this timm does not have (name -> reason), with :data:`ABSENT`."""
    timm = import_timm()
    have = set(timm.list_models())
    missing = {m.name: f"not in timm {timm.__version__}" for m in ZOO if m.name not in have}
    return {**ABSENT, **missing}


# --------------------------------------------------------------------------------------------
# building
# --------------------------------------------------------------------------------------------


def randomize(model, seed: int = SEED):
    """Give ``model`` random BatchNorm statistics and affine parameters and random layer scales,
    in place (returns it), so that folding them is not the identity: running_mean ~ N(0, 0.1^2),
    running_var ~ U(0.5, 2), weight ~ U(0.5, 1.5) with a random sign, bias ~ N(0, 0.1^2);
    layer scales (parameters named ``gamma``, ``layer_scale*``, ``ls*``, typically 1e-5 at
    init) ~ U(0.5, 1.5) with a random sign. Scales of magnitude about 1 keep the activations of a
    deep network of the same order from end to end."""
    import torch

    g = torch.Generator().manual_seed(seed)

    def uniform(t, lo, hi):
        return lo + (hi - lo) * torch.rand(t.shape, generator=g, dtype=torch.float64)

    def signed(t):
        sign = torch.where(torch.rand(t.shape, generator=g) < 0.5, -1.0, 1.0).double()
        return (uniform(t, 0.5, 1.5) * sign).to(t.dtype)

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                if module.running_mean is not None:
                    module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=g))
                    module.running_var.copy_(uniform(module.running_var, 0.5, 2.0))
                if module.weight is not None:
                    module.weight.copy_(signed(module.weight))
                    module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=g))
        for name, param in model.named_parameters():
            if is_layer_scale(name):
                param.copy_(signed(param))
    return model


def is_layer_scale(name: str) -> bool:
    """A parameter name of a layer scale (timm: ``gamma``, ``layer_scale``, ``layer_scale_1``,
    ``ls1.gamma``, ...), not a norm's affine weight."""
    parts = name.split(".")
    leaf = parts[-1]
    return (
        leaf == "gamma"
        or leaf.startswith("layer_scale")
        or (leaf.startswith("ls") and leaf[2:].isdigit())
        or any(p.startswith("layer_scale") or (p.startswith("ls") and p[2:].isdigit()) for p in parts[:-1])
    )


def build(name: str, seed: int = SEED):
    """The training form of zoo model ``name``: created with random weights (seeded), randomized
    (:func:`randomize`), in eval mode."""
    import torch

    timm = import_timm()
    spec = BY_NAME[name]
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **dict(spec.kwargs))
    return randomize(model, seed).eval()


def deploy_form(model):
    """``timm.utils.reparameterize_model`` of a copy of ``model``, in eval mode."""
    timm = import_timm()
    return timm.utils.reparameterize_model(copy.deepcopy(model)).eval()


def example_input(name: str, seed: int = SEED) -> np.ndarray:
    """The seeded standard-normal input (float32, batch 1) of zoo model ``name``."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal(BY_NAME[name].shape).astype(np.float32)


# --------------------------------------------------------------------------------------------
# exporting
# --------------------------------------------------------------------------------------------


from torch_export import quiet  # noqa: E402  (the exporters silenced, as the other export tests do)


def export(module, x: np.ndarray, path: pathlib.Path | str, exporter: str) -> pathlib.Path:
    """Export ``module`` on input ``x`` to ``path`` with ``exporter`` (one of :data:`EXPORTERS`);
    graph input ``x``, output ``y``. Returns the path."""
    import torch

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    args = (torch.from_numpy(x),)
    with quiet(), torch.no_grad():
        if exporter == DYNAMO:
            torch.onnx.export(module, args, str(path), dynamo=True, input_names=["x"], output_names=["y"], verbose=False)
        elif exporter in (TORCHSCRIPT, TORCHSCRIPT_NOFOLD):
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamo=False,
                do_constant_folding=exporter == TORCHSCRIPT,
                input_names=["x"],
                output_names=["y"],
                opset_version=TORCHSCRIPT_OPSET,
                verbose=False,
            )
        else:
            raise ValueError(f"unknown exporter {exporter!r}; one of {', '.join(EXPORTERS)}")
    return path


def _cache_key(name: str, exporter: str, seed: int) -> dict:
    import onnx
    import torch

    timm = import_timm()
    spec = BY_NAME[name]
    return {
        "model": name,
        "exporter": exporter,
        "seed": seed,
        "shape": list(spec.shape),
        "kwargs": dict(spec.kwargs),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "onnx": onnx.__version__,
    }


class Builder:
    """Builds each zoo model (and its deploy form) once and exports each (model, exporter) once
    into ``folder`` (``folder/<model>/<exporter>-train.onnx`` and ``-deploy.onnx``); an export
    already there from the same model, seed and versions (``<exporter>.json``) is reused."""

    def __init__(self, folder: pathlib.Path | str, seed: int = SEED):
        self.folder = pathlib.Path(folder)
        self.seed = seed
        self._models: dict[str, tuple] = {}

    def models(self, name: str):
        """(training form, deploy form) of zoo model ``name``, built once."""
        if name not in self._models:
            model = build(name, self.seed)
            self._models[name] = (model, deploy_form(model))
        return self._models[name]

    def paths(self, name: str, exporter: str) -> tuple[pathlib.Path, pathlib.Path]:
        """(training export, deploy export) of zoo model ``name`` with ``exporter``, exported if
        not in the folder yet."""
        folder = self.folder / name
        train, deploy = folder / f"{exporter}-train.onnx", folder / f"{exporter}-deploy.onnx"
        stamp = folder / f"{exporter}.json"
        key = _cache_key(name, exporter, self.seed)
        if train.exists() and deploy.exists() and stamp.exists():
            with contextlib.suppress(ValueError, OSError):
                if json.loads(stamp.read_text()) == key:
                    return train, deploy
        model, deployed = self.models(name)
        x = example_input(name, self.seed)
        export(model, x, train, exporter)
        export(deployed, x, deploy, exporter)
        stamp.write_text(json.dumps(key, indent=1))
        return train, deploy


# --------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------

#: relative tolerance of the element-wise comparison, and of its absolute part (times max |ref|)
RTOL = 1e-4
ATOL_OF_MAX = 1e-4


def linear_ops() -> tuple[str, ...]:
    from onnxrep import ops

    return (ops.CONV, ops.GEMM, ops.MATMUL)


def counts(model) -> dict[str, int]:
    """Node counts of ``model``'s main graph: ``linear`` (Conv + Gemm + MatMul), ``bn``
    (BatchNormalization), ``add_mul`` (Add + Sub + Mul + Div), ``nodes`` (all)."""
    from onnxrep import ops

    hist = Counter(n.op_type for n in model.graph.node)
    return {
        "linear": sum(hist[op] for op in linear_ops()),
        "bn": hist[ops.BATCH_NORM],
        "add_mul": sum(hist[op] for op in ops.AFFINE_BINARY_OPS),
        "nodes": sum(hist.values()),
    }


def histogram(model) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def left_over(optimized, deploy) -> str:
    """The ops the optimized model has more of than the deploy export, as ``Op +n`` (most first),
    e.g. ``"BatchNormalization +4, Conv +2"``; ``""`` when none."""
    diff = histogram(optimized)
    diff.subtract(histogram(deploy))
    more = sorted(((n, op) for op, n in diff.items() if n > 0), key=lambda t: (-t[0], t[1]))
    return ", ".join(f"{op} +{n}" for n, op in more)


def reaches_deploy(optimized, deploy) -> bool:
    """No more Conv+Gemm+MatMul and no more BatchNormalization nodes than the deploy export."""
    a, b = counts(optimized), counts(deploy)
    return a["linear"] <= b["linear"] and a["bn"] <= b["bn"]


def run_ort(model, x: np.ndarray) -> np.ndarray:
    """The first output of ``model`` (a ModelProto or a path) on ``x``, in onnxruntime's CPU
    provider with graph optimizations off."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    data = model if isinstance(model, (str, pathlib.Path)) else model.SerializeToString()
    sess = ort.InferenceSession(str(data) if isinstance(data, pathlib.Path) else data, opts, providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    return sess.run(None, {inp.name: x})[0]


def compare(actual: np.ndarray, reference: np.ndarray) -> tuple[bool, float, float]:
    """Element-wise ``|actual - ref| <= RTOL * |ref| + ATOL_OF_MAX * max|ref|``; returns (within,
    max |actual - ref|, the worst element's ratio of its error to its allowance)."""
    a, r = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
    if a.shape != r.shape:
        return False, float("inf"), float("inf")
    err = np.abs(a - r)
    allowed = RTOL * np.abs(r) + ATOL_OF_MAX * float(np.max(np.abs(r)))
    worst = float(np.max(err / np.maximum(allowed, np.finfo(np.float64).tiny)))
    return bool(np.all(err <= allowed)), float(np.max(err)), worst


def skipped_by_condition(report) -> dict[str, int]:
    """``pass/condition -> count`` of the candidates onnxrep's passes declined."""
    out: dict[str, int] = {}
    for p in report.passes:
        for cond, n in p.skipped_by_condition().items():
            out[f"{p.name}/{cond}"] = out.get(f"{p.name}/{cond}", 0) + n
    return dict(sorted(out.items(), key=lambda t: (-t[1], t[0])))


def measure(builder: Builder, name: str, exporter: str) -> dict:
    """Export (or reuse) zoo model ``name`` with ``exporter``, optimize the training export with
    ``onnxrep.optimize`` (defaults, no verification of its own) and compare in onnxruntime:

    ``counts``      {"train", "onnxrep", "deploy"} -> :func:`counts`
    ``exact``       the optimized model's output is within :func:`compare`'s tolerance of the
                    training export's, element by element
    ``max_error``   max |optimized - train|, and ``max_ref`` max |train|
    ``deploy_exact``, ``deploy_max_error``  the same for the deploy export (the reference's sanity)
    ``reaches_deploy``  :func:`reaches_deploy`; ``left_over`` :func:`left_over`
    ``rewritten``, ``skipped`` (:func:`skipped_by_condition`), ``optimize_s``
    and ``optimized``: the optimized ModelProto (not JSON)."""
    import time

    import onnx

    import onnxrep

    train_path, deploy_path = builder.paths(name, exporter)
    train, deploy = onnx.load(str(train_path)), onnx.load(str(deploy_path))
    t0 = time.perf_counter()
    optimized, report = onnxrep.optimize(train_path)
    optimize_s = time.perf_counter() - t0

    x = example_input(name, builder.seed + 1)  # not the export's example input
    ref = run_ort(train, x)
    exact, max_error, worst = compare(run_ort(optimized, x), ref)
    deploy_exact, deploy_error, _ = compare(run_ort(deploy, x), ref)
    return {
        "model": name,
        "exporter": exporter,
        "counts": {"train": counts(train), "onnxrep": counts(optimized), "deploy": counts(deploy)},
        "exact": exact,
        "max_error": max_error,
        "max_ref": float(np.max(np.abs(ref))),
        "worst_ratio": worst,
        "deploy_exact": deploy_exact,
        "deploy_max_error": deploy_error,
        "reaches_deploy": reaches_deploy(optimized, deploy),
        "left_over": left_over(optimized, deploy),
        "rewritten": report.rewritten,
        "skipped": skipped_by_condition(report),
        "optimize_s": round(optimize_s, 3),
        "optimized": optimized,
    }
