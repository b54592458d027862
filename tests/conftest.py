import os

from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

EMPTY_PARAMS = str(Path(__file__).parent / "empty-params.yaml")  # `--params` that gives no defaults


@pytest.fixture(autouse=True, scope="session")
def _one_thread_torch():
    """Tests run one torch thread: results do not depend on the core count, and runs stay steady."""
    import torch

    torch.set_num_threads(1)
    yield
