"""Helpers shared by the test modules: the command line run in process, and a deliberately broken
rewrite for the mismatch tests."""

from __future__ import annotations

import numpy as np
from click.testing import CliRunner

from onnxrep import cli


def _runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False)
    except TypeError:  # click >= 8.2 always keeps stderr apart
        return CliRunner()


def invoke(*args):
    """``onnxrep ARGS...`` in process: the result has ``exit_code``, ``stdout`` and ``stderr``."""
    return _runner().invoke(cli.main, [str(a) for a in args], catch_exceptions=False)


def break_parallel_merge(monkeypatch, indices) -> list[str]:
    """Make parallel-merge compute a wrong kernel (x1.001) for the candidates it rewrites at
    ``indices`` (in the order it first rewrites them); returns that order of candidate keys."""
    import onnxrep.passes.parallel_merge as pm

    real = pm.ParallelMerge.rewrite
    seen: list[str] = []

    def rewrite(self, match, view, ctx):
        plan = real(self, match, view, ctx)
        if match.key not in seen:
            seen.append(match.key)
        if seen.index(match.key) in indices:
            weight = plan.nodes[0].inputs[1]
            weight.values = weight.values * np.float32(1.001)
        return plan

    monkeypatch.setattr(pm.ParallelMerge, "rewrite", rewrite)
    return seen
