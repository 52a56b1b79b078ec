"""A loss that is copied, pickled, or fed more student forwards than loss calls: each case here gave a misleading
error or a silently wrong mask before it was fixed. Expected values come from the original loss, not the copy.
"""
import copy
import io
import warnings

import pytest
import torch
import torch.nn as nn

from tinymodels import NUM_CLASSES, tiny
from deit_patch.capture import CaptureWarning
from losses import MaskedDistillationLoss


def data(batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, NUM_CLASSES, (batch,), generator=g)


def build(**kwargs):
    student, teacher = tiny(seed=1), tiny(seed=2)
    return student, teacher, MaskedDistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", 0.5, 1.0,
                                                    student=student, **kwargs)


@pytest.mark.parametrize("options", [dict(), dict(mask_mode="teacher"),
                                     dict(feature_kd="vitkd", vitkd_alpha=1.0, vitkd_beta=1.0)],
                         ids=["attention", "teacher", "vitkd"])
def test_deep_copied_loss_reads_the_same_student(options):
    # Before: the copy hooked a copy of the student nobody runs ("no student attention was captured").
    if "feature_kd" in options:
        options["vitkd_generator"] = torch.Generator().manual_seed(0)
    student, _, crit = build(**options)
    twin = copy.deepcopy(crit)
    x, y = data()
    out = student.train()(x)
    want, got = crit(x, out, y), twin(x, out, y)
    torch.testing.assert_close(got, want)
    assert torch.equal(twin.last_keep_idx, crit.last_keep_idx)
    del twin  # the copy's hooks go with it; the original keeps working
    assert torch.isfinite(crit(x, student(x), y))


def test_two_student_forwards_before_one_loss_call_are_reported():
    # Before: silent; model(view1), model(view2), criterion(view1, out1, y) masked view1 with view2's attention.
    student, _, crit = build()
    x, y = data()
    out = student.train()(x)
    student(data(seed=1)[0])
    with pytest.warns(CaptureWarning, match="more than one training forward.*right after the forward") as caught:
        crit(x, out, y)
    assert caught[0].filename == __file__  # it points at the user's loss call, not inside the plugin
    with warnings.catch_warnings():
        warnings.simplefilter("error", CaptureWarning)  # one forward per call is silent again
        crit(x, student(x), y)
        with torch.no_grad():
            student(x)  # an extra forward without grad is never read
        crit(x, student(x), y)


def test_pickling_the_loss_says_what_to_checkpoint():
    # Before: "Can't pickle local object '_is_timm.<locals>.matches'".
    _, _, crit = build()
    with pytest.raises(TypeError, match=r"cannot be pickled.*state_dict\(\).*guard_state\(\)"):
        torch.save(crit, io.BytesIO())


def test_restored_guard_switch_is_the_one_the_run_made():
    # Before: a checkpoint whose run fell back to the full teacher resumed on random masks (this loss's own
    # guard_fallback) while guard_state() still said 'none'.
    student, _, crit = build(mask_guard="fallback", guard_fallback="random")
    switched = {"from": "attention", "to": "none", "at_step": 3, "window": {}}
    crit.load_guard_state({"action": "fallback", "fallback": "full", "fired": {}, "switched": switched})
    assert crit.masked_teacher.mask_mode == "none" and crit.guard_state()["switched"] == switched
    x, y = data()
    crit(x, student.train()(x), y)
    assert crit.last_keep_idx is None  # the full teacher, as the run had switched to
    other = build(mask_guard="fallback")[2]
    with pytest.raises(ValueError, match="switch goes to 'teacher'"):
        other.load_guard_state({"fired": {}, "switched": {**switched, "to": "teacher"}})


def test_keep_schedule_after_a_switch_to_the_full_teacher_keeps_running():
    # Before: the next epoch's set_keep raised "needs a loss built with masking" and stopped the run.
    student, _, crit = build(mask_guard="fallback", guard_fallback="full")
    crit.masked_teacher.apply_fallback()
    crit.set_keep(num_keep=4)
    x, y = data()
    crit(x, student.train()(x), y)
    assert crit.last_keep_idx is None  # the guard's switch stands
    with pytest.raises(ValueError, match="num_keep=99 is outside"):
        crit.set_keep(num_keep=99)  # still checked


def test_deep_copied_timm_task_reads_its_own_student_copy():
    # Before: the copy's hook stayed on the original student, so the copied task's first step found no attention.
    timm_task = pytest.importorskip("deit_patch.timm_task")
    if not timm_task.has_logit_task:
        pytest.skip("this timm has no timm.task")
    task = timm_task.MaskedLogitDistillationTask(tiny(seed=1), tiny(seed=2), criterion=nn.CrossEntropyLoss(),
                                                 verbose=False).train()
    twin = copy.deepcopy(task)
    x, y = data()
    torch.testing.assert_close(twin(x, y)["loss"], task(x, y)["loss"])
    assert torch.equal(twin.masked_teacher.last_step.keep_idx, task.masked_teacher.last_step.keep_idx)
