"""ViTKD feature distillation (deit_patch/features.py through MaskedDistillationLoss) against hand computations.

Every reference here is written out in the test: the models are run block by block by hand (no hooks), the heads
are applied with F.linear/F.conv2d from their weights, and the generation mask is rebuilt MAE-style (drop, append
mask tokens, unshuffle) from the same seeded noise the loss draws.
"""
import copy
import os
import tempfile

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from tinymodels import NUM_CLASSES, tiny

from deit_patch import features
from deit_patch.features import FeatureKDError, vitkd_terms
from losses import MaskedDistillationLoss

SEED = 7
ALPHA, BETA, RATIO = 0.3, 0.7, 0.5  # not ViTKD's 3e-5/3e-6: swapped or dropped weights must show


def named_tiny(name, **kwargs):
    try:
        return tiny(name, **kwargs)
    except TypeError as err:  # timm < 0.9 entrypoints fix embed_dim/num_heads; test_mimicking_on_any_timm covers it
        pytest.skip(f"timm {timm.__version__} cannot resize {name}: {err}")


def student_model(distilled=False, width=64, seed=0):
    name = "deit_tiny_distilled_patch16_224" if distilled else "deit_tiny_patch16_224"
    model = named_tiny(name, embed_dim=width, num_heads=2, seed=seed)
    if distilled:
        model.set_distilled_training(True)
    return model.train()


TEACHERS = {"vit": ("vit_small_patch16_224", {}), "deit3": ("deit3_small_patch16_224", {}),
            "cait": ("cait_xxs24_224", {"depth_token_only": 1})}


def teacher_model(width=96, seed=1, family="vit"):
    name, kwargs = TEACHERS[family]
    return named_tiny(name, embed_dim=width, num_heads=2, seed=seed, **kwargs).eval()


def make_loss(student, teacher, *, keep=1.0, mode="attention", alpha=0.5, **kw):
    kw.setdefault("vitkd_generator", torch.Generator().manual_seed(SEED))
    return MaskedDistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", alpha, 1.0, student=student,
                                  keep_ratio=keep, mask_mode=mode, feature_kd="vitkd", vitkd_alpha=ALPHA,
                                  vitkd_beta=BETA, vitkd_mask_ratio=RATIO, **kw)


