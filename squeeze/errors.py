"""User-facing errors. The CLI prints the message on one line and exits 2; tracebacks only with --debug."""


class SqueezeError(Exception):
    """An error caused by the user's input or environment; the message says what to do about it."""


class ModelLoadError(SqueezeError):
    """The model file is missing, not ONNX, corrupt, or fails the ONNX checker."""


class SpecError(SqueezeError):
    """A --passes / --target spec names something unknown or has a bad parameter."""


class DataError(SqueezeError):
    """Calibration or evaluation data does not match the model's inputs."""


class PassError(SqueezeError):
    """A pass failed or produced a model that does not verify; the last good model is kept."""


class TargetError(SqueezeError):
    """A target cannot build or measure (missing toolchain, unsupported op, ...)."""


class OutputError(SqueezeError):
    """The output directory cannot be written safely."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message (its type's name when empty), for one-line errors."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[0] if lines else type(exc).__name__)[:limit]
