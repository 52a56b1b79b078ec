"""The keep count and the patch grid follow each batch's real resolution (dynamic_img_size teachers/students)."""
import pytest
import torch
import torch.nn as nn

from tinymodels import NUM_CLASSES, tiny
from losses import MaskedDistillationLoss


def _explicit_cls_attention(model, x):
    """Class-token attention of the last block over patches, computed by hand from the block's own weights."""
    captured = {}
    last = model.blocks[-1]
    handle = last.register_forward_pre_hook(lambda mod, args: captured.__setitem__("x", args[0]))
    model(x)
    handle.remove()
    attn = last.attn
    h = last.norm1(captured["x"])
    b, n, c = h.shape
    qkv = attn.qkv(h).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    probs = ((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)).softmax(-1).mean(1)[:, 0]
    return probs[:, model.num_prefix_tokens:]


@pytest.mark.parametrize("size", [(48, 48), (32, 48)])
def test_dynamic_teacher_keeps_half_of_the_real_patches(size):
    kw = dict(img_size=32, patch_size=4, dynamic_img_size=True)
    student, teacher = tiny(**kw, seed=1), tiny(**kw, seed=2).eval()
    crit = MaskedDistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", 0.5, 1.0, student=student, keep_ratio=0.5)
    x = torch.randn(3, 3, *size)
    y = torch.randint(0, NUM_CLASSES, (3,))
    crit(x, student(x), y)
    rows, cols = size[0] // 4, size[1] // 4
    assert crit.last_keep_idx.shape == (3, rows * cols // 2)
    with torch.no_grad():
        expected = _explicit_cls_attention(student, x).topk(rows * cols // 2, dim=1).indices.sort(1).values
    assert torch.equal(crit.last_keep_idx, expected)
    assert int(crit.last_keep_idx.max()) >= rows * cols // 2  # kept patches reach past the built grid's count


def test_absolute_num_keep_is_checked_against_the_real_patch_count():
    kw = dict(img_size=32, patch_size=4, dynamic_img_size=True)
    student, teacher = tiny(**kw, seed=1), tiny(**kw, seed=2).eval()
    crit = MaskedDistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", 0.5, 1.0, student=student, num_keep=100)
    x48 = torch.randn(2, 3, 48, 48)
    crit(x48, student(x48), torch.zeros(2, dtype=torch.long))
    assert crit.last_keep_idx.shape == (2, 100)  # 100 of 144 at 48 px
    x32 = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"at 32x32 px the teacher has 64 patches .*num_keep=100"):
        crit(x32, student(x32), torch.zeros(2, dtype=torch.long))


def test_num_keep_alone_is_not_mistaken_for_a_disagreement():
    student, teacher = tiny(patch_size=4, seed=1), tiny(patch_size=4, seed=2).eval()
    crit = MaskedDistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", 0.5, 1.0, student=student, num_keep=16)
    x = torch.randn(2, 3, 32, 32)
    crit(x, student(x), torch.zeros(2, dtype=torch.long))
    assert crit.last_keep_idx.shape == (2, 16)


def test_set_keep_changes_the_count_and_keep_one_runs_the_full_teacher():
    student, teacher = tiny(patch_size=4, seed=1), tiny(patch_size=4, seed=2).eval()
    crit = MaskedDistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", 0.5, 1.0, student=student, keep_ratio=0.25)
    x, y = torch.randn(2, 3, 32, 32), torch.zeros(2, dtype=torch.long)
    crit(x, student(x), y)
    assert crit.last_keep_idx.shape == (2, 16)
    crit.set_keep(keep_ratio=0.75)
    crit(x, student(x), y)
    assert crit.last_keep_idx.shape == (2, 48)
    crit.set_keep(keep_ratio=1.0)
    out = student(x)
    loss = crit(x, out, y)
    assert crit.last_keep_idx is None
    with torch.no_grad():
        t = teacher(x)
    ref = 0.5 * nn.functional.cross_entropy(out, y) + 0.5 * nn.functional.kl_div(
        out.log_softmax(1), t.log_softmax(1), reduction="sum", log_target=True) / out.numel()
    assert torch.allclose(loss, ref, atol=1e-6)
    with pytest.raises(ValueError, match="exactly one"):
        crit.set_keep()


def test_set_keep_refuses_on_an_unmasked_loss():
    student, teacher = tiny(patch_size=4, seed=1), tiny(patch_size=4, seed=2).eval()
    crit = MaskedDistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", 0.5, 1.0, student=student, keep_ratio=1.0)
    with pytest.raises(ValueError, match="build it with the schedule's target"):
        crit.set_keep(keep_ratio=0.5)


def test_absolute_keep_count_on_a_size_following_teacher_is_judged_per_batch():
    # num_keep equal to the built grid's 16 patches used to switch masking off for good: at 48 px (36 patches)
    # the teacher then saw all 36 instead of 16; set_keep refused a count the constructor had accepted.
    from deit_patch.masked_teacher import MaskedTeacher
    teacher = tiny("vit_small_patch16_224", dynamic_img_size=True)  # 32 px, patch 8: 4 x 4 as built
    masked = MaskedTeacher(teacher, num_keep=16, mask_mode="random")
    assert masked.masking
    masked(torch.randn(2, 3, 48, 48))
    assert (masked.last_step.num_kept, masked.last_step.num_patches) == (16, 36)
    masked(torch.randn(2, 3, 32, 32))
    assert masked.last_step.keep_idx is None and masked.last_step.num_kept == 16  # every patch: the plain teacher
    masked.set_keep(num_keep=20)
    assert masked.keep_for((48, 48)) == ((6, 6), 20)
