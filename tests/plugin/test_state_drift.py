"""The user's objects change after the loss is built: the loss notices instead of going silently wrong."""
import warnings

import pytest
import torch
import torch.nn as nn

from tinymodels import NUM_CLASSES, tiny
from deit_patch.capture import CaptureError, CaptureWarning
from deit_patch.masked_teacher import TeacherModeWarning
from losses import FeatureHeadsWarning, MaskedDistillationLoss


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, NUM_CLASSES, (4,), generator=g)


def test_teacher_put_in_train_mode_is_put_back_and_said_once():
    student = tiny(seed=1)
    teacher = tiny(seed=2, drop_rate=0.5)  # dropout: in train mode two calls would differ
    crit = MaskedDistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", 0.5, 1.0, student=student, keep_ratio=1.0)
    x, y = data()
    with torch.no_grad():
        want = teacher.eval()(x)
    teacher.train()  # the user's own call, after the loss exists
    with pytest.warns(TeacherModeWarning, match="train mode"):
        got = crit.masked_teacher(x)[0]
    torch.testing.assert_close(got, want)  # dropout off: the eval-mode output
    assert not teacher.training
    teacher.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error", TeacherModeWarning)  # said once, corrected every time
        torch.testing.assert_close(crit.masked_teacher(x)[0], want)


def test_teacher_converted_to_bf16_by_hand_runs_on_its_own_dtype():
    student, twin, teacher = tiny(seed=1), tiny(seed=1), tiny(seed=2)  # twin: the same weights, its own hooks
    reference = MaskedDistillationLoss(nn.CrossEntropyLoss(), tiny(seed=2), "soft", 0.5, 1.0, student=twin,
                                       teacher_dtype=torch.bfloat16)
    teacher.to(torch.bfloat16)  # by hand, without teacher_dtype=
    crit = MaskedDistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", 0.5, 1.0, student=student)
    assert "bfloat16" in crit.describe()
    x, y = data()
    with warnings.catch_warnings():
        warnings.simplefilter("error", CaptureWarning)  # each loss reads its own student's one forward
        torch.manual_seed(0)
        got = crit(x, student(x), y)
        torch.manual_seed(0)
        torch.testing.assert_close(got, reference(x, twin(x), y))  # exactly the declared bf16 path


def test_vitkd_heads_left_out_of_the_optimizer_are_reported():
    def run(with_heads: bool):
        student, teacher = tiny(seed=1), tiny("deit_small_patch16_224", seed=2)  # widths differ: aligners learn
        crit = MaskedDistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", 0.5, 1.0, student=student,
                                      keep_ratio=0.5, feature_kd="vitkd", vitkd_alpha=1.0, vitkd_beta=1.0)
        optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
        if with_heads:
            for group in crit.feature_param_groups(0.0):
                optimizer.add_param_group(group)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(3):
                x, y = data(step)
                loss = crit(x, student.train()(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        return [w for w in caught if issubclass(w.category, FeatureHeadsWarning)]

    missing = run(with_heads=False)
    assert len(missing) == 1 and "feature_param_groups" in str(missing[0].message)
    assert not run(with_heads=True)


@pytest.mark.parametrize("bad", [dict(alpha=float("nan")), dict(vitkd_alpha=float("nan")),
                                 dict(vitkd_beta=float("inf")), dict(vitkd_mask_ratio=float("nan"))])
def test_non_finite_numbers_are_refused_naming_the_argument(bad):
    kwargs = dict(alpha=0.5, feature_kd="vitkd")
    kwargs.update(bad)
    alpha = kwargs.pop("alpha")
    with pytest.raises(ValueError, match=next(iter(bad))):
        MaskedDistillationLoss(nn.CrossEntropyLoss(), tiny(seed=2), "soft", alpha, 1.0, student=tiny(seed=1),
                               **kwargs)


def test_hooked_student_can_be_saved_whole_and_its_copy_leaves_the_loss_alone(tmp_path):
    # torch.save(student) used to fail on the hooks' weak references while the loss (with ViTKD) was attached.
    student, teacher = tiny(seed=1), tiny(seed=2)
    crit = MaskedDistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", 0.5, 1.0, student=student,
                                  keep_ratio=0.5, feature_kd="vitkd", teacher_mean=(0.5,) * 3, teacher_std=(0.5,) * 3,
                                  student_mean=(0.5,) * 3, student_std=(0.5,) * 3)
    x, y = data()
    torch.save(student, tmp_path / "student.pt")
    loaded = torch.load(tmp_path / "student.pt", weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), student.eval()(x))
    loaded.train()(x)  # the saved copy's hooks are inert: nothing reaches the live loss
    with pytest.raises(CaptureError, match="no student attention was captured"):
        crit(x, torch.zeros(4, NUM_CLASSES), y)
    loss = crit(x, student.train()(x), y)  # the live student's hooks still work
    assert torch.isfinite(loss) and crit.last_step.keep_idx.shape == (4, 8)
