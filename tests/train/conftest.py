"""tests/train: the tensors here are small, so run torch single-threaded (intra-op threads only add
contention on a loaded 2-core CI box); the previous setting is restored after each test."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_threaded_torch():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