def hand_features(model, x, prefix, keep_idx=None):
    """Block outputs and final-norm output, patch tokens only, run by hand (optionally on kept patches only)."""
    if hasattr(model, "blocks_token_only"):  # CaiT: patches alone through the blocks, the class token joins later
        tokens = model.patch_embed(x) + model.pos_embed
        if keep_idx is not None:
            tokens = torch.gather(tokens, 1, keep_idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        outs = []
        for block in model.blocks:
            tokens = block(tokens)
            outs.append(tokens)
        cls = model.cls_token.expand(tokens.shape[0], -1, -1)
        for block in model.blocks_token_only:
            cls = block(tokens, cls)
        return outs, model.norm(torch.cat([cls, tokens], dim=1))[:, 1:]
    tokens = model._pos_embed(model.patch_embed(x))
    if keep_idx is not None:
        idx = keep_idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
        tokens = torch.cat([tokens[:, :prefix], torch.gather(tokens[:, prefix:], 1, idx)], dim=1)
    tokens = model.norm_pre(tokens)
    outs = []
    for block in model.blocks:
        tokens = block(tokens)
        outs.append(tokens[:, prefix:])
    return outs, model.norm(tokens)[:, prefix:]


def teacher_pixels(student, teacher, x):
    """The batch re-normalised from the student's input statistics to the teacher's (vit_* uses 0.5/0.5)."""
    def stats(model):
        cfg = model.pretrained_cfg
        return torch.tensor(cfg["mean"]).view(1, 3, 1, 1), torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    (ms, ss), (mt, st) = stats(student), stats(teacher)
    return (x * ss + ms - mt) / st


def hand_heads(heads, s_shallow, s_deep, noise, ratio, grid):
    """Aligners with F.linear; ViTKD generation with MAE masking written out (drop, append, unshuffle)."""
    def align(module, x):
        return F.linear(x, module.weight, module.bias) if isinstance(module, nn.Linear) else x
    aligned = [align(m, x) for m, x in zip(heads.shallow_align, s_shallow)]
    x = align(heads.deep_align, s_deep)
    batch, n, dim = x.shape
    len_keep = int(n * (1 - ratio))
    shuffle = noise.argsort(dim=1)
    restore = shuffle.argsort(dim=1)
    kept = torch.gather(x, 1, shuffle[:, :len_keep].unsqueeze(-1).expand(-1, -1, dim))
    x = torch.cat([kept, heads.mask_token.expand(batch, n - len_keep, dim)], dim=1)
    x = torch.gather(x, 1, restore.unsqueeze(-1).expand(-1, -1, dim))
    masked = torch.ones(batch, n)
    masked[:, :len_keep] = 0
    masked = torch.gather(masked, 1, restore)
    img = x.reshape(batch, grid[0], grid[1], dim).permute(0, 3, 1, 2)
    c1, c2 = heads.generator[0], heads.generator[2]
    out = F.conv2d(F.relu(F.conv2d(img, c1.weight, c1.bias, padding=1)), c2.weight, c2.bias, padding=1)
    return aligned, out.flatten(2).transpose(1, 2), masked


def plain_logit_loss(student, teacher):
    """The same loss without feature KD (its equality to DeiT's loss is tested in test_losses.py)."""
    return MaskedDistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", 0.5, 1.0, student=student, keep_ratio=1.0)


@pytest.mark.parametrize("distilled", [False, True], ids=["plain", "distilled"])
@pytest.mark.parametrize("s_width", [64, 96], ids=["widths-differ", "same-width"])
def test_unmasked_equals_vitkd_formulas(distilled, s_width, batch):
    x, y = batch
    student, teacher = student_model(distilled, s_width), teacher_model(96)
    crit = make_loss(student, teacher, keep=1.0)
    heads = crit.feature_heads
    assert isinstance(heads.deep_align, nn.Linear) == (s_width != 96)
    assert all(isinstance(m, nn.Linear) == (s_width != 96) for m in heads.shallow_align)
    with torch.no_grad():  # the mask token starts at zero; move it so the generation term depends on it
        heads.mask_token.normal_()
    out = student(x)
    loss = crit(x, out, y)
    terms = crit.pop_stats()

    prefix = 2 if distilled else 1
    with torch.no_grad():
        s_shallow, s_deep = hand_features(student, x, prefix)
        t_shallow, t_deep = hand_features(teacher, teacher_pixels(student, teacher, x), 1)
        noise = torch.rand(x.shape[0], 16, generator=torch.Generator().manual_seed(SEED))
        aligned, generated, masked = hand_heads(heads, s_shallow, s_deep, noise, RATIO, (4, 4))
        mimic = sum(F.mse_loss(a, t, reduction="sum") for a, t in zip(aligned, t_shallow)) / x.shape[0] * ALPHA
        gen = F.mse_loss(generated * masked.unsqueeze(-1), t_deep * masked.unsqueeze(-1), reduction="sum")
        gen = gen / x.shape[0] * BETA / RATIO
        logit = plain_logit_loss(student, teacher)(x, out, y)
    assert masked.sum() == x.shape[0] * 8
    assert terms["loss_vitkd_mimic"] == pytest.approx(float(mimic), rel=1e-5)
    assert terms["loss_vitkd_gen"] == pytest.approx(float(gen), rel=1e-5)
    assert float(loss.detach()) == pytest.approx(float(logit + mimic + gen), rel=1e-5)
    crit.remove_hooks()


@pytest.mark.parametrize("distilled,family", [(False, "vit"), (True, "vit"), (False, "deit3"), (False, "cait")],
                         ids=["plain", "distilled", "deit3-teacher", "cait-teacher"])
def test_masked_teacher_uses_kept_positions_only(distilled, family, batch):
    x, y = batch
    student, teacher = student_model(distilled, 64), teacher_model(96, family=family)
    crit = make_loss(student, teacher, keep=0.5, mode="attention")
    with torch.no_grad():
        crit.feature_heads.mask_token.normal_()
    out = student(x)
    crit(x, out, y)
    terms = crit.pop_stats()
    keep_idx = crit.last_keep_idx
    assert keep_idx.shape == (4, 8)

    with torch.no_grad():
        s_shallow, s_deep = hand_features(student, x, 2 if distilled else 1)
        # the pruned teacher, by hand: position embedding first, then the kept patches only
        t_shallow, t_deep = hand_features(teacher, teacher_pixels(student, teacher, x), 1, keep_idx=keep_idx)
        noise = torch.rand(4, 16, generator=torch.Generator().manual_seed(SEED))
        aligned, generated, masked = hand_heads(crit.feature_heads, s_shallow, s_deep, noise, RATIO, (4, 4))
        pick = keep_idx.unsqueeze(-1)
        mimic = sum(((torch.gather(a, 1, pick.expand(-1, -1, 96)) - t) ** 2).sum()
                    for a, t in zip(aligned, t_shallow)) / 4 * ALPHA
        supervised = torch.gather(masked, 1, keep_idx)  # masked in the student, kept in the teacher
        err = ((torch.gather(generated, 1, pick.expand(-1, -1, 96)) - t_deep) ** 2).sum(-1)
        gen = (err * supervised).sum() / supervised.sum() * 8 * BETA / RATIO  # 8 = masked per image, unmasked ref
    assert 0 < supervised.sum() < 4 * 8
    assert terms["loss_vitkd_mimic"] == pytest.approx(float(mimic), rel=1e-5)
    assert terms["loss_vitkd_gen"] == pytest.approx(float(gen), rel=1e-5)
    crit.remove_hooks()


def _random_keep(batch, n, k, gen):
    return torch.rand(batch, n, generator=gen).argsort(dim=1)[:, :k]


def test_generation_scale_is_exactly_keep_independent_for_uniform_error():
    # Identical-features construction: every position has the same error, so the unmasked reference value is known
    # and every keep ratio must reproduce it, whichever positions happen to be kept.
    gen = torch.Generator().manual_seed(0)
    batch, n, dim = 6, 64, 5
    generated = torch.zeros(batch, n, dim)
    t_full = torch.full((batch, n, dim), 0.5)
    mask = features.generation_mask(batch, n, RATIO, device=torch.device("cpu"), generator=gen)
    _, ref = vitkd_terms([], generated, [], t_full, mask=mask, keep_idx=None, alpha=1.0, beta=BETA,
                         mask_ratio=RATIO)
    assert float(ref) == pytest.approx(32 * dim * 0.25 * BETA / RATIO)
    for k in (48, 32, 16, 8):
        keep_idx = _random_keep(batch, n, k, gen)
        _, val = vitkd_terms([], generated, [], t_full[:, :k], mask=mask, keep_idx=keep_idx, alpha=1.0, beta=BETA,
                             mask_ratio=RATIO)
        assert float(val) == pytest.approx(float(ref), rel=1e-6), k


def test_generation_scale_matches_unmasked_reference_in_expectation():
    # Fixed per-position errors; over random keep sets and generation masks the masked term's mean must equal the
    # unmasked reference's mean at every keep ratio. Without the rescale it would shrink with the keep ratio.
    gen = torch.Generator().manual_seed(1)
    batch, n, dim = 4000, 16, 3
    target = torch.rand(1, n, dim, generator=gen).expand(batch, -1, -1) * torch.linspace(0.1, 3.0, n)[None, :, None]
    generated = torch.zeros(batch, n, dim)
    mask = features.generation_mask(batch, n, RATIO, device=torch.device("cpu"), generator=gen)
    _, ref = vitkd_terms([], generated, [], target, mask=mask, keep_idx=None, alpha=1.0, beta=1.0, mask_ratio=RATIO)
    for k in (12, 8, 4):
        keep_idx = _random_keep(batch, n, k, gen)
        t_kept = torch.gather(target, 1, keep_idx.unsqueeze(-1).expand(-1, -1, dim))
        _, val = vitkd_terms([], generated, [], t_kept, mask=mask, keep_idx=keep_idx, alpha=1.0, beta=1.0,
                             mask_ratio=RATIO)
        assert float(val) == pytest.approx(float(ref), rel=0.03), k
        supervised = torch.gather(mask, 1, keep_idx)
        naive = ((t_kept ** 2).sum(-1) * supervised).sum() / batch / RATIO  # no rescale: scales with k / n
        assert float(naive) == pytest.approx(float(ref) * k / n, rel=0.03)


def test_gradients_reach_student_and_heads_not_teacher(batch):
    x, y = batch
    student, teacher = student_model(False, 64), teacher_model(96)
    twin = copy.deepcopy(student)
    crit = make_loss(student, teacher, keep=0.5)
    crit(x, student(x), y).backward()
    heads = crit.feature_heads
    for name, p in heads.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in teacher.parameters())
    # The feature terms change the student's gradient (the same loss without them gives another one).
    plain = MaskedDistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", 0.5, 1.0, student=twin, keep_ratio=0.5)
    torch.manual_seed(0)
    plain(x, twin(x), y).backward()
    g_feat = student.blocks[0].attn.qkv.weight.grad
    g_plain = twin.blocks[0].attn.qkv.weight.grad
    assert not torch.allclose(g_feat, g_plain)
    crit.remove_hooks()
    plain.remove_hooks()


