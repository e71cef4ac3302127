"""Test-wide set-up: Triton kernels run through the interpreter on the CPU, float64 by default off."""

import os

# Must be set before any @triton.jit decorator runs, i.e. before kernels/ is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# The machine's default; entry points run in-process change it (`run.threads`, `--threads`).
THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Every test starts from seed 0 and gives torch's thread count back as the session started it,
    so a test that ran an entry point with `--threads 1` does not leave later modules on one core."""
    torch.manual_seed(0)
    yield
    torch.set_num_threads(THREADS)
