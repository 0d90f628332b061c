"""Test-session set-up that must happen before any test module imports Triton."""

import os

import torch

# Without a GPU, Triton kernels run in its interpreter. The variable is read when a kernel is
# defined, and compressed-tensors (imported by some test modules) defines kernels at import, so
# it must be set before collection, whatever order the modules are collected in.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
