"""Shared fixtures for the sampler tests: a fresh, test-specific seeded generator."""

import warnings
import zlib

import pytest
import torch


@pytest.fixture
def gen(request) -> torch.Generator:
    """A CPU generator seeded from the test id: fresh per test, deterministic across runs."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def _quiet_diffusers():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*were passed to .* but are not expected.*")
        warnings.filterwarnings("ignore", message="__array_wrap__ must accept context", category=DeprecationWarning)
        yield
