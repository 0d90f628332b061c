"""Checkpoint dialects (compressed-tensors, ModelOpt, native), their writers and readers."""

from .dialects import DIALECTS, get_dialect
from .reader import checkpoint_format, read_checkpoint, read_dense

__all__ = ["DIALECTS", "checkpoint_format", "get_dialect", "read_checkpoint", "read_dense"]
