"""The benchmark families of ``models/``: training and deploy forms compute the same function, and
onnxrep turns the training form into the deploy form's op counts and multiply-accumulates (the
claim the benchmarks measure), at a small resolution and width. ``resrep-pruned`` needs the pruning
passes: half of every compactor's rows are zero there, and its deploy form has half the channels."""

from __future__ import annotations

import pytest

import onnxrep
from onnxrep.cost import model_cost
from onnxrep.equivalence import compare
from onnxrep.graph import op_histogram
from onnxrep.models import BUILDERS

COMPUTE = ("Conv", "Gemm", "MatMul")


@pytest.mark.parametrize("family", list(BUILDERS))
def test_family_optimizes_to_its_deploy_form(family):
    kw = dict(resolution=64, width_scale=0.25, seed=3)
    train, deploy = BUILDERS[family](deploy=False, **kw), BUILDERS[family](deploy=True, **kw)
    assert compare(train, deploy, seeds=1).ok
    out, report = onnxrep.optimize(train, verify=True, seeds=1)
    assert compare(out, deploy, seeds=1).ok
    ops, want = op_histogram(out), op_histogram(deploy)
    assert {k: ops.get(k, 0) for k in COMPUTE} == {k: want.get(k, 0) for k in COMPUTE}, report.to_dict()
    # never more than the hand-built deploy form (FastViT's deploy keeps its layer scales as Mul nodes)
    assert model_cost(out).macs <= model_cost(deploy).macs
    assert model_cost(out).params <= model_cost(deploy).params
