"""The loss against DeiT's formulas written out here, and every bad input it must refuse."""
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from tinymodels import NUM_CLASSES, tiny
from deit_patch.capture import CaptureError
from deit_patch.teachers import UnsupportedTeacherError
from losses import DistillationLoss, MaskedDistillationLoss


def deit_soft_numel(s, t, tau):
    # DeiT's losses.py formula: KL summed, times T^2, over the number of logits.
    return F.kl_div(F.log_softmax(s / tau, 1), F.log_softmax(t / tau, 1), reduction="sum", log_target=True) \
        * tau * tau / s.numel()


def paper_soft_batchmean(s, t, tau):
    # The MaskedKD code's: probabilities as target, batch mean, times T^2.
    return F.kl_div(F.log_softmax(s / tau, 1), F.softmax(t / tau, 1), reduction="batchmean") * tau * tau


def expected(kind, reduction, student_out, teacher_logits, labels, alpha, tau):
    cls_out, kd_out = student_out if isinstance(student_out, tuple) else (student_out, student_out)
    base = F.cross_entropy(cls_out, labels)
    if kind == "hard":
        kd = F.cross_entropy(kd_out, teacher_logits.argmax(1))
    elif reduction == "numel":
        kd = deit_soft_numel(kd_out, teacher_logits, tau)
    else:
        kd = paper_soft_batchmean(kd_out, teacher_logits, tau)
    return (1 - alpha) * base + alpha * kd


@pytest.mark.parametrize("kind,reduction", [("soft", "numel"), ("soft", "batchmean"), ("hard", "numel")])
@pytest.mark.parametrize("distilled", [False, True])
@pytest.mark.parametrize("loss_cls", ["plain", "keep1", "mode_none"])
def test_unmasked_equals_deit_formulas(kind, reduction, distilled, loss_cls, batch):
    x, y = batch
    name = "deit_tiny_distilled_patch16_224" if distilled else "deit_tiny_patch16_224"
    student = tiny(name, seed=1)
    if distilled and hasattr(student, "set_distilled_training"):  # timm < 0.6 always trains with both heads
        student.set_distilled_training(True)
    teacher = tiny("deit_small_patch16_224", seed=2)
    alpha, tau = 0.3, 2.5
    args = (nn.CrossEntropyLoss(), teacher, kind, alpha, tau)
    if loss_cls == "plain":
        crit = DistillationLoss(*args, kd_reduction=reduction)
    elif loss_cls == "keep1":
        crit = MaskedDistillationLoss(*args, student=student, keep_ratio=1.0, kd_reduction=reduction)
    else:
        crit = MaskedDistillationLoss(*args, student=student, keep_ratio=0.5, mask_mode="none", kd_reduction=reduction)
    student.train()
    out = student(x)
    assert isinstance(out, tuple) == distilled
    with torch.no_grad():
        t_logits = teacher.eval()(x)
    want = expected(kind, reduction, out, t_logits, y, alpha, tau)
    got = crit(x, out, y)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if loss_cls != "plain":
        assert crit.last_keep_idx is None  # unmasked: the teacher ran on every patch


def test_masked_uses_pruned_teacher_and_records_indices(batch):
    x, y = batch
    student, teacher = tiny(seed=1), tiny("deit_small_patch16_224", seed=2)
    crit = MaskedDistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", 0.5, 1.0, student=student, keep_ratio=0.5,
                                  kd_reduction="batchmean")
    out = student.train()(x)
    loss = crit(x, out, y)
    keep = crit.last_keep_idx
    assert keep.shape == (4, 8) and keep.dtype == torch.long
    # Independent teacher forward on the kept tokens (cls + gathered patches after position embedding).
    with torch.no_grad():
        tok = torch.cat([teacher.cls_token.expand(4, -1, -1), teacher.patch_embed(x)], 1) + teacher.pos_embed
        kept = torch.cat([tok[:, :1], torch.stack([tok[b, 1:][keep[b]] for b in range(4)])], 1)
        t_logits = teacher.head(teacher.norm(teacher.blocks(kept))[:, 0])
    torch.testing.assert_close(loss, expected("soft", "batchmean", out, t_logits, y, 0.5, 1.0), rtol=1e-5, atol=1e-6)
    assert crit.stats()["teacher_tokens"] == 4 * (1 + 8)


def test_teacher_stays_in_eval_mode():
    teacher = tiny("deit_small_patch16_224", drop_rate=0.5)
    crit = MaskedDistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", 0.5, 1.0, student=tiny(), keep_ratio=0.5)
    crit.train()
    assert not teacher.training and crit.training


def test_distillation_none_never_runs_teacher_and_hooks_nothing(batch):
    x, y = batch
    student = tiny()

    class Boom(nn.Module):
        num_classes = NUM_CLASSES

        def forward(self, x):
            raise AssertionError("teacher ran")

    crit = MaskedDistillationLoss(nn.CrossEntropyLoss(), Boom(), "none", 0.5, 1.0, student=student, keep_ratio=0.5)
    assert crit.masked_teacher is None  # the teacher is never wrapped, so nothing is hooked
    assert all(len(m._forward_hooks) == 0 for m in student.modules())
    out = student.train()(x)
    torch.testing.assert_close(crit(x, out, y), F.cross_entropy(out, y))


