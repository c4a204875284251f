"""squeeze: compress ONNX models with verified graph rewrites, compile with Apache TVM, measure the gain."""
__version__ = "0.1.0"

from .errors import SqueezeError  # noqa: E402
from .registry import register_pass, register_target  # noqa: E402


def compress(*args, **kwargs):
    """See `squeeze.api.compress`."""
    from .api import compress as _compress  # noqa: PLC0415
    return _compress(*args, **kwargs)


__all__ = ["compress", "register_pass", "register_target", "SqueezeError", "__version__"]
