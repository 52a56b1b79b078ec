"""The hook's scores against the model's own explicit attention map, and proof that the student is untouched."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F

from tinymodels import TIMM_CHECKPOINT_NON_REENTRANT, tiny
from deit_patch.capture import AttentionCapture, CaptureError
from deit_patch.layout import unwrap_model


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


def test_student_inside_a_user_wrapper_is_read_with_its_own_class_token(batch):
    # The token layout is found through the module that holds the hooked attention: the wrapper has no class
    # token or grid of its own, and reading its attention as 17 "patches" would count the class token as one.
    x, _ = batch
    vit = tiny("deit_tiny_patch16_224")

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = vit

        def forward(self, images):
            return self.backbone(images)

    wrapper = Wrapper()
    cap = AttentionCapture(wrapper)
    wrapper.train()
    wrapper(x)
    got = cap.take(4, image_hw=(32, 32))
    assert got.shape == (4, 16)
    torch.testing.assert_close(got, explicit_cls_attention(vit, x), rtol=1e-5, atol=1e-6)


def test_student_pooling_its_patches_is_refused_for_attention_masking():
    # A class token the head never reads: its attention does not say which patches the prediction used.
    try:
        student = tiny("vit_small_patch16_224", global_pool="avg")
    except TypeError:
        pytest.skip(f"timm {timm.__version__} has no global_pool on its ViT")
    assert student.cls_token is not None
    with pytest.raises(CaptureError, match="global_pool='avg'.*mask_mode='random'"):
        AttentionCapture(student)


def test_avg_pooled_student_is_refused_by_the_loss_and_random_masking_still_works(batch):
    import torch.nn as nn
    from losses import MaskedDistillationLoss
    x, y = batch
    try:
        student = tiny("vit_small_patch16_224", global_pool="avg", seed=1)
    except TypeError:
        pytest.skip(f"timm {timm.__version__} has no global_pool on its ViT")
    teacher = tiny("deit_tiny_patch16_224")
    with pytest.raises(CaptureError, match="mask_mode='random'"):
        MaskedDistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", 0.5, 1.0, student=student, keep_ratio=0.5)
    loss = MaskedDistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", 0.5, 1.0, student=student, keep_ratio=0.5,
                                  mask_mode="random")
    assert torch.isfinite(loss(x, student.train()(x), y))


def test_student_whose_attention_adds_a_rotary_embedding_is_refused():
    if not timm.list_models("eva02_tiny_patch14_224"):
        pytest.skip(f"timm {timm.__version__} has no EVA-02")
    from deit_patch.tiny_builds import TINY_BUILDS, build_tiny
    try:
        student = build_tiny(TINY_BUILDS["eva.Eva"], global_pool="token")
    except Exception as err:
        pytest.skip(f"timm {timm.__version__} cannot build the tiny EVA-02: {err}")
    with pytest.raises(CaptureError, match="position term inside the attention"):
        AttentionCapture(student)


def test_student_whose_attention_adds_biases_outside_qkv_is_refused():
    # BEiT's q/v biases are added in its forward, after the qkv Linear the hook reads (and its rel. pos. bias).
    if not timm.list_models("beit_base_patch16_224"):
        pytest.skip(f"timm {timm.__version__} has no BEiT")
    from deit_patch.tiny_builds import TinyBuild, build_tiny
    try:
        student = build_tiny(TinyBuild("beit_base_patch16_224", dict(
            img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, global_pool="token")))
    except Exception as err:
        pytest.skip(f"timm {timm.__version__} cannot build the tiny BEiT: {err}")
    with pytest.raises(CaptureError, match="would miss"):
        AttentionCapture(student)
