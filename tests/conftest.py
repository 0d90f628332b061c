"""Test-session set-up that must happen before any test module imports Triton."""

import os
import tempfile

import pytest
import torch

# Without a GPU, Triton kernels run in its interpreter. The variable is read when a kernel is
# defined, and compressed-tensors (imported by some test modules) defines kernels at import, so
# it must be set before collection, whatever order the modules are collected in.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Skeleton cache (mxptq.skeleton.load_skeleton) of this session only: nothing lands in ~/.cache.
os.environ.setdefault("MXPTQ_CACHE_DIR", tempfile.mkdtemp(prefix="mxptq-test-cache-"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: on a 2-core machine a second intra-op thread mostly waits, and under load
    it made these modules many times slower. Modules opt in with `usefixtures`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
