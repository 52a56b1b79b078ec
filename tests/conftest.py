"""Tiny models shared by the tests: 32 px images, depth 2, so the whole suite runs on a 2-core CPU."""
import os
import sys

import pytest
import timm
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

NUM_CLASSES = 10


def tiny(name: str = "deit_tiny_patch16_224", *, img_size: int = 32, patch_size: int = 8, depth: int = 2,
         seed: int = 0, **kwargs) -> torch.nn.Module:
    """A freshly initialised small timm model; the seed makes two calls build the same weights."""
    torch.manual_seed(seed)
    kwargs.setdefault("num_classes", NUM_CLASSES)
    return timm.create_model(name, pretrained=False, img_size=img_size, patch_size=patch_size, depth=depth, **kwargs)


@pytest.fixture
def make_model():
    return tiny


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(123)
    return torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, NUM_CLASSES, (4,), generator=g)
