"""Adversarial use of the plugin API: each case here gave a silently wrong result, a deep traceback or a misleading
message before it was fixed where the value enters. Expected values are computed here, not by the code under test.
"""
import math
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tinymodels import NUM_CLASSES, tiny
from deit_patch.features import FeatureKDError
from deit_patch.masked_teacher import MAX_TAU
from deit_patch.teacher_input import TeacherInputError
from losses import DistillationLoss, MaskedDistillationLoss, soft_kd


def data(batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, NUM_CLASSES, (batch,), generator=g)


def build(criterion=None, teacher=None, student=None, kind="soft", alpha=0.5, tau=1.0, **kwargs):
    student = student if student is not None else tiny(seed=1)
    teacher = teacher if teacher is not None else tiny(seed=2)
    loss = MaskedDistillationLoss(criterion or nn.CrossEntropyLoss(), teacher, kind, alpha, tau, student=student,
                                  **kwargs)
    return student, teacher, loss


def ignore_labels(outputs, labels):
    """A user's base criterion that checks nothing (the loss's own checks must not rely on torch's)."""
    return outputs.sum() * 0


# --- what the call is given ---------------------------------------------------------------------------------
def test_samples_that_are_not_an_image_batch_are_named():
    # Before: "the loss got 3 samples but 4 student outputs" for one (3, H, W) image.
    student, _, crit = build(keep_ratio=1.0)
    x, y = data()
    with pytest.raises(ValueError, match=r"\(B, C, H, W\) image batch.*\(3, 32, 32\)"):
        crit(x[0], student(x), y)


@pytest.mark.parametrize("keep_ratio", [0.5, 1.0])
def test_empty_batch_is_refused(keep_ratio):
    # Before: ZeroDivisionError in the probe's interval (masked) or a NaN loss (unmasked).
    student, _, crit = build(keep_ratio=keep_ratio)
    x, y = data()
    with pytest.raises(ValueError, match="batch is empty.*drop_last"):
        crit(x[:0], student.train()(x[:0]), y[:0])


@pytest.mark.parametrize("outputs", [torch.randn(NUM_CLASSES), torch.randn(4, 1, NUM_CLASSES),
                                     torch.zeros(4, NUM_CLASSES, dtype=torch.long)], ids=["1d", "3d", "int"])
def test_student_outputs_must_be_float_batch_by_class_logits(outputs):
    # Before: torch's "For 1D input, 1D target must have size 1" and the like, from inside the base criterion.
    _, _, crit = build(keep_ratio=1.0)
    x, y = data()
    with pytest.raises(ValueError, match=r"floating-point \(batch, classes\) logits"):
        crit(x, outputs, y)


def test_output_pair_holding_a_non_tensor_is_named():
    _, _, crit = build(keep_ratio=1.0)
    x, y = data()
    with pytest.raises(TypeError, match=r"two tensors, got \(Tensor, NoneType\)"):
        crit(x, (torch.randn(4, NUM_CLASSES), None), y)


@pytest.mark.parametrize("criterion", [nn.CrossEntropyLoss(), ignore_labels], ids=["ce", "custom"])
def test_soft_targets_with_another_class_count_are_refused(criterion):
    # Before: torch's "multi-target not supported", or with a criterion that checks nothing, silently accepted
    # (the logged teacher top-1 then scored the argmax of 7-class targets against 10-class predictions).
    _, _, crit = build(criterion, keep_ratio=1.0)
    x, _ = data()
    with pytest.raises(ValueError, match=r"soft-target labels \(4, 7\).*\(4, 10\).*num_classes"):
        crit(x, torch.randn(4, NUM_CLASSES), torch.rand(4, 7).softmax(1))


