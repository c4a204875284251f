"""Targets: one module per target, registered by decorator; imported explicitly here."""
from . import cpu  # noqa: F401
