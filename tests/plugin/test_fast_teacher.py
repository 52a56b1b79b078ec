"""The fast teacher path (teacher_dtype=bfloat16, compile_teacher=True) against an fp32 forward written out here."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tinymodels import NUM_CLASSES, tiny
from losses import MaskedDistillationLoss

BATCH = 4


def make_teacher(seed: int = 2) -> nn.Module:
    return tiny("deit_small_patch16_224", img_size=32, patch_size=8, depth=2, seed=seed).eval()


def images(n: int = BATCH, seed: int = 7) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def reference_logits(teacher: nn.Module, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """fp32 eager: class token + the kept patch tokens (after the position embedding) through blocks and head."""
    with torch.no_grad():
        tok = torch.cat([teacher.cls_token.expand(x.shape[0], -1, -1), teacher.patch_embed(x)], 1) + teacher.pos_embed
        kept = torch.stack([tok[b, 1:][keep[b]] for b in range(x.shape[0])])
        return teacher.head(teacher.norm(teacher.blocks(torch.cat([tok[:, :1], kept], 1)))[:, 0])


def assert_bf16_close(got: torch.Tensor, want: torch.Tensor) -> None:
    # bf16 keeps 8 mantissa bits (relative step 2^-8 ~ 0.4%); two blocks of bf16 matmuls stay within a few steps.
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=0.0, atol=0.03 * scale)


def loss(teacher: nn.Module, **kwargs) -> MaskedDistillationLoss:
    kwargs.setdefault("keep_ratio", 0.5)
    return MaskedDistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", 0.5, 2.0, kd_reduction="batchmean",
                                  **kwargs)


def check_keep(keep: torch.Tensor, batch: int) -> None:
    assert keep.shape == (batch, 8) and keep.dtype == torch.long  # 50% of the 4x4 grid
    assert bool((keep[:, 1:] > keep[:, :-1]).all()) and 0 <= int(keep.min()) and int(keep.max()) < 16


@pytest.mark.parametrize("mask_mode", ["random", "attention"])
def test_bf16_teacher_matches_fp32_reference(mask_mode):
    teacher = make_teacher()
    fp32_teacher = copy.deepcopy(teacher)  # teacher_dtype converts the loss's teacher in place
    student = tiny(seed=1) if mask_mode == "attention" else None
    crit = loss(teacher, mask_mode=mask_mode, student=student, teacher_dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in teacher.parameters()), "teacher weights were not kept in bf16"
    renorm = crit.masked_teacher.renorm
    assert renorm is None or not renorm.active  # same statistics: the reference needs no conversion
    x, y = images(), torch.arange(BATCH) % NUM_CLASSES

    def student_out():  # the student's forward is what the attention mode reads; random mode only needs logits
        if student is not None:
            return student.train()(x)
        return torch.randn(BATCH, NUM_CLASSES, generator=torch.Generator().manual_seed(9))

    student_out()
    torch.manual_seed(0)
    got, keep = crit.masked_teacher(x)
    check_keep(keep, BATCH)
    assert got.dtype == torch.float32  # handed back in fp32 for the KD loss
    want = reference_logits(fp32_teacher, x, keep)
    assert_bf16_close(got, want)
    # Not the unmasked teacher: the kept subset matters, so dropping it would fail the comparison above.
    with torch.no_grad():
        full = fp32_teacher(x)
    assert (full - want).abs().max() > 0.1 * want.abs().max()

    # The whole loss, on the same indices (random: the same seed; attention: the same student forward).
    out = student_out()
    torch.manual_seed(0)
    value = crit(x, out, y)
    torch.testing.assert_close(crit.last_keep_idx, keep, rtol=0, atol=0)
    t = 2.0
    kd = F.kl_div(F.log_softmax(out / t, 1), F.softmax(want / t, 1), reduction="batchmean") * t * t
    expected = 0.5 * F.cross_entropy(out, y) + 0.5 * kd
    torch.testing.assert_close(value, expected, rtol=2e-2, atol=2e-3)
    crit.remove_hooks()


def test_bf16_random_keep_is_reproducible_by_seed():
    teacher = make_teacher()
    crit = loss(teacher, mask_mode="random", teacher_dtype=torch.bfloat16)
    x = images()
    torch.manual_seed(3)
    a, keep_a = crit.masked_teacher(x)
    torch.manual_seed(3)
    b, keep_b = crit.masked_teacher(x)
    assert torch.equal(keep_a, keep_b)
    assert torch.equal(a, b)


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("keep_ratio", [0.5, 1.0])
def test_bf16_teacher_ignores_the_callers_autocast(amp_dtype, keep_ratio):
    # DeiT calls the criterion inside the training step's autocast; the teacher's weights already hold bf16.
    teacher = make_teacher()
    crit = loss(teacher, mask_mode="random", keep_ratio=keep_ratio, teacher_dtype=torch.bfloat16)
    x = images()
    torch.manual_seed(1)
    want = crit.masked_teacher(x)[0]
    with torch.autocast(device_type="cpu", dtype=amp_dtype):
        torch.manual_seed(1)
        got = crit.masked_teacher(x)[0]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.fixture(scope="module")
def compile_works():
    """torch.compile with the default (inductor) backend on a trivial function; skip if this machine cannot."""
    torch._dynamo.reset()
    try:
        fn = torch.compile(lambda a: torch.relu(a @ a) + 1, dynamic=False)
        a = torch.randn(8, 8)
        torch.testing.assert_close(fn(a), torch.relu(a @ a) + 1)
    except Exception as exc:  # noqa: BLE001 - any failure here is the environment's, not the plugin's
        pytest.skip(f"torch.compile does not work on this machine: {type(exc).__name__}: {str(exc)[:200]}")
    finally:
        torch._dynamo.reset()
    return True


def test_compiled_teacher_matches_eager_and_pads_small_batch(compile_works, monkeypatch):
    from torch._dynamo.backends.registry import lookup_backend
    from torch._dynamo.utils import counters

    inductor = lookup_backend("inductor")
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append([tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)])
        return inductor(gm, example_inputs)

    real_compile = torch.compile

    def compile_with_counter(model, **kwargs):
        kwargs["backend"] = counting_backend
        return real_compile(model, **kwargs)

    monkeypatch.setattr(torch, "compile", compile_with_counter)  # what losses.py calls
    torch._dynamo.reset()
    counters.clear()
    try:
        teacher = make_teacher()
        eager_teacher = copy.deepcopy(teacher)
        fp32_teacher = copy.deepcopy(teacher)
        compiled = loss(teacher, mask_mode="random", teacher_dtype=torch.bfloat16, compile_teacher=True)
        eager = loss(eager_teacher, mask_mode="random", teacher_dtype=torch.bfloat16)
        x = images()

        torch.manual_seed(5)
        got, keep = compiled.masked_teacher(x)
        check_keep(keep, BATCH)
        assert graphs, "compile_teacher=True never reached the compile backend"
        compiled_graphs = len(graphs)
        unique_graphs = counters["stats"]["unique_graphs"]

        torch.manual_seed(5)
        want, eager_keep = eager.masked_teacher(x)
        assert torch.equal(eager_keep, keep)
        assert_bf16_close(got, want)
        assert_bf16_close(got, reference_logits(fp32_teacher, x, keep))

        # A smaller last batch: same seed, so its indices are the first rows of the full batch's.
        torch.manual_seed(5)
        small, small_keep = compiled.masked_teacher(x[:3])
        assert torch.equal(small_keep, keep[:3]), "test set-up: the seed did not reproduce the indices"
        assert small.shape == (3, NUM_CLASSES)
        assert len(graphs) == compiled_graphs, f"the smaller batch was compiled again: {graphs}"
        assert counters["stats"]["unique_graphs"] == unique_graphs
        # Padding repeats the last sample; the real rows come out exactly as in the full-batch run.
        torch.testing.assert_close(small, got[:3], rtol=0, atol=0)

        # And the full batch again still hits the one compiled graph.
        torch.manual_seed(5)
        again = compiled.masked_teacher(x)[0]
        assert len(graphs) == compiled_graphs
        torch.testing.assert_close(again, got, rtol=0, atol=0)
    finally:
        torch._dynamo.reset()
