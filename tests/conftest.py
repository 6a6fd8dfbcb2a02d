"""Shared test paths and fixtures. The ADM reference fixtures (data produced by guided-diffusion, see their README) live in
the repository, so a fresh clone tests with nothing beside it."""

import os
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


# ``autocast: auto`` (GuidedDiffusion's default) resolves to float32 in the tests, whatever the test machine's CPU, in
# this process, in module-scoped fixtures and in the ``tailgen`` processes tests start: tolerances and golden
# comparisons then hold on every machine. Tests of the detection and of the default opt out with
# ``@pytest.mark.real_hardware``.
os.environ["TAILGEN_FAST_BF16"] = "0"


@pytest.fixture(autouse=True)
def real_hardware(request, monkeypatch):
    """Under ``@pytest.mark.real_hardware`` the bf16 detection sees the machine (``TAILGEN_FAST_BF16`` unset)."""
    if request.node.get_closest_marker("real_hardware") is not None:
        monkeypatch.delenv("TAILGEN_FAST_BF16", raising=False)
