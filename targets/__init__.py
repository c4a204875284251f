"""Targets: one module per target, registered by decorator; imported explicitly here."""
from . import cpu  # noqa: F401
from . import arm, gpu, mcu, mobile_gpu  # noqa: F401