def test_labels_for_another_batch_are_refused_even_when_the_criterion_ignores_them():
    _, _, crit = build(ignore_labels, keep_ratio=1.0)
    x, y = data()
    with pytest.raises(ValueError, match=r"labels of shape \(3,\) do not match the batch of 4"):
        crit(x, torch.randn(4, NUM_CLASSES), y[:3])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_batch_reaches_a_float32_teacher(dtype):
    # Before: "Input type (c10::BFloat16) and bias type (float) should be the same" inside the teacher.
    _, teacher, crit = build(keep_ratio=1.0)
    x, _ = data()
    x = x.to(dtype)
    with torch.no_grad():
        want = teacher.eval()(x.float())
    got, keep_idx = crit.masked_teacher(x)
    assert keep_idx is None
    torch.testing.assert_close(got, want)


def test_integer_pixels_are_refused_not_cast():
    # The dtype cast above is for floating batches only: raw uint8 pixels would reach the teacher unnormalised.
    _, _, crit = build(keep_ratio=1.0)
    pixels = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    with pytest.raises(TeacherInputError, match="torch.uint8 images.*normalise"):
        crit.masked_teacher(pixels)


def test_loss_moved_to_double_runs_its_teacher_in_double():
    # Before: "Input type (float) and bias type (double)": crit.double() converted the teacher, not its input.
    student, teacher, crit = build(keep_ratio=1.0)
    crit.double()
    x, y = data()
    with torch.no_grad():
        want = teacher(x.double())
    got, _ = crit.masked_teacher(x)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want)
    assert torch.isfinite(crit(x, student.train()(x), y))


class _HfStyle(nn.Module):
    def __init__(self, wrap):
        super().__init__()
        self.model = tiny(seed=2)
        self.wrap = wrap

    def forward(self, x):
        return self.wrap(self.model(x))


@pytest.mark.parametrize("wrap,kind", [(lambda t: (t,), "tuple"), (lambda t: {"logits": t}, "dict")])
def test_teacher_returning_a_tuple_or_dict_is_named(wrap, kind):
    # Before: AttributeError: 'tuple' object has no attribute 'detach', from the teacher's quality figures.
    _, _, crit = build(teacher=_HfStyle(wrap), keep_ratio=1.0)
    x, y = data()
    with pytest.raises(TypeError, match=rf"teacher _HfStyle returned {kind}, not a logits tensor.*output.logits"):
        crit(x, torch.randn(4, NUM_CLASSES), y)


# --- what the constructor is given --------------------------------------------------------------------------
@pytest.mark.parametrize("bad,match", [
    (dict(teacher="deit_small"), "teacher_model must be an nn.Module.*not str"),
    (dict(student="model"), "student must be an nn.Module.*not str"),
    (dict(criterion=None), "base_criterion=None is not callable"),
])
def test_model_arguments_must_be_modules(bad, match):
    # Before: AttributeError ('str' object has no attribute 'eval') or, for base_criterion=None, accepted until
    # the first call.
    given = {"criterion": nn.CrossEntropyLoss(), "teacher": tiny(seed=2), "student": tiny(seed=1), **bad}
    with pytest.raises(TypeError, match=match):
        MaskedDistillationLoss(given["criterion"], given["teacher"], "soft", 0.5, 1.0, student=given["student"])


@pytest.mark.parametrize("loss_cls", [DistillationLoss, MaskedDistillationLoss])
def test_teacher_that_is_the_student_is_refused(loss_cls):
    # Before: accepted; every step put the teacher, i.e. the student, back in eval mode, so it trained without
    # dropout and (masked) captured no attention.
    student = tiny(seed=1)
    with pytest.raises(ValueError, match="teacher_model is the student itself.*copy of the student"):
        loss_cls(nn.CrossEntropyLoss(), student, "soft", 0.5, 1.0, student=student)


