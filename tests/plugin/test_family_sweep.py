"""Every timm family the coverage command lists distils unmasked through the loss, as DeiT's loss runs it.

One tiny build per family (deit_patch/tiny_builds.py). The few families whose smallest build is still tens of
millions of weights run only with MASKEDKD_FULL_SWEEP=1. A family this timm lacks, or cannot build with the
table's arguments (written for timm 1.0.x), is skipped saying so.
"""
import os

import pytest
import timm
import torch
import torch.nn as nn

from tinymodels import NUM_CLASSES, tiny
from deit_patch import layout
from deit_patch.teachers import UnsupportedTeacherError, find_family, require_family
from deit_patch.tiny_builds import TINY_BUILDS, build_tiny
from losses import MaskedDistillationLoss

FULL = os.environ.get("MASKEDKD_FULL_SWEEP") == "1"
FAMILIES = [key for key, entry in TINY_BUILDS.items() if FULL or not entry.slow]
STATS = dict(teacher_mean=(0.5,) * 3, teacher_std=(0.5,) * 3, student_mean=(0.5,) * 3, student_std=(0.5,) * 3)


def teacher_for(family: str) -> nn.Module:
    entry = TINY_BUILDS[family]
    if not timm.list_models(entry.model):
        pytest.skip(f"timm {timm.__version__} has no {entry.model}")
    try:
        return build_tiny(entry)
    except Exception as err:
        pytest.skip(f"timm {timm.__version__} cannot build the tiny {family}: {type(err).__name__}: {err}")


def student_for(img: int) -> nn.Module:
    return tiny("deit_tiny_patch16_224", img_size=img, patch_size=img // 4, seed=1)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_distils_unmasked(family, request):
    teacher = teacher_for(family)
    img = TINY_BUILDS[family].img
    if layout.built_image_size(teacher) not in (None, (img, img)):
        pytest.skip(f"timm {timm.__version__} builds the tiny {family} for {layout.built_image_size(teacher)} px")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 3, img, img, generator=g), torch.randint(0, NUM_CLASSES, (2,), generator=g)
    try:
        with torch.no_grad():
            out = teacher(x)
    except Exception as err:  # the model's own forward, before any plugin code (TResNet on timm 0.4 needs InplaceABN)
        pytest.skip(f"the tiny {family}'s own forward fails on timm {timm.__version__}: {type(err).__name__}: {err}")
    student = student_for(img)
    if not isinstance(out, torch.Tensor) or out.shape != (2, NUM_CLASSES):
        # an encoder (num_classes=0): no logits to distil, and the loss says so before any step
        with pytest.raises(ValueError, match="classes"):
            MaskedDistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", 0.5, 1.0, student=student,
                                   keep_ratio=1.0, **STATS)
        return
    loss_fn = MaskedDistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", 0.5, 1.0, student=student,
                                     keep_ratio=1.0, **STATS)
    assert not loss_fn.masking
    loss = loss_fn(x, student.train()(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    if find_family(teacher) is None:  # the refusal to mask names the structure and the unmasked way
        with pytest.raises(UnsupportedTeacherError, match=r"cannot be masked: .+keep_ratio=1\.0.+as DeiT"):
            require_family(teacher)
