"""Fixtures shared by the tests; the tiny models themselves live in tinymodels.py."""
import pytest
import torch

from tinymodels import NUM_CLASSES, tiny


@pytest.fixture
def make_model():
    return tiny


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(123)
    return torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, NUM_CLASSES, (4,), generator=g)
