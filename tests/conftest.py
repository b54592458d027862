import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True, scope="session")
def _one_thread_torch():
    """Tests run one torch thread: results do not depend on the core count, and runs stay steady."""
    import torch

    torch.set_num_threads(1)
    yield
