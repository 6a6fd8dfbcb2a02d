"""Shared test paths and fixtures. The ADM reference fixtures (data produced by guided-diffusion, see their README) live in
the repository, so a fresh clone tests with nothing beside it."""

from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "adm"


import pytest  # noqa: E402


@pytest.fixture
def one_thread():
    """One torch thread for the test (small networks: one thread is fastest, and several threads stall badly on a
    loaded 2-core machine); modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
