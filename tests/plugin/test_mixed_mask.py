"""The 'mixed' mask criterion: a share of the kept patches by score, the rest uniformly from the others."""
import pytest
import torch
import torch.nn as nn

from tinymodels import tiny
from deit_patch.masking import MASK_MODES, mixed_selector, select_patches
from losses import MaskedDistillationLoss


def test_mixed_keeps_the_top_scored_half_and_fills_the_rest_uniformly():
    torch.manual_seed(0)
    scores = torch.rand(200, 16)
    keep = select_patches("mixed", scores=scores, batch_size=200, num_patches=16, num_keep=8, device="cpu")
    others = torch.zeros(12, dtype=torch.long)
    for row, s in zip(keep, scores):
        order = sorted(range(16), key=lambda i: -float(s[i]))
        top, rest = set(order[:4]), order[4:]
        assert len(set(row.tolist())) == 8 and top <= set(row.tolist())      # the 4 best always kept
        assert row.tolist() == sorted(row.tolist())
        filled = [i for i in row.tolist() if i not in top]
        for rank, patch in enumerate(rest):   # which of the 12 left-over ranks the 4 random picks landed on
            others[rank] += patch in filled
    # 200 rows x 4 picks over 12 left-over ranks: about 67 each when uniform; by score, ranks 0-3 would take all.
    assert others.sum() == 800 and others.min() > 35 and others.max() < 100


def test_mixed_share_one_is_attention_and_share_zero_ignores_the_scores():
    scores = torch.rand(5, 20)
    by_score = select_patches("attention", scores=scores, batch_size=5, num_patches=20, num_keep=7, device="cpu")
    everything = mixed_selector(attention_share=1.0)(scores=scores, batch_size=5, num_patches=20, num_keep=7,
                                                     device="cpu")
    assert torch.equal(everything, by_score)
    torch.manual_seed(1)
    blind = [mixed_selector(attention_share=0.0)(scores=None, batch_size=5, num_patches=20, num_keep=7, device="cpu")
             for _ in range(5)]
    assert not all(torch.equal(blind[0], b) for b in blind[1:])


@pytest.mark.parametrize("share", [-0.1, 1.5])
def test_mixed_share_outside_zero_one_is_refused(share):
    with pytest.raises(ValueError, match="attention_share"):
        mixed_selector(attention_share=share)


def test_mixed_needs_scores_of_the_batch_shape():
    with pytest.raises(ValueError, match="scores of shape"):
        select_patches("mixed", scores=torch.rand(3, 10), batch_size=3, num_patches=16, num_keep=8, device="cpu")


def test_loss_with_mixed_mode_keeps_the_student_top_attention_half(batch):
    x, y = batch
    student, teacher = tiny(seed=1), tiny("deit_small_patch16_224", seed=2)
    assert MASK_MODES["mixed"][1] == "student"
    crit = MaskedDistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", 0.5, 1.0, student=student, num_keep=8,
                                  keep_ratio=None, mask_mode="mixed")
    maps = []
    h = student.blocks[-1].attn.qkv.register_forward_hook(lambda m, i, o: maps.append(o.detach()))
    out = student.train()(x)
    h.remove()
    loss = crit(x, out, y)
    assert torch.isfinite(loss)
    # The student's class-token attention over its 16 patches, computed here from its q and k.
    qkv = maps[0].view(4, 17, 3, student.blocks[-1].attn.num_heads, -1)
    q, k = qkv[:, :1, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
    attn = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1).mean(1)[:, 0, 1:]
    kept = crit.last_keep_idx
    assert kept.shape == (4, 8)
    for row, top in zip(kept.tolist(), attn.topk(4, dim=1).indices.tolist()):
        assert set(top) <= set(row)
