"""Shared test setup, applied before any test module imports torch or triton.

- Triton's interpreter must be chosen before triton is imported (kernels run on the CPU).
- The suite runs under pytest-xdist with one worker per core, so each worker uses one
  intra-op thread; more would oversubscribe CI's two cores.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")


import pytest  # noqa: E402 (after the environment above)


@pytest.fixture
def restore_threads():
    """For tests that call a CLI main() in-process: it may set torch's thread count."""
    import torch

    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (training tests: exact, fast on a shared core)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