def test_cnn_teacher_unmasked_works_as_in_deit(batch):
    x, y = batch
    student = tiny()
    torch.manual_seed(0)
    teacher = timm.create_model("resnet18", pretrained=False, num_classes=NUM_CLASSES, global_pool="avg")
    crit = MaskedDistillationLoss(nn.CrossEntropyLoss(), teacher, "hard", 0.5, 1.0, student=student, keep_ratio=1.0)
    out = student.train()(x)
    with torch.no_grad():
        t = teacher.eval()(x)
    torch.testing.assert_close(crit(x, out, y), expected("hard", "numel", out, t, y, 0.5, 1.0))


def test_random_mode_needs_no_student_and_is_seeded(batch):
    x, y = batch
    student, teacher = tiny(), tiny("deit_small_patch16_224")
    crit = MaskedDistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", 0.5, 1.0, keep_ratio=0.25,
                                  mask_mode="random")
    out = student(x)
    torch.manual_seed(7)
    crit(x, out, y)
    first = crit.last_keep_idx.clone()
    torch.manual_seed(7)
    crit(x, out, y)
    assert torch.equal(first, crit.last_keep_idx) and first.shape == (4, 4)


def test_teacher_mode_uses_teacher_attention(batch):
    x, y = batch
    student, teacher = tiny(), tiny("deit_small_patch16_224", seed=3)
    crit = MaskedDistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", 0.5, 1.0, keep_ratio=0.5,
                                  mask_mode="teacher")
    crit(x, student(x), y)
    # The teacher's own class-token attention, from its explicit softmax map (non-fused copy).
    maps = []
    teacher.blocks[-1].attn.fused_attn = False
    h = teacher.blocks[-1].attn.attn_drop.register_forward_hook(lambda m, i, o: maps.append(o))
    with torch.no_grad():
        teacher(x)
    h.remove()
    scores = maps[0][:, :, 0, 1:].mean(1)
    want = scores.topk(8, dim=1).indices.sort(1).values
    assert torch.equal(crit.last_keep_idx, want)
    cost = crit.supervision_cost(img_size=(32, 32))
    assert cost.extra_teacher == cost.teacher_full and cost.saving < 0  # analysis only: it costs more


# --- bad input: each raises at construction (or at the call) with the problem named ------------------------
def _mk(**kw):
    teacher = kw.pop("teacher", None) or tiny("deit_small_patch16_224")
    student = kw.pop("student", None) or tiny()
    kind = kw.pop("kind", "soft")
    return MaskedDistillationLoss(nn.CrossEntropyLoss(), teacher, kind, 0.5, 1.0, student=student, **kw)


@pytest.mark.parametrize("kwargs,err,words", [
    (dict(keep_ratio=0.0), ValueError, "keep_ratio=0.0 is outside (0, 1]"),
    (dict(keep_ratio=1.5), ValueError, "outside (0, 1]"),
    (dict(keep_ratio=None, num_keep=0), ValueError, "num_keep=0 is outside [1, 16]"),
    (dict(keep_ratio=None, num_keep=17), ValueError, "num_keep=17 is outside [1, 16]"),
    (dict(keep_ratio=0.5, num_keep=5), ValueError, "disagrees with num_keep=5"),
    (dict(kind="medium"), ValueError, "distillation_type='medium'"),
    (dict(mask_mode="salient"), ValueError, "mask_mode='salient'"),
    (dict(kd_reduction="mean"), ValueError, "kd_reduction='mean'"),
])
def test_bad_arguments(kwargs, err, words):
    with pytest.raises(err) as info:
        _mk(**kwargs)
    assert words in str(info.value)


def test_agreeing_ratio_and_count_accepted():
    assert _mk(keep_ratio=0.5, num_keep=8).num_keep == 8


def test_cnn_teacher_with_masking_suggests_keep_ratio_one():
    teacher = timm.create_model("resnet18", pretrained=False, num_classes=NUM_CLASSES)
    with pytest.raises(UnsupportedTeacherError, match="keep_ratio=1.0"):
        _mk(teacher=teacher, keep_ratio=0.5)


def test_student_without_attention_block():
    student = timm.create_model("resnet18", pretrained=False, num_classes=NUM_CLASSES)
    with pytest.raises(CaptureError, match="no recognisable attention block"):
        _mk(student=student)


def test_class_count_mismatch():
    with pytest.raises(ValueError, match="teacher predicts 7 classes but the student 10"):
        _mk(teacher=tiny("deit_small_patch16_224", num_classes=7))


def test_tuple_shapes_differ(batch):
    x, y = batch
    crit = _mk(keep_ratio=1.0)
    with pytest.raises(ValueError, match="distillation-token logits"):
        crit(x, (torch.randn(4, 10), torch.randn(4, 9)), y)


def test_batch_differs_from_captured_attention(batch):
    x, y = batch
    student = tiny()
    crit = _mk(student=student)
    student.train()(x)
    with pytest.raises(CaptureError, match="batch of 4 but the loss got 2"):
        crit(x[:2], torch.randn(2, 10), y[:2])


def test_loss_without_student_forward(batch):
    x, y = batch
    student = tiny()
    crit = _mk(student=student)
    out = student.train()(x)
    crit(x, out, y)
    with pytest.raises(CaptureError, match="no student attention was captured"):
        crit(x, out, y)  # the scores of that forward were consumed: a stale mask is never reused


def test_teacher_resolution_mismatch_is_refused(batch):
    x, y = batch
    crit = _mk(teacher=tiny("deit_small_patch16_224", img_size=64))
    student = crit.masked_teacher.capture.model
    with pytest.raises(ValueError, match="img_size=32"):
        crit(x, student.train()(x), y)
