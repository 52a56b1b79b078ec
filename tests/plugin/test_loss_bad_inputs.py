"""Bad input at the loss level: each case gets its own error class and a message naming the value and the fix.

Each test here went wrong on the code before issue 12 (accepted silently, wrong value, or an unrelated exception).
"""
import math

import pytest
import torch
import torch.nn as nn

from tinymodels import tiny
from deit_patch.capture import CaptureError
from deit_patch.teacher_input import InputRenorm, TeacherInputError
from losses import DistillationLoss, MaskedDistillationLoss


def _teacher(**kwargs):
    return tiny("deit_small_patch16_224", seed=2, **kwargs)


@pytest.mark.parametrize("tau", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("loss_cls", [DistillationLoss, MaskedDistillationLoss])
def test_non_finite_tau_is_refused(tau, loss_cls):
    # Before: NaN passed `tau <= 0` and every KD term became NaN, later blamed on the learning rate.
    with pytest.raises(ValueError, match=rf"tau={tau}.*finite positive"):
        loss_cls(nn.CrossEntropyLoss(), _teacher(), "soft", 0.5, tau)


def test_num_keep_as_string_is_a_type_error():
    # Before: "num_keep=16 is outside [1, 16]" -- a range complaint about a value that is in range.
    with pytest.raises(TypeError, match=r"num_keep='16'.*int.*not str"):
        MaskedDistillationLoss(nn.CrossEntropyLoss(), _teacher(), "soft", 0.5, 1.0, student=tiny(), num_keep="16",
                               keep_ratio=None)


def test_grayscale_student_against_rgb_teacher_is_refused_at_construction():
    # Before: accepted; the first step failed inside the teacher's patch convolution.
    student = tiny(in_chans=1)
    with pytest.raises(TeacherInputError, match=r"student takes 1-channel.*takes 3"):
        MaskedDistillationLoss(nn.CrossEntropyLoss(), _teacher(), "soft", 0.5, 1.0, student=student)


def test_grayscale_batch_to_rgb_teacher_names_the_shape():
    # No student to compare with (random masking needs none): the batch itself is checked.
    crit = MaskedDistillationLoss(nn.CrossEntropyLoss(), _teacher(), "soft", 0.5, 1.0, mask_mode="random",
                                  keep_ratio=0.5)
    gray = torch.randn(2, 1, 32, 32)
    logits = torch.randn(2, 10)
    with pytest.raises(TeacherInputError, match=r"3-channel images but the batch has shape \(2, 1, 32, 32\)"):
        crit(gray, logits, torch.tensor([0, 1]))


def test_renorm_does_not_broadcast_one_channel_to_three():
    # Before: addcmul broadcast (B, 1, H, W) against 3-channel statistics into a (B, 3, H, W) batch, silently.
    renorm = InputRenorm(student=((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), teacher=((0.485, 0.456, 0.406),
                                                                          (0.229, 0.224, 0.225)))
    assert renorm.active
    assert renorm(torch.zeros(1, 3, 4, 4)).shape == (1, 3, 4, 4)
    with pytest.raises(TeacherInputError, match=r"shape \(1, 1, 4, 4\).*3 channels"):
        renorm(torch.zeros(1, 1, 4, 4))


def test_loss_after_remove_hooks_says_so(batch):
    # Before: AttributeError: 'NoneType' object has no attribute 'take'.
    x, y = batch
    student = tiny()
    crit = MaskedDistillationLoss(nn.CrossEntropyLoss(), _teacher(), "soft", 0.5, 1.0, student=student)
    crit.remove_hooks()
    student.train()
    with pytest.raises(CaptureError, match=r"remove_hooks\(\).*mask_mode='attention'.*new MaskedDistillationLoss"):
        crit(x, student(x), y)


def test_random_masking_still_works_after_remove_hooks(batch):
    # The refusal is about attention scores only: a mode that needs none keeps working.
    x, y = batch
    student = tiny()
    crit = MaskedDistillationLoss(nn.CrossEntropyLoss(), _teacher(), "soft", 0.5, 1.0, student=student,
                                  mask_mode="random")
    crit.remove_hooks()
    assert torch.isfinite(crit(x, student(x), y))
