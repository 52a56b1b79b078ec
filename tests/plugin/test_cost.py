"""fvcore accounting on the real pruned forward, checked against counts reached another way."""
import copy

import pytest
import torch
import torch.nn as nn

from tinymodels import tiny
from deit_patch.cost import SupervisionCost, TokenMeter, count_gflops, student_gflops, teacher_gflops
from losses import MaskedDistillationLoss


def explicit_attention_copy(model):
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    return ref


@pytest.mark.parametrize("name", ["deit_small_patch16_224", "deit3_small_patch16_224"])
def test_masked_vit_teacher_costs_about_half(name):
    teacher = tiny(name, img_size=64, patch_size=8, depth=4)  # 64 patches
    full = teacher_gflops(teacher, img_size=(64, 64), num_keep=None)
    half = teacher_gflops(teacher, img_size=(64, 64), num_keep=32)
    assert 0.45 <= half / full <= 0.6


def test_sdpa_handle_counts_the_attention_products():
    # The fused model, counted through the sdpa handle, equals the explicit model's matmuls counted by fvcore.
    teacher = tiny("deit_small_patch16_224", img_size=64, patch_size=8, depth=2)
    fused = teacher_gflops(teacher, img_size=(64, 64), num_keep=None)
    explicit = teacher_gflops(explicit_attention_copy(teacher), img_size=(64, 64), num_keep=None)
    assert fused == pytest.approx(explicit, rel=1e-6)
    # And by hand: per block, qkv + proj + mlp linears and the two attention products, plus patch embed and head.
    d, n, depth, hidden, p = 384, 65, 2, 1536, 64
    per_block = n * d * 3 * d + n * d * d + 2 * n * d * hidden + 2 * n * n * d
    patch_embed = p * 3 * 8 * 8 * d
    head = d * 10
    assert fused * 1e9 == pytest.approx(depth * per_block + patch_embed + head, rel=0.02)


def test_pruned_count_matches_formula_for_kept_tokens():
    teacher = tiny("deit_small_patch16_224", img_size=64, patch_size=8, depth=2)
    d, hidden = 384, 1536
    full = teacher_gflops(teacher, img_size=(64, 64), num_keep=None) * 1e9
    kept = teacher_gflops(teacher, img_size=(64, 64), num_keep=16) * 1e9

    def blocks(n):
        return 2 * (4 * n * d * d + 2 * n * d * hidden + 2 * n * n * d)
    # Only the blocks see fewer tokens; patch embedding and head cost the same.
    assert full - kept == pytest.approx(blocks(65) - blocks(17), rel=0.02)


def test_student_gflops_and_table():
    student = tiny(img_size=64)
    s = student_gflops(student, img_size=(64, 64))
    assert s == pytest.approx(count_gflops(student.eval(), (torch.zeros(1, 3, 64, 64),)))
    cost = SupervisionCost(teacher_full=4.0, teacher_masked=2.2, student_forward=1.0, num_keep=98, num_patches=196)
    assert cost.saving == pytest.approx(0.45) and cost.student_train == 3.0
    assert "45.0%" in cost.table() and cost.as_dict()["teacher_gflops_masked"] == 2.2
    # supervision share = the masked teacher (2.2 GFLOPs) / (that + the student trained: 3 x 1.0)
    share = 2.2 / (2.2 + 3.0)
    assert f"{100 * share:.1f}%" in cost.table()


def test_table_without_the_student_does_not_claim_the_whole_step():
    # Without student= the student's cost is unknown: the share of a step used to read 100.0%.
    table = SupervisionCost(teacher_full=4.0, teacher_masked=2.2, student_forward=0.0, num_keep=98,
                            num_patches=196).table()
    assert "100.0%" not in table and "supervision share" not in table and "pass student=model" in table


def test_loss_supervision_cost_uses_its_keep_count():
    teacher, student = tiny("deit_small_patch16_224"), tiny()
    crit = MaskedDistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", 0.5, 1.0, student=student, keep_ratio=0.5)
    cost = crit.supervision_cost(img_size=(32, 32), student=student)
    assert cost.num_keep == 8 and cost.num_patches == 16
    assert cost.teacher_masked == pytest.approx(teacher_gflops(teacher, img_size=(32, 32), num_keep=8))
    assert cost.teacher_full == pytest.approx(teacher_gflops(teacher, img_size=(32, 32), num_keep=None))


def test_token_meter_counts_from_shapes(batch):
    x, y = batch
    teacher, student = tiny("deit_small_patch16_224"), tiny()
    crit = MaskedDistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", 0.5, 1.0, student=student, num_keep=4,
                                  keep_ratio=None)
    for _ in range(3):
        crit(x, student.train()(x), y)
    assert crit.meter.images == 12 and crit.meter.tokens == 12 * 5 and crit.meter.tokens_full == 12 * 17
    m = TokenMeter()
    m.update(batch=2, prefix=2, kept=3, patches=9)
    assert m.kept_fraction == pytest.approx(10 / 22)
