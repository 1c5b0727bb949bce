"""onnxrep: fold the training-time branches of re-parameterizable CNNs in exported ONNX models
into their single-path deploy form, exactly.

>>> import onnxrep
>>> model, report = onnxrep.optimize("repvgg_train.onnx")
"""

from __future__ import annotations

__version__ = "0.1.0"

from .api import optimize, verify  # noqa: E402
from .errors import InputError, OnnxrepError, UsageError, VerificationError  # noqa: E402

__all__ = ["optimize", "verify", "OnnxrepError", "InputError", "UsageError", "VerificationError", "__version__"]
