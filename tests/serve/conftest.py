"""Fixtures for the generation tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    # tiny models: a second intra-op thread only adds synchronisation, which stalls badly on a busy machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
