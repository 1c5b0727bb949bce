"""onnxrep: fold the training-time branches of re-parameterizable CNNs in exported ONNX models
into their single-path deploy form, exactly.

>>> import onnxrep
>>> model, report = onnxrep.optimize("repvgg_train.onnx")
>>> onnxrep.save(model, "repvgg_deploy.onnx")

The public API: :func:`optimize`, :func:`verify`, :func:`load`, :func:`save`, the
:class:`Report` that ``optimize`` returns, :class:`Progress` events, and the errors
(:class:`UsageError`, a ``ValueError``; :class:`InputError`; :class:`VerificationError`). Log
records go to ``logging.getLogger("onnxrep")``.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import sys
from pathlib import Path

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())


class _SourceTreeFinder(importlib.abc.MetaPathFinder):
    """Finds ``onnxrep.passes`` and ``onnxrep.models`` in a source checkout, where they are the
    top-level ``passes/`` and ``models/`` folders beside ``onnxrep/`` (pyproject's package-dir),
    so that ``import onnxrep`` works from the repository root without an install. Asked only after
    every other finder (an installed or editable package is found as usual), and for these two
    names only: nothing else of the checkout becomes importable."""

    def __init__(self, folders: dict[str, Path]):
        self.folders = folders

    def find_spec(self, fullname, path=None, target=None):
        folder = self.folders.get(fullname)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(
            fullname, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )


def _source_tree_finder() -> None:
    here = Path(__file__).resolve().parent
    folders = {
        f"{__name__}.{sub}": here.parent / sub
        for sub in ("passes", "models")
        if not (here / sub).is_dir() and (here.parent / sub / "__init__.py").is_file()
    }
    if folders and not any(isinstance(f, _SourceTreeFinder) for f in sys.meta_path):
        sys.meta_path.append(_SourceTreeFinder(folders))


_source_tree_finder()

from .api import Progress, Report, load, optimize, save, verify  # noqa: E402
from .equivalence import VerifyResult  # noqa: E402
from .errors import InputError, OnnxrepError, UsageError, VerificationError  # noqa: E402

__all__ = [
    "optimize",
    "verify",
    "load",
    "save",
    "Report",
    "Progress",
    "VerifyResult",
    "OnnxrepError",
    "InputError",
    "UsageError",
    "VerificationError",
    "__version__",
]