@pytest.mark.parametrize("bad", [True, "0.5"])
def test_keep_ratio_must_be_a_number(bad):
    # Before: keep_ratio=True equalled 1.0 (silently unmasked); '0.5' went through float().
    with pytest.raises(TypeError, match=rf"keep_ratio={bad!r} must be a number"):
        build(keep_ratio=bad)
    _, _, crit = build(keep_ratio=0.5)
    with pytest.raises(TypeError, match=rf"keep_ratio={bad!r} must be a number"):
        crit.set_keep(keep_ratio=bad)
    assert crit.num_keep == 8  # the refused schedule step left the count alone


@pytest.mark.parametrize("tau", ["1.0", 1e4, 1e20])
def test_tau_must_be_a_number_no_larger_than_the_float32_limit(tau):
    # Before: '1.0' went through float(); tau=1e5 gave a negative KD term and 1e20 a NaN loss.
    with pytest.raises(ValueError, match=re.escape(f"tau={tau!r} must be a finite positive temperature <= 1000")):
        build(tau=tau)


def test_the_largest_tau_still_matches_a_float64_kd():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(16, 100, generator=g) * 3, torch.randn(16, 100, generator=g) * 3
    log_s = torch.log_softmax(s.double() / MAX_TAU, 1)
    log_t = torch.log_softmax(t.double() / MAX_TAU, 1)
    want = (log_t.exp() * (log_t - log_s)).sum() / 16 * MAX_TAU ** 2
    got = soft_kd(s, t, tau=MAX_TAU, reduction="batchmean")
    assert abs(float(got) / float(want) - 1) < 0.01


@pytest.mark.parametrize("dtype", [torch.int8, "bfloat16"])
def test_teacher_dtype_must_be_a_floating_dtype(dtype):
    # Before: TypeError from inside nn.Module.to.
    with pytest.raises(TypeError, match="teacher_dtype=.*floating torch.dtype"):
        build(teacher_dtype=dtype)


def test_compile_teacher_must_be_a_bool():
    # Before: bool('no') is True, so the teacher was compiled.
    with pytest.raises(TypeError, match="compile_teacher='no' must be True or False"):
        build(compile_teacher="no")


def test_fallback_guard_without_a_probe_is_refused():
    # Before: accepted, and the guard could never act.
    with pytest.raises(ValueError, match="mask_guard='fallback'.*probe_every=0"):
        build(mask_guard="fallback", probe_every=0)
    build(mask_guard="off", probe_every=0)  # a probe-free run stays possible


def test_vitkd_generator_that_is_not_a_generator_is_named():
    # Before: AttributeError: 'int' object has no attribute 'device', at the first step.
    with pytest.raises(FeatureKDError, match="vitkd_generator=0 must be a torch.Generator"):
        build(feature_kd="vitkd", vitkd_generator=0)


def test_masked_teacher_called_on_a_non_tensor_is_named():
    _, _, crit = build()
    with pytest.raises(TypeError, match=r"images must be a \(B, C, H, W\) tensor, not NoneType"):
        crit.masked_teacher(None)


def test_vitkd_layers_given_as_one_int_is_named():
    with pytest.raises(FeatureKDError, match=r"vitkd_layers=1 must be a tuple of block indices"):
        build(feature_kd="vitkd", vitkd_layers=1)


@pytest.mark.parametrize("bad,match", [(dict(epoch=-1), "epoch=-1 must be a whole number >= 0"),
                                       (dict(warmup_epochs=2.5), "warmup_epochs=2.5 must be a whole number")])
def test_keep_schedule_epochs_must_be_whole_numbers(bad, match):
    # Before: epoch -1 gave keep ratio 1.125 and a warm-up of 2.5 epochs was accepted.
    from deit_patch.masking import scheduled_keep_ratio
    kwargs = {"epoch": 1, "target": 0.5, "warmup_epochs": 4, **bad}
    with pytest.raises(ValueError, match=match):
        scheduled_keep_ratio(kwargs.pop("epoch"), **kwargs)


