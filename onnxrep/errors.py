"""Errors that the command line reports as one line, without a traceback."""


class OnnxrepError(Exception):
    """A failure the user can act on; ``str(err)`` is the whole message."""


class InputError(OnnxrepError):
    """The input model could not be read or is not a valid ONNX model."""


class VerificationError(OnnxrepError):
    """The optimized model's outputs differ from the original's."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


class UsageError(OnnxrepError, ValueError):
    """An argument or option out of its range; the message names the valid values."""
