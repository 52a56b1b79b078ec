"""Fixtures the application's tests share."""
import pytest

from tinymodels import save_tiny_teacher


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    """A tiny deit_small teacher checkpoint (10 classes), written once per test module."""
    return save_tiny_teacher(tmp_path_factory.mktemp("teacher") / "teacher.pth", num_classes=10)