# --- state and lifecycle ------------------------------------------------------------------------------------
def test_pop_stats_all_reduce_outside_distributed_is_the_plain_figures():
    # Before: "Default process group has not been initialized" from the loss terms (the teacher's were guarded).
    def run(all_reduce):
        student, _, crit = build()
        x, y = data()
        crit(x, student.train()(x), y)
        return crit.pop_stats(all_reduce=all_reduce)
    assert run(True) == run(False)


def test_guard_state_that_is_not_a_dict_is_named():
    _, _, crit = build()
    with pytest.raises(TypeError, match="load_guard_state.*dict guard_state.*not list"):
        crit.load_guard_state([1, 2])


def test_supervision_cost_arguments_are_named():
    _, _, crit = build()
    with pytest.raises(ValueError, match=r"img_size=32 must be the input's \(height, width\)"):
        crit.supervision_cost(img_size=32)
    with pytest.raises(TypeError, match="student must be an nn.Module.*not str"):
        crit.supervision_cost(img_size=(32, 32), student="model")
    idle = MaskedDistillationLoss(nn.CrossEntropyLoss(), None, "none", 0.5, 1.0)
    with pytest.raises(ValueError, match="distillation_type='none' no teacher runs"):
        idle.supervision_cost(img_size=(32, 32))


# --- timm's tasks ---------------------------------------------------------------------------------------------
def _task(**kwargs):
    timm_task = pytest.importorskip("deit_patch.timm_task")
    if not timm_task.has_logit_task:
        pytest.skip("this timm has no timm.task")
    student = kwargs.pop("student", None) or tiny(seed=1)
    teacher = kwargs.pop("teacher", None) or tiny(seed=2)
    return timm_task.MaskedLogitDistillationTask(student, teacher, criterion=nn.CrossEntropyLoss(), verbose=False,
                                                 **kwargs).train()


@pytest.mark.parametrize("bad,err,match", [
    (dict(temperature=1e6), ValueError, "temperature=1000000.0 must be a finite positive temperature <= 1000"),
    (dict(keep_ratio=True), TypeError, "keep_ratio=True must be a number"),
    (dict(mask_guard="fallback", probe_every=0), ValueError, "mask_guard='fallback'.*probe_every=0"),
])
def test_timm_task_settings_are_refused_where_they_enter(bad, err, match):
    with pytest.raises(err, match=match):
        _task(**bad)


def test_timm_task_unknown_argument_names_the_task():
    # Before: inspect's bare "got an unexpected keyword argument 'num_classes'".
    with pytest.raises(TypeError, match=r"MaskedLogitDistillationTask: .*'num_classes'.*plus keep_ratio"):
        _task(num_classes=NUM_CLASSES)


def test_timm_task_refuses_a_teacher_that_is_the_student_and_an_empty_batch():
    student = tiny(seed=1)
    with pytest.raises(ValueError, match="teacher is the student itself"):
        _task(student=student, teacher=student)
    task = _task()
    x, y = data()
    with pytest.raises(ValueError, match="empty batch"):
        task(x[:0], y[:0])
    result = _task()(x[:1], y[:1])  # batch size 1 is fine (a fresh task: the refused step left its forward behind)
    assert math.isfinite(float(result["loss"].detach())) and result["num_keep"] == 8


def test_masked_kd_of_a_bf16_batch_equals_the_float32_batch():
    # The cast is exact (bf16 -> fp32), so a bf16 batch and its float32 copy give one loss.
    student, _, crit = build(keep_ratio=1.0)
    x, y = data()
    xb = x.bfloat16()
    logits = torch.randn(4, NUM_CLASSES)
    got = crit(xb, logits, y)
    want = crit(xb.float(), logits, y)
    torch.testing.assert_close(got, want)
    teacher_logits = crit.masked_teacher.teacher(xb.float())
    kd = F.kl_div(F.log_softmax(logits, 1), F.log_softmax(teacher_logits, 1), reduction="sum", log_target=True)
    torch.testing.assert_close(want, 0.5 * F.cross_entropy(logits, y) + 0.5 * kd / logits.numel())
