"""The real-model zoo (``tests/zoo_models.py``): timm's re-parameterizable models, exported in
their training form and their deploy form (``timm.utils.reparameterize_model``) with the
TorchScript exporter (constant folding on and off) and the dynamo exporter; onnxrep must take the
training export to the deploy export's counts, exactly.

For every (model, exporter) case, ``onnxrep.optimize`` of the training export

* computes what the training export computes, in onnxruntime (graph optimizations off) on a seeded
  input other than the export's, element by element: ``|a - ref| <= 1e-4 |ref| + 1e-4 max|ref|``.
  The folds are exact in real arithmetic; in float32 they change the order of the sums, and the
  deploy export itself differs from the training export by up to ~1e-5 of max|ref| through these
  networks (ZOO.md) - 1e-4 leaves that a margin of ten and still catches any wrong fold (a wrong
  bias, scale or padding is off by the order of the values themselves). The ``max|ref|`` term
  covers elements that cancel to about zero, whose relative error means nothing;
* has no more Conv+Gemm+MatMul nodes and no more BatchNormalization nodes than the deploy export.

The cases onnxrep does not handle yet are ``zoo_models.KNOWN_MISSES``, each marked
``xfail(strict=True)`` with what is left over: a case that starts to pass fails until its row is
removed (``python benchmarks/zoo.py --print-table`` prints the table as it stands).

By default a fast subset runs (``FAST``: four small models with the TorchScript exporter, one of
them with dynamo too); ``ONNXREP_ZOO=full`` runs every model with every exporter (about an hour on
two cores, a few minutes with ``ONNXREP_ZOO_CACHE=<folder>`` holding the exports of an earlier
run). Each model is built once and each (model, exporter) exported once per session.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import zoo_models as zm  # noqa: E402  (tests/ is on pytest's pythonpath)

zm.ensure_torchvision()
pytest.importorskip("timm")

pytestmark = pytest.mark.zoo

FULL = os.environ.get("ONNXREP_ZOO", "").strip().lower() == "full"

#: the default subset, about a minute of CPU time on two cores: RepVGG (parallel-merge), FastViT
#: (RepMixer, layer scales, large kernels), LeViT (BatchNorm1d around linear layers) and LCNetV2
#: (reparameterized depthwise-separable blocks), with TorchScript; LCNetV2 with dynamo as well
FAST = (
    ("repvgg_a0", zm.TORCHSCRIPT),
    ("fastvit_t8", zm.TORCHSCRIPT),
    ("levit_128s", zm.TORCHSCRIPT),
    ("lcnetv2_small", zm.TORCHSCRIPT),
    ("lcnetv2_small", zm.DYNAMO),
)

ABSENT = zm.absent_models()
ALL = tuple((m.name, e) for m in zm.ZOO if m.name not in ABSENT for e in zm.EXPORTERS)
CASES = ALL if FULL else tuple(c for c in FAST if c[0] not in ABSENT)


def case_params():
    for model, exporter in CASES:
        marks = []
        if (model, exporter) in zm.KNOWN_MISSES:
            marks.append(pytest.mark.xfail(strict=True, reason=zm.KNOWN_MISSES[(model, exporter)]))
        yield pytest.param(model, exporter, id=f"{model}-{exporter}", marks=marks)


@pytest.fixture(scope="session")
def zoo_builder(tmp_path_factory):
    """Exports into the session's temporary folder, or into ``ONNXREP_ZOO_CACHE`` when set (kept
    across sessions, shared with ``benchmarks/zoo.py --cache``; reused only for the same model,
    seed and versions)."""
    folder = os.environ.get("ONNXREP_ZOO_CACHE")
    return zm.Builder(folder if folder else tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="session")
def zoo_results(zoo_builder):
    """(model, exporter) -> zm.measure(...), each case measured once per session."""
    cache: dict[tuple[str, str], dict] = {}

    def get(model: str, exporter: str) -> dict:
        if (model, exporter) not in cache:
            cache[(model, exporter)] = zm.measure(zoo_builder, model, exporter)
        return cache[(model, exporter)]

    return get


def describe(r: dict) -> str:
    c = r["counts"]
    return (
        f"Conv+Gemm+MatMul train/onnxrep/deploy {c['train']['linear']}/{c['onnxrep']['linear']}/{c['deploy']['linear']}, "
        f"BN {c['train']['bn']}/{c['onnxrep']['bn']}/{c['deploy']['bn']}; left over: {r['left_over'] or '-'}; "
        f"declined: {dict(list(r['skipped'].items())[:6])}"
    )


@pytest.mark.parametrize("model,exporter", list(case_params()))
def test_zoo_reaches_deploy_form_exactly(model, exporter, zoo_results):
    r = zoo_results(model, exporter)
    assert r["exact"], (
        f"onnxrep changed the output: max error {r['max_error']:.3g} (max|ref| {r['max_ref']:.3g}, "
        f"{r['worst_ratio']:.3g} x the allowance at the worst element)"
    )
    c = r["counts"]
    assert c["onnxrep"]["linear"] <= c["deploy"]["linear"], describe(r)
    assert c["onnxrep"]["bn"] <= c["deploy"]["bn"], describe(r)
    assert r["reaches_deploy"]


@pytest.mark.parametrize("model,exporter", [pytest.param(m, e, id=f"{m}-{e}") for m, e in CASES])
def test_zoo_deploy_export_is_the_reference(model, exporter, zoo_results):
    """The reference is sound: timm's deploy form computes what the training form computes
    (within the same tolerance, in onnxruntime)."""
    r = zoo_results(model, exporter)
    assert r["deploy_exact"], f"deploy export differs from the training export by {r['deploy_max_error']:.3g}"


@pytest.mark.parametrize("model", sorted({m for m, _ in CASES}))
def test_zoo_model_has_something_to_fold(model, zoo_builder):
    """``reparameterize_model`` folds BatchNorm layers of every zoo model in torch (the exporters
    may fold some of them already: TorchScript's constant folding and dynamo fold a BN after a
    conv, which is why the exports' counts can agree)."""
    import torch

    def batch_norms(module) -> int:
        return sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules())

    train, deploy = zoo_builder.models(model)
    assert batch_norms(deploy) < batch_norms(train)


def test_zoo_table_names_real_cases():
    """Every KNOWN_MISSES row names a zoo model and an exporter (a typo would never xfail)."""
    for model, exporter in zm.KNOWN_MISSES:
        assert model in zm.BY_NAME and exporter in zm.EXPORTERS, (model, exporter)


def test_torchvision_imports_after_the_shim():
    """timm imported (through torchvision) with this torch; its classification models build."""
    import torch
    import torchvision  # noqa: F401

    assert zm._has_torchvision_nms(torch)
    assert "repvgg_a0" in zm.import_timm().list_models("repvgg*")
