"""Teacher input re-normalisation against normalising the raw image directly."""
import warnings

import pytest
import torch
import torch.nn as nn

from tinymodels import tiny
from deit_patch.teacher_input import (IMAGENET_STATS, InputRenorm, TeacherInputError, TeacherStatsWarning,
                                      build_renorm)
from losses import DistillationLoss, MaskedDistillationLoss

CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def normalise(raw, stats):
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in stats)
    return (raw - mean) / std


def test_conversion_equals_teacher_normalisation():
    raw = torch.rand(2, 3, 8, 8)
    renorm = InputRenorm(student=IMAGENET_STATS, teacher=CLIP)
    assert renorm.active
    torch.testing.assert_close(renorm(normalise(raw, IMAGENET_STATS)), normalise(raw, CLIP), rtol=1e-5, atol=1e-5)


def test_equal_statistics_is_no_op():
    x = torch.randn(2, 3, 4, 4)
    renorm = InputRenorm(student=IMAGENET_STATS, teacher=IMAGENET_STATS)
    assert not renorm.active and renorm(x) is x


def test_statistics_from_pretrained_cfg_and_overrides():
    student = tiny()                                          # DeiT: ImageNet statistics
    teacher = tiny("vit_small_patch16_224")                   # augreg: 0.5 / 0.5
    # Read from the config, the statistics may describe timm's hub weights rather than the loaded ones: warned.
    with pytest.warns(TeacherStatsWarning, match=r"timm config \(mean=\(0.5, 0.5, 0.5\).*teacher_mean/teacher_std"):
        auto = build_renorm(student=student, teacher=teacher)
    assert auto.teacher == HALF and auto.student == IMAGENET_STATS and auto.active
    with warnings.catch_warnings():
        warnings.simplefilter("error", TeacherStatsWarning)  # stated by the user, or nothing to convert: silent
        explicit = build_renorm(student=student, teacher=teacher, teacher_mean=CLIP[0], teacher_std=CLIP[1])
        assert explicit.teacher == CLIP and explicit.sources[1] == "explicit"
        same = build_renorm(student=student, teacher=teacher, teacher_mean=IMAGENET_STATS[0],
                            teacher_std=IMAGENET_STATS[1])
        assert not same.active
        assert not build_renorm(student=student, teacher=tiny()).active  # a DeiT teacher: ImageNet's, as the student


def test_mismatched_teacher_is_converted_and_reported(batch):
    raw = torch.rand(4, 3, 32, 32)
    x = normalise(raw, IMAGENET_STATS)
    y = batch[1]
    student, teacher = tiny(), tiny("vit_small_patch16_224", seed=4)
    with pytest.warns(TeacherStatsWarning) as caught:
        crit = MaskedDistillationLoss(nn.CrossEntropyLoss(), teacher, "hard", 1.0, 1.0, student=student,
                                      keep_ratio=1.0)
    assert caught[0].filename == __file__  # points at the user's line, not into the plugin
    assert "re-normalising the teacher's input" in crit.describe() and "0.5" in crit.describe()
    with torch.no_grad():
        want_targets = teacher.eval()(normalise(raw, HALF)).argmax(1)
    out = student.train()(x)
    loss = crit(x, out, y)
    torch.testing.assert_close(loss, nn.functional.cross_entropy(out, want_targets))


def test_distillation_loss_converts_only_when_asked():
    student, teacher = tiny(), tiny("vit_small_patch16_224")
    assert DistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", 0.5, 1.0).masked_teacher.renorm is None
    asked = DistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", 0.5, 1.0, student=student,
                             student_mean=IMAGENET_STATS[0], student_std=IMAGENET_STATS[1])
    assert asked.masked_teacher.renorm is not None and asked.masked_teacher.renorm.teacher == HALF


def test_half_given_statistics_are_refused():
    with pytest.raises(TeacherInputError, match="given together"):
        build_renorm(student=None, teacher=nn.Linear(2, 2), teacher_mean=(0.5, 0.5, 0.5))


@pytest.mark.parametrize("stats, match", [
    (dict(teacher_mean=(0.5, 0.5, 0.5), teacher_std=(0.5, float("inf"), 0.5)), "NaN or inf"),
    (dict(teacher_mean=(float("nan"), 0.5, 0.5), teacher_std=(0.5, 0.5, 0.5)), "NaN or inf"),
    (dict(student_mean=(0.5, 0.5, 0.5), student_std=(0.5, 0.5, float("inf"))), "NaN or inf"),
    (dict(teacher_mean=("a", 0.5, 0.5), teacher_std=(0.5, 0.5, 0.5)), "sequences of numbers"),
    (dict(teacher_mean=(0.5, 0.5, 0.5), teacher_std=(0.5, 0.0, 0.5)), "positive"),
])
def test_non_finite_or_non_numeric_statistics_are_refused_by_name(stats, match):
    # An infinite teacher_std used to turn every teacher input into zeros, a NaN mean every logit into NaN.
    student, teacher = tiny(), tiny("vit_small_patch16_224")
    with pytest.raises(TeacherInputError, match=match) as info:
        MaskedDistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", 0.5, 1.0, student=student, **stats)
    assert next(iter(stats)).split("_")[0] in str(info.value)