def test_hooks_leave_student_outputs_and_grads_unchanged(batch):
    x, y = batch
    hooked, bare = student_model(False, 64), student_model(False, 64)
    crit = make_loss(hooked, teacher_model(96))
    out_h, out_b = hooked(x), bare(x)
    assert torch.equal(out_h, out_b)
    F.cross_entropy(out_h, y).backward()
    F.cross_entropy(out_b, y).backward()
    for (name, a), b in zip(hooked.named_parameters(), bare.parameters()):
        assert torch.equal(a.grad, b.grad), name
    crit.remove_hooks()
    assert not any(m._forward_hooks for m in hooked.modules())


def test_eval_no_grad_and_ema_copies_are_not_captured(batch):
    x, y = batch
    student, teacher = student_model(False, 64), teacher_model(96)
    crit = make_loss(student, teacher)
    ema = copy.deepcopy(student)  # an EMA copy carries the hooks but must never write into the loss
    ema(x)
    with torch.no_grad():
        student(x)
    student.eval()
    student(x)
    student.train()
    with pytest.raises(FeatureKDError, match="no student features were captured"):
        crit.feature_kd.student_features.take(4)
    crit.remove_hooks()


def test_heads_not_in_student_state_and_param_groups(batch):
    student, teacher = student_model(False, 64), teacher_model(96)
    crit = make_loss(student, teacher)
    heads_ids = {id(p) for p in crit.feature_heads.parameters()}
    assert not heads_ids & {id(p) for p in student.parameters()}
    groups = crit.feature_param_groups(0.05)
    decay = {id(p) for p in groups[0]["params"]}
    no_decay = {id(p) for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert decay | no_decay == heads_ids and not decay & no_decay
    assert id(crit.feature_heads.mask_token) in no_decay
    assert id(crit.feature_heads.generator[0].bias) in no_decay and id(crit.feature_heads.generator[0].weight) in decay
    crit.remove_hooks()


def test_cost_table_counts_the_heads(batch):
    student, teacher = student_model(False, 64), teacher_model(96)
    crit = make_loss(student, teacher, keep=0.5)
    cost = crit.supervision_cost(img_size=(32, 32), student=student)
    # Hand count (one multiply-add each): 2 shallow aligners on 8 kept tokens, the deep one on 16, two 3x3 convs
    # over the 4x4 grid (fvcore counts the padded positions too: one MAC per output position and kernel tap).
    expected = (2 * 8 + 16) * 64 * 96 + 2 * 16 * 96 * 96 * 9
    assert cost.feature_heads * 1e9 == pytest.approx(expected, rel=0.01)
    assert "feature heads" in cost.table()
    crit.remove_hooks()


def test_clear_errors(batch):
    student, teacher = student_model(False, 64), teacher_model(96)
    with pytest.raises(FeatureKDError, match="distillation_type='soft'"):
        MaskedDistillationLoss(nn.CrossEntropyLoss(), teacher, "none", 0.5, 1.0, student=student, feature_kd="vitkd")
    with pytest.raises(FeatureKDError, match="patch grid"):
        make_loss(student, named_tiny("vit_small_patch16_224", patch_size=4, embed_dim=96, num_heads=2))
    with pytest.raises(FeatureKDError, match="vitkd_layers"):
        make_loss(student, teacher, vitkd_layers=(0, 5))
    with pytest.raises(FeatureKDError, match="compile_teacher"):
        make_loss(student, teacher, compile_teacher=True)
    with pytest.raises(FeatureKDError, match="blocks"):
        make_loss(student, timm_cnn())
    with pytest.raises(FeatureKDError, match="not one of"):
        MaskedDistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", 0.5, 1.0, student=student, feature_kd="fitnet")
    crit = make_loss(student, teacher)
    with pytest.raises(FeatureKDError, match="no student features"):
        crit(batch[0], torch.zeros(4, NUM_CLASSES), batch[1])
    crit.remove_hooks()


def timm_cnn():
    import timm
    return timm.create_model("resnet10t", pretrained=False, num_classes=NUM_CLASSES)


# --- DDP: two processes train the heads exactly as one process does -------------------------------------------
def _ddp_worker(rank, world, init_file, full_mask, x, y, result_file):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(100 + rank)  # different per rank, as main_maskedkd seeds: DDP must broadcast rank 0's init
        half = x.shape[0] // world
        part = slice(rank * half, (rank + 1) * half)
        features.generation_mask = lambda *a, **k: full_mask[part]  # the 1-process run's mask rows
        student, teacher = class_vit(64).train(), class_vit(96, seed=1).eval()
        torch.manual_seed(100 + rank)
        crit = make_loss(student, teacher, keep=1.0)
        crit(x[part], student(x[part]), y[part]).backward()
        torch.save({n: (p.detach().clone(), p.grad.clone()) for n, p in crit.feature_heads.named_parameters()},
                   f"{result_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_equal_one(batch, monkeypatch):
    import torch.multiprocessing as mp
    x, y = batch
    full_mask = features.generation_mask(4, 16, RATIO, device=torch.device("cpu"),
                                         generator=torch.Generator().manual_seed(3))
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "heads.pt")
        mp.spawn(_ddp_worker, args=(2, os.path.join(tmp, "init"), full_mask, x, y, result), nprocs=2, join=True)
        ranks = [torch.load(f"{result}.{r}") for r in range(2)]
    monkeypatch.setattr(features, "generation_mask", lambda *a, **k: full_mask)
    student, teacher = class_vit(64).train(), class_vit(96, seed=1).eval()
    torch.manual_seed(100)  # rank 0's heads
    crit = make_loss(student, teacher, keep=1.0)
    crit(x, student(x), y).backward()
    for name, p in crit.feature_heads.named_parameters():
        for two in ranks:  # rank 1 started from other random heads: DDP broadcast rank 0's, then averaged grads
            value, grad = two[name]
            assert torch.equal(value, p.detach()), name
            assert torch.allclose(grad, p.grad, rtol=1e-4, atol=1e-7), name
    crit.remove_hooks()


def test_token_count_is_checked_against_the_patch_grid():
    # Dynamic-size models fed 48 px make 6x6 = 36 patches, not the 4x4 grid ViTKD pairs positions on: refuse clearly
    # rather than slicing 16 arbitrary tokens.
    student = named_tiny("deit_tiny_patch16_224", embed_dim=64, num_heads=2, dynamic_img_size=True).train()
    teacher = named_tiny("vit_small_patch16_224", embed_dim=96, num_heads=2, seed=1, dynamic_img_size=True).eval()
    crit = make_loss(student, teacher, keep=1.0)
    x = torch.randn(2, 3, 48, 48)
    with pytest.raises(FeatureKDError, match="patch grid does not match the input"):
        crit(x, student(x), torch.zeros(2, dtype=torch.long))
    crit.remove_hooks()


# --- any timm 0.4.12 .. 1.0.x: models built from the classes, hand forward without timm's _pos_embed helper -------
def class_vit(width, *, distilled=False, seed=0):
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(seed)
    kw = dict(img_size=32, patch_size=8, embed_dim=width, depth=2, num_heads=2, num_classes=NUM_CLASSES)
    if not distilled:
        return VisionTransformer(**kw)
    try:
        from timm.models.deit import VisionTransformerDistilled  # timm >= 0.6
    except ImportError:
        return VisionTransformer(distilled=True, **kw)  # timm 0.4/0.5: (cls, dist) outputs while training
    model = VisionTransformerDistilled(**kw)
    model.set_distilled_training(True)
    return model


def hand_features_any_timm(model, x, keep_idx=None):
    patches = model.patch_embed(x)
    prefix = [model.cls_token] + ([model.dist_token] if getattr(model, "dist_token", None) is not None else [])
    tokens = torch.cat([p.expand(x.shape[0], -1, -1) for p in prefix] + [patches], dim=1) + model.pos_embed
    n = len(prefix)
    if keep_idx is not None:
        idx = keep_idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
        tokens = torch.cat([tokens[:, :n], torch.gather(tokens[:, n:], 1, idx)], dim=1)
    outs = []
    for block in model.blocks:
        tokens = block(tokens)
        outs.append(tokens[:, n:])
    return outs, model.norm(tokens)[:, n:]


@pytest.mark.parametrize("keep", [1.0, 0.5])
@pytest.mark.parametrize("distilled", [False, True], ids=["plain", "distilled"])
def test_mimicking_on_any_timm(distilled, keep, batch):
    x, y = batch
    student, teacher = class_vit(64, distilled=distilled).train(), class_vit(96, seed=1).eval()
    stats = dict(student_mean=(0.5,) * 3, student_std=(0.5,) * 3, teacher_mean=(0.5,) * 3, teacher_std=(0.5,) * 3)
    crit = make_loss(student, teacher, keep=keep, **stats)
    crit(x, student(x), y)
    keep_idx = crit.last_keep_idx
    assert (keep_idx is None) == (keep == 1.0)
    with torch.no_grad():
        s_shallow, _ = hand_features_any_timm(student, x)
        t_shallow, _ = hand_features_any_timm(teacher, x, keep_idx)
        if keep_idx is not None:
            s_shallow = [torch.gather(s, 1, keep_idx.unsqueeze(-1).expand(-1, -1, 64)) for s in s_shallow]
        aligners = crit.feature_heads.shallow_align
        mimic = sum(((F.linear(s, a.weight, a.bias) - t) ** 2).sum()
                    for a, s, t in zip(aligners, s_shallow, t_shallow)) / 4 * ALPHA
    assert crit.pop_stats()["loss_vitkd_mimic"] == pytest.approx(float(mimic), rel=1e-5)
    crit.remove_hooks()
