"""Test-wide set-up: Triton kernels run through the interpreter on the CPU, float64 by default off."""

import os

# Must be set before any @triton.jit decorator runs, i.e. before kernels/ is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
