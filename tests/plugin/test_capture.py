"""The hook's scores against the model's own explicit attention map, and proof that the student is untouched."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F

from tinymodels import TIMM_CHECKPOINT_NON_REENTRANT, tiny
from deit_patch.capture import AttentionCapture, CaptureError, unwrap_model


def explicit_cls_attention(model, x):
    """Class-token row of the last block's softmax map, from a non-fused copy of the model (mean over heads)."""
    ref = copy.deepcopy(model)
    for block in ref.blocks:
        block.attn.fused_attn = False  # timm >= 0.9 fuses attention; older timm always builds the map
    maps = []
    # attn_drop receives softmax(q k^T / sqrt(d)) exactly as the model computes it.
    handle = ref.blocks[-1].attn.attn_drop.register_forward_hook(lambda m, i, o: maps.append(i[0]))
    ref.eval()
    with torch.no_grad():
        ref(x)
    handle.remove()
    prefix = ref.num_prefix_tokens if hasattr(ref, "num_prefix_tokens") else ref.num_tokens  # timm < 0.6: num_tokens
    return maps[0][:, :, 0, prefix:].mean(dim=1)


@pytest.mark.parametrize("name,kwargs", [
    ("deit_tiny_patch16_224", {}),
    ("deit_tiny_distilled_patch16_224", {}),
    ("vit_small_patch16_224", {"reg_tokens": 2, "qk_norm": True}),
    ("deit3_small_patch16_224", {}),
])
def test_scores_equal_explicit_softmax(name, kwargs, batch):
    x, _ = batch
    model = tiny(name, **kwargs)
    cap = AttentionCapture(model)
    model.train()
    model(x)
    got = cap.take(4)
    want = explicit_cls_attention(model, x)
    assert got.shape == (4, 16) and not got.requires_grad
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


def test_outputs_and_grads_bitwise_identical_and_fused_kept(batch, monkeypatch):
    x, y = batch
    a, b = tiny(seed=5), tiny(seed=5)
    cap = AttentionCapture(b)
    calls = []
    real_sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *args, **kw: calls.append(1) or real_sdpa(*args, **kw))
    outs = []
    for model in (a, b):
        model.train()
        torch.manual_seed(0)  # same dropout / drop-path draws
        out = model(x)
        F.cross_entropy(out, y).backward()
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    assert all(torch.equal(g, h) for g, h in zip(_grads(a), _grads(b)))
    if getattr(a.blocks[0].attn, "fused_attn", False):  # timm >= 0.9; older timm never calls SDPA
        assert len(calls) == 2 * len(a.blocks)  # every block of both models still ran fused attention
    assert cap.take(4).shape == (4, 16)


def test_eval_and_no_grad_forwards_capture_nothing(batch):
    x, _ = batch
    model = tiny()
    cap = AttentionCapture(model)
    model.eval()
    model(x)
    model.train()
    with torch.no_grad():
        model(x)
    with pytest.raises(CaptureError):
        cap.take(4)


def test_autocast_bf16_scores_float32_and_close(batch):
    x, _ = batch
    model = tiny()
    cap = AttentionCapture(model)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    got = cap.take(4)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, explicit_cls_attention(model, x), rtol=0.1, atol=0.02)


def test_activation_checkpointing_records_once(batch):
    x, y = batch
    model = tiny()
    if not TIMM_CHECKPOINT_NON_REENTRANT:
        pytest.skip(f"timm {timm.__version__} checkpoints reentrantly (the forward runs without grad, documented)")
    model.set_grad_checkpointing(True)
    cap = AttentionCapture(model)
    records = []
    original = cap._record
    cap._record = lambda qkv: records.append(1) or original(qkv)
    model.train()
    out = model(x)
    F.cross_entropy(out, y).backward()  # recomputes the blocks inside backward
    assert len(records) == 1
    torch.testing.assert_close(cap.take(4), explicit_cls_attention(model, x), rtol=1e-5, atol=1e-6)


def test_deep_copied_ema_model_does_not_write(batch):
    x, _ = batch
    model = tiny()
    cap = AttentionCapture(model)
    ema = copy.deepcopy(model).train()
    ema(x)
    with pytest.raises(CaptureError):
        cap.take(4)
    model.train()(x[:2])
    assert cap.take(2).shape == (2, 16)


def test_two_captures_do_not_interfere(batch):
    x, _ = batch
    m1, m2 = tiny(seed=1), tiny(seed=2)
    c1, c2 = AttentionCapture(m1), AttentionCapture(m2)
    m1.train()(x)
    m2.train()(x[:3])
    torch.testing.assert_close(c1.take(4), explicit_cls_attention(m1, x))
    torch.testing.assert_close(c2.take(3), explicit_cls_attention(m2, x[:3]))


def test_remove_leaves_model_as_before(batch):
    x, _ = batch
    model = tiny()
    before = {name: len(m._forward_hooks) for name, m in model.named_modules()}
    cap = AttentionCapture(model)
    assert len(model.blocks[-1].attn.qkv._forward_hooks) == 1
    cap.remove()
    assert {name: len(m._forward_hooks) for name, m in model.named_modules()} == before
    model.train()(x)
    with pytest.raises(CaptureError):
        cap.take(4)


def test_wrappers_are_unwrapped():
    model = tiny()
    compiled = torch.compile(model)  # not run: only the wrapper matters
    assert unwrap_model(compiled) is model
    assert AttentionCapture(compiled).attn is model.blocks[-1].attn


def test_ddp_wrapped_student(batch, tmp_path):
    import torch.distributed as dist
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model = tiny()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        cap = AttentionCapture(ddp)
        x, _ = batch
        ddp.train()(x)
        torch.testing.assert_close(cap.take(4), explicit_cls_attention(model, x))
    finally:
        dist.destroy_process_group()
