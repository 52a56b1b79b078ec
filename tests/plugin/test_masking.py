"""Mask selection: exactly the top scores, a fair random subset, grid resampling, keep-count resolution."""
import pytest
import torch
import torch.nn as nn

from tinymodels import tiny
from deit_patch.masking import random_indices, resample_scores, resolve_num_keep, select_patches
from losses import MaskedDistillationLoss


def test_topk_are_exactly_the_highest_scores():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(6, 49, generator=g)
    keep = select_patches("attention", scores=scores, batch_size=6, num_patches=49, num_keep=20, device="cpu")
    for row, s in zip(keep, scores):
        order = sorted(range(49), key=lambda i: -float(s[i]))
        assert sorted(row.tolist()) == sorted(order[:20])
        assert row.tolist() == sorted(row.tolist())


def test_random_varies_and_covers_every_patch():
    seen = torch.zeros(16, dtype=torch.long)
    draws = [random_indices(4, 16, 4, device="cpu") for _ in range(50)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    for d in draws:
        assert all(len(set(r.tolist())) == 4 for r in d)
        seen += torch.bincount(d.flatten(), minlength=16)
    assert (seen > 0).all()
    # Uniform: 800 picks over 16 patches, each patch's count near 50.
    assert seen.min() > 20 and seen.max() < 90


def test_loss_keeps_top_student_attention(batch):
    x, y = batch
    student, teacher = tiny(seed=1), tiny("deit_small_patch16_224", seed=2)
    crit = MaskedDistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", 0.5, 1.0, student=student, num_keep=6,
                                  keep_ratio=None)
    maps = []
    h = student.blocks[-1].attn.qkv.register_forward_hook(lambda m, i, o: maps.append(o.detach()))
    out = student.train()(x)
    h.remove()
    crit(x, out, y)
    qkv = maps[0].view(4, 17, 3, student.blocks[-1].attn.num_heads, -1)
    q, k = qkv[:, :1, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
    attn = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1).mean(1)[:, 0, 1:]
    assert torch.equal(crit.last_keep_idx, attn.topk(6, dim=1).indices.sort(1).values)


def test_resample_identity_and_mismatched_grid(batch):
    scores = torch.rand(2, 16)
    assert resample_scores(scores, src_grid=(4, 4), dst_grid=(4, 4)) is scores
    up = resample_scores(scores, src_grid=(4, 4), dst_grid=(8, 8)).view(2, 8, 8)
    # The hottest student patch stays hottest on the finer teacher grid.
    hot = scores.argmax(1)
    for b in range(2):
        r, c = divmod(int(hot[b]), 4)
        assert up[b, 2 * r:2 * r + 2, 2 * c:2 * c + 2].max() >= up[b].max() - 1e-6
    down = resample_scores(torch.ones(2, 64), src_grid=(8, 8), dst_grid=(4, 4))
    torch.testing.assert_close(down, torch.ones(2, 16))


def test_student_and_teacher_grids_differ(batch):
    x, y = batch
    student = tiny(patch_size=8)                             # 4x4 grid
    teacher = tiny("deit_small_patch16_224", patch_size=4)   # 8x8 grid
    crit = MaskedDistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", 0.5, 1.0, student=student, keep_ratio=0.25)
    crit(x, student.train()(x), y)
    assert crit.num_patches == 64 and crit.last_keep_idx.shape == (4, 16)
    assert int(crit.last_keep_idx.max()) < 64


@pytest.mark.parametrize("ratio,count,patches,want", [(0.5, None, 196, 98), (0.25, None, 196, 49), (None, 98, 196, 98),
                                                      (1.0, None, 16, 16), (0.01, None, 16, 1), (0.5, 98, 196, 98)])
def test_resolve_num_keep(ratio, count, patches, want):
    assert resolve_num_keep(num_patches=patches, keep_ratio=ratio, num_keep=count) == want


def test_select_rejects_unknown_mode():
    with pytest.raises(ValueError, match="unknown mask_mode"):
        select_patches("best", scores=None, batch_size=1, num_patches=4, num_keep=1, device="cpu")
