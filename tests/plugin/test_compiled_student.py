"""A torch.compile'd student: the compiled model is run (never unwrapped) and compared with the same weights run
eagerly.

Backends 'eager' and 'aot_eager' trace through dynamo exactly as inductor does (the hook question is dynamo's) without
compiling C++; the inductor runs are opt-in (MASKEDKD_SLOW_TESTS=1): with a cold inductor cache the loss test alone
took 66 s on a busy 2-core CPU (75 s just to compile the forward in another cold run), warm caches ~11 s.
"""
import copy
import os
import warnings

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from tinymodels import TIMM_CHECKPOINT_NON_REENTRANT, tiny
import deit_patch.capture as capture_mod
from deit_patch.capture import AttentionCapture, CaptureError
from losses import MaskedDistillationLoss

dynamo = pytest.importorskip("torch._dynamo")
if capture_mod._IS_COMPILING is None:
    pytest.skip("this torch has no is_compiling(): compiled students are refused (tested below only where it has)",
                allow_module_level=True)

BACKENDS = ["eager", "aot_eager"]
if os.environ.get("MASKEDKD_SLOW_TESTS"):
    BACKENDS.append("inductor")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test traces from scratch and leaves no graphs behind for the next one."""
    dynamo.reset()
    yield
    dynamo.reset()


def batches(n: int, size: int = 4):
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(size, 3, 32, 32, generator=g), torch.randint(0, 10, (size,), generator=g)) for _ in range(n)]


def grads(model: nn.Module):
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_student_keeps_same_patches_and_loss(backend):
    teacher = tiny("deit_small_patch16_224", seed=3).eval()
    eager_student, compiled_base = tiny(seed=1), tiny(seed=1)
    compiled_student = torch.compile(compiled_base, backend=backend)
    eager_loss = MaskedDistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", 0.5, 1.0, student=eager_student,
                                        keep_ratio=0.5)
    compiled_loss = MaskedDistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", 0.5, 1.0,
                                           student=compiled_student, keep_ratio=0.5)
    tol = {} if backend != "inductor" else {"rtol": 1e-4, "atol": 1e-5}
    for x, y in batches(3):  # three steps: the later ones replay the cached graph, which must still hand over scores
        results = []
        for model, crit in ((eager_student, eager_loss), (compiled_student, compiled_loss)):
            model.train()
            model.zero_grad(set_to_none=True)
            loss = crit(x, model(x), y)
            loss.backward()
            results.append((loss.detach(), crit.last_keep_idx.clone(), grads(compiled_base if crit is compiled_loss
                                                                            else eager_student)))
        (l_e, k_e, g_e), (l_c, k_c, g_c) = results
        assert k_c.shape == (4, 8)
        assert torch.equal(torch.sort(k_c, 1).values, torch.sort(k_e, 1).values)
        torch.testing.assert_close(l_c, l_e, **tol)
        for a, b in zip(g_c, g_e):
            torch.testing.assert_close(a, b, **(tol or {"rtol": 1e-5, "atol": 1e-7}))


def test_hooked_student_compiles_without_graph_break(batch):
    x, _ = batch
    model = tiny()
    cap = AttentionCapture(model)  # kept alive: the hook holds it only weakly
    model.train()
    explained = dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, [str(r.reason)[:200] for r in explained.break_reasons]
    assert explained.graph_count == 1
    assert cap.take(4).shape == (4, 16)  # the hook was traced into that one graph, not skipped


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_outputs_and_grads_bitwise_unchanged(backend, batch):
    x, y = batch
    plain, hooked = tiny(seed=5), tiny(seed=5)
    cap = AttentionCapture(torch.compile(hooked, backend=backend))
    outs = []
    for model in (plain, hooked):
        compiled = torch.compile(model, backend=backend).train()
        out = compiled(x)
        F.cross_entropy(out, y).backward()
        outs.append(out)
    assert cap.take(4).shape == (4, 16)
    if backend == "inductor":  # the hook's extra ops may change how inductor fuses the block around it
        torch.testing.assert_close(outs[0], outs[1])
        return
    assert torch.equal(outs[0], outs[1])
    assert all(torch.equal(g, h) for g, h in zip(grads(plain), grads(hooked)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_eval_no_grad_and_ema_copy_capture_nothing(backend, batch):
    x, _ = batch
    model = tiny()
    compiled = torch.compile(model, backend=backend)
    cap = AttentionCapture(compiled)
    compiled.eval()(x)
    compiled.train()
    with torch.no_grad():
        compiled(x)
    torch.compile(copy.deepcopy(model), backend=backend).train()(x)  # an EMA copy, compiled as well
    with pytest.raises(CaptureError):
        cap.take(4)
    compiled(x[:2])  # the train-mode graph of the real student still writes
    assert cap.take(2).shape == (2, 16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_activation_checkpointing_records_once(backend, batch):
    x, y = batch
    reference = tiny(seed=4)
    ref_cap = AttentionCapture(reference)
    reference.train()(x)
    model = tiny(seed=4)
    if not hasattr(model, "set_grad_checkpointing") or not TIMM_CHECKPOINT_NON_REENTRANT:
        pytest.skip(f"timm {timm.__version__} has no non-reentrant activation checkpointing (reentrant hides the "
                    "forward from the hook, documented)")
    model.set_grad_checkpointing(True)
    cap = AttentionCapture(torch.compile(model, backend=backend))
    records = []
    original = cap._record
    cap._record = lambda qkv: records.append(1) or original(qkv)
    out = torch.compile(model, backend=backend).train()(x)
    F.cross_entropy(out, y).backward()  # recomputes the checkpointed blocks
    assert len(records) == 1
    torch.testing.assert_close(cap.take(4), ref_cap.take(4), rtol=1e-5, atol=1e-6)


def test_hook_attached_after_a_compiled_run_still_captures(batch):
    x, _ = batch
    reference = tiny(seed=2)
    ref_cap = AttentionCapture(reference)
    reference.train()(x)
    model = tiny(seed=2)
    compiled = torch.compile(model, backend="eager").train()
    compiled(x)  # traced without any hook: compile will not notice one added later on its own
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cap = AttentionCapture(compiled)
    assert any("already ran before its attention hook" in str(w.message) for w in caught)
    compiled(x)
    torch.testing.assert_close(cap.take(4), ref_cap.take(4))


def test_remove_stops_a_compiled_student_writing(batch):
    x, _ = batch
    compiled = torch.compile(tiny(), backend="eager").train()
    cap = AttentionCapture(compiled)
    compiled(x)
    assert cap.take(4).shape == (4, 16)
    cap.remove()
    compiled(x)  # the cached graph still holds the hook; it must see that the capture is off
    assert cap._scores is None


def test_refuses_compiled_student_where_torch_cannot_tell_it_is_compiling(monkeypatch):
    monkeypatch.setattr(capture_mod, "_IS_COMPILING", None)
    compiled = torch.compile(tiny(), backend="eager")
    with pytest.raises(CaptureError, match="is_compiling"):
        AttentionCapture(compiled)
    model = tiny()
    AttentionCapture(model)  # an uncompiled student does not need it
