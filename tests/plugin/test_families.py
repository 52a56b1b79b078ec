"""Masked teacher families on tiny timm builds: each against computations written here, never the plugin's own.

References: (1) the model's own eval output, which the pruned forward must reproduce with every patch kept, in a
shuffled order; (2) the model's own forward with the dropped patches masked out as attention keys (patched into
``F.scaled_dot_product_attention``): with a class-token head the kept tokens then see exactly what the pruned
forward shows them, so the logits must agree, rotary tables and relative position biases included; (3) pixels of
dropped patches must not reach the pruned output. Families a timm version lacks are skipped.
"""
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from tinymodels import NUM_CLASSES, tiny
from deit_patch import layout
from deit_patch.cost import teacher_gflops
from deit_patch.teachers import UnsupportedTeacherError, find_family, pruned_forward, snap_keep, verify_family
from deit_patch.tiny_builds import TINY_BUILDS, TinyBuild, build_tiny

VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)

# name -> (tiny build, registered family); cls-token builds also run the masked-key reference
CASES = {
    "vit": (TINY_BUILDS["vision_transformer.VisionTransformer"], "vit"),
    "vit_siglip_map": (TinyBuild("vit_base_patch16_siglip_224", VIT), "vit"),
    "vit_hybrid": (TINY_BUILDS["vision_transformer_hybrid.VisionTransformer"], "vit"),
    "eva02": (TinyBuild("eva02_tiny_patch14_224", dict(VIT, global_pool="token")), "eva"),
    "eva02_avg": (TINY_BUILDS["eva.Eva"], "eva"),
    "eva01": (TinyBuild("eva_giant_patch14_224", VIT), "eva"),
    "dinov3_registers": (TinyBuild("vit_small_patch16_dinov3", dict(VIT, global_pool="token")), "eva"),
    "perception_encoder": (TinyBuild("vit_pe_core_tiny_patch16_384", VIT), "eva"),
    "rope_mixed": (TinyBuild("vit_small_patch16_rope_mixed_224", dict(VIT, global_pool="token")), "eva"),
    "beit": (TinyBuild("beit_base_patch16_224", dict(VIT, use_rel_pos_bias=True, global_pool="token")), "beit"),
    "beit_shared_bias": (TinyBuild("beit_base_patch16_224", dict(VIT, use_shared_rel_pos_bias=True,
                                                                 global_pool="token")), "beit"),
    "beitv2": (TinyBuild("beitv2_base_patch16_224", VIT), "beit"),
    "vit_relpos": (TINY_BUILDS["vision_transformer_relpos.VisionTransformerRelPos"], "vit_relpos"),
    "vit_srelpos": (TinyBuild("vit_srelpos_small_patch16_224", VIT), "vit_relpos"),
    "vit_relpos_cls": (TinyBuild("vit_relpos_medium_patch16_cls_224", VIT), "vit_relpos"),
    "vit_relpos_bias": (TinyBuild("vit_relpos_small_patch16_224", dict(VIT, rel_pos_type="bias",
                                                                          class_token=True, global_pool="token")),
                        "vit_relpos"),
    "naflexvit": (TINY_BUILDS["naflexvit.NaFlexVit"], "naflexvit"),
    "naflexvit_cls": (TinyBuild("naflexvit_base_patch16_gap", dict(VIT, class_token=True, global_pool="token")),
                      "naflexvit"),
    "naflexvit_rope_mixed": (TinyBuild("naflexvit_base_patch16_gap", dict(VIT, rope_type="mixed")), "naflexvit"),
    "hiera": (TINY_BUILDS["hiera.Hiera"], "hiera"),
    "xcit": (TINY_BUILDS["xcit.Xcit"], "xcit"),
}
CONV_STEM = {"vit_hybrid", "xcit"}  # overlapping stems see neighbouring pixels: dropped tokens are checked instead
NOT_TOKEN_ATTENTION = {"xcit"}  # cross-covariance attention mixes channels, not tokens: no key mask to apply


def build(case: str) -> nn.Module:
    entry, _ = CASES[case]
    if not timm.list_models(entry.model):
        pytest.skip(f"timm {timm.__version__} has no {entry.model}")
    try:
        model = build_tiny(entry)
    except Exception as err:  # the builds are written for timm 1.0.x
        pytest.skip(f"timm {timm.__version__} cannot build the tiny {case}: {err}")
    if layout.built_image_size(model) not in (None, (entry.img, entry.img)):
        pytest.skip(f"timm {timm.__version__} builds the tiny {case} for {layout.built_image_size(model)} px")
    with torch.no_grad():  # timm initialises heads and layer scales near zero; real values make comparisons bite
        for name, param in model.named_parameters():
            if "head" in name and param.dim() == 2:
                param.normal_(0, 0.3)
            if name.split(".")[-1] in ("gamma", "gamma_1", "gamma_2", "gamma1", "gamma2", "gamma3"):
                param.fill_(0.5)
    return model


def images(entry: TinyBuild, batch: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, entry.img, entry.img, generator=torch.Generator().manual_seed(seed))


def random_keep(batch: int, patches: int, kept: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(patches, generator=g)[:kept].sort().values for _ in range(batch)])


def grid_of(model: nn.Module, entry: TinyBuild):
    grid = layout.patch_grid(model, (entry.img, entry.img))
    assert grid is not None
    return grid


@pytest.mark.parametrize("case", list(CASES))
def test_every_patch_kept_in_any_order_is_the_model_itself(case):
    model = build(case)
    entry, family = CASES[case]
    assert find_family(model).name == family
    verify_family(model, find_family(model))
    rows, cols = grid_of(model, entry)
    x = images(entry)
    g = torch.Generator().manual_seed(3)
    order = torch.stack([torch.randperm(rows * cols, generator=g) for _ in range(x.shape[0])])
    if case == "hiera":
        order = order.sort(dim=1).values  # whole mask units, in Hiera's own order
    with torch.no_grad():
        torch.testing.assert_close(pruned_forward(model, x, order), model(x), rtol=1e-4, atol=1e-4)


def _key_mask(rows_kept: torch.Tensor, total: int) -> torch.Tensor:
    mask = torch.full((rows_kept.shape[0], total), float("-inf"))
    mask.scatter_(1, rows_kept, 0.0)
    return mask[:, None, None, :]


@pytest.mark.parametrize("case", [c for c in CASES if c not in NOT_TOKEN_ATTENTION and (
    CASES[c][0].kwargs().get("global_pool") == "token" or c in ("vit", "vit_relpos_cls"))])
def test_kept_tokens_see_what_the_full_model_shows_them_with_dropped_keys_masked(case, monkeypatch):
    model = build(case)
    entry, _ = CASES[case]
    assert layout.class_token_is_read(model) is True  # avg/map pooling would also read the masked queries
    rows, cols = grid_of(model, entry)
    prefix = find_family(model).num_prefix(model)
    x = images(entry)
    keep = random_keep(x.shape[0], rows * cols, rows * cols // 2)
    kept_rows = torch.cat([torch.arange(prefix).expand(x.shape[0], -1), keep + prefix], dim=1)
    key_mask = _key_mask(kept_rows, prefix + rows * cols)
    real_sdpa = F.scaled_dot_product_attention
    calls = []

    def masked_sdpa(q, k, v, attn_mask=None, **kwargs):
        calls.append(k.shape[-2])
        extra = key_mask.to(q.dtype)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill(~attn_mask, float("-inf"))
        return real_sdpa(q, k, v, attn_mask=extra if attn_mask is None else attn_mask + extra, **kwargs)

    with torch.no_grad():
        pruned = pruned_forward(model, x, keep)
        monkeypatch.setattr(F, "scaled_dot_product_attention", masked_sdpa)
        reference = model(x)
    if not calls:
        pytest.skip(f"timm {timm.__version__}'s {case} builds its attention map by hand (no SDPA to mask)")
    assert all(n == prefix + rows * cols for n in calls)
    torch.testing.assert_close(pruned, reference, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        monkeypatch.setattr(F, "scaled_dot_product_attention", real_sdpa)
        assert not torch.allclose(pruned, model(x), atol=1e-3)


@pytest.mark.parametrize("case", [c for c in CASES if c not in CONV_STEM])
def test_pixels_of_dropped_patches_do_not_reach_the_teacher(case):
    model = build(case)
    entry, _ = CASES[case]
    rows, cols = grid_of(model, entry)
    x = images(entry, batch=2)
    keep = snap_keep(model, random_keep(2, rows * cols, rows * cols // 2))
    size_y, size_x = entry.img // rows, entry.img // cols
    dropped = torch.ones(2, rows * cols, dtype=torch.bool).scatter(1, keep, False)
    pixel_mask = dropped.view(2, 1, rows, 1, cols, 1).expand(2, 1, rows, size_y, cols, size_x)
    pixel_mask = pixel_mask.reshape(2, 1, entry.img, entry.img)
    with torch.no_grad():
        base = pruned_forward(model, x, keep)
        noisy = pruned_forward(model, x + 5.0 * pixel_mask * torch.randn_like(x), keep)
        seen = pruned_forward(model, x + 5.0 * (~pixel_mask) * torch.randn_like(x), keep)
    torch.testing.assert_close(noisy, base, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(seen, base, atol=1e-3)


@pytest.mark.parametrize("case", sorted(CONV_STEM))
def test_embeddings_of_dropped_patches_do_not_reach_the_teacher(case):
    # Where the stem's receptive fields overlap, pixels leak by design; the patch tokens it makes must not.
    model = build(case)
    entry, _ = CASES[case]
    rows, cols = grid_of(model, entry)
    x = images(entry, batch=2)
    keep = random_keep(2, rows * cols, rows * cols // 2)
    dropped = torch.ones(2, rows * cols, dtype=torch.bool).scatter(1, keep, False)
    noise = {}

    def perturb(module, inputs, output):
        tokens = output[0] if isinstance(output, tuple) else output
        tokens = tokens + noise["where"].unsqueeze(-1) * 5.0 * torch.randn_like(tokens)
        return (tokens,) + tuple(output[1:]) if isinstance(output, tuple) else tokens

    with torch.no_grad():
        base = pruned_forward(model, x, keep)
        handle = model.patch_embed.register_forward_hook(perturb)
        try:
            noise["where"] = dropped.float()
            noisy = pruned_forward(model, x, keep)
            noise["where"] = (~dropped).float()
            seen = pruned_forward(model, x, keep)
        finally:
            handle.remove()
    torch.testing.assert_close(noisy, base, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(seen, base, atol=1e-3)


def student_for(entry: TinyBuild) -> nn.Module:
    return tiny("deit_tiny_patch16_224", img_size=entry.img, patch_size=entry.img // 4, seed=1)




@pytest.mark.parametrize("case", list(CASES))
def test_masked_training_step_through_the_loss(case):
    from losses import MaskedDistillationLoss
    model = build(case)
    entry, _ = CASES[case]
    student = student_for(entry)
    x = images(entry, batch=4)
    y = torch.randint(0, NUM_CLASSES, (4,), generator=torch.Generator().manual_seed(0))
    stats = dict(teacher_mean=(0.5,) * 3, teacher_std=(0.5,) * 3, student_mean=(0.5,) * 3, student_std=(0.5,) * 3)
    values = {}
    for keep in (0.5, 1.0):
        loss_fn = MaskedDistillationLoss(nn.CrossEntropyLoss(), model, "soft", 0.5, 1.0, student=student,
                                         keep_ratio=keep, **stats)
        assert loss_fn.masking == (keep < 1.0)
        student.zero_grad()
        loss = loss_fn(x, student.train()(x), y)
        loss.backward()
        assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in student.parameters()
                                            if p.grad is not None)
        values[keep] = float(loss)
        loss_fn.remove_hooks()
    assert values[0.5] != pytest.approx(values[1.0], abs=1e-6)


@pytest.mark.parametrize("case", ["vit", "eva02", "rope_mixed", "beit", "vit_relpos_cls", "naflexvit", "hiera",
                                  "xcit"])
def test_pruned_forward_has_an_fvcore_cost_below_the_full_one(case):
    pytest.importorskip("fvcore")
    model = build(case)
    entry, _ = CASES[case]
    rows, cols = grid_of(model, entry)
    full = teacher_gflops(model, img_size=(entry.img, entry.img), num_keep=None)
    half = teacher_gflops(model, img_size=(entry.img, entry.img), num_keep=rows * cols // 2)
    everything = teacher_gflops(model, img_size=(entry.img, entry.img), num_keep=rows * cols)
    assert 0 < half < 0.8 * full
    assert everything == pytest.approx(full, rel=0.1)  # the pruned forward at keep-all costs the model's own


@pytest.mark.parametrize("case", ["eva02", "dinov3_registers", "beit", "vit_relpos_cls", "naflexvit", "xcit"])
def test_vitkd_features_on_a_masked_teacher(case):
    from losses import MaskedDistillationLoss
    model = build(case)
    entry, _ = CASES[case]
    student = student_for(entry)
    x = images(entry, batch=4)
    y = torch.randint(0, NUM_CLASSES, (4,), generator=torch.Generator().manual_seed(0))
    loss_fn = MaskedDistillationLoss(nn.CrossEntropyLoss(), model, "soft", 0.5, 1.0, student=student,
                                     keep_ratio=0.5, feature_kd="vitkd", vitkd_alpha=1.0, vitkd_beta=1.0,
                                     teacher_mean=(0.5,) * 3, teacher_std=(0.5,) * 3, student_mean=(0.5,) * 3,
                                     student_std=(0.5,) * 3)
    loss = loss_fn(x, student.train()(x), y)
    terms = loss_fn.pop_stats()
    loss.backward()
    assert torch.isfinite(loss) and terms["loss_vitkd_mimic"] > 0 and terms["loss_vitkd_gen"] > 0


def test_hiera_keeps_the_mask_units_holding_most_kept_patches():
    model = build("hiera")
    rows, cols = model.tokens_spatial_shape
    unit_y, unit_x = model.mask_unit_size
    units_x = cols // unit_x

    def unit(token):  # written out here: the mask unit of a raster token index
        return (token // cols // unit_y) * units_x + (token % cols) // unit_x

    # every patch of units 0 and 5 plus two stray patches of unit 3: 2 units worth of patches -> units 0 and 5
    tokens = torch.arange(rows * cols)
    wanted = tokens[(unit(tokens) == 0) | (unit(tokens) == 5)]
    stray = tokens[unit(tokens) == 3][:2]
    keep = torch.cat([wanted[:-2], stray]).unsqueeze(0)
    snapped = snap_keep(model, keep)[0]
    assert torch.equal(snapped, wanted)
    with pytest.raises(UnsupportedTeacherError, match="whole mask units"):
        from deit_patch.teachers import TEACHER_FAMILIES
        TEACHER_FAMILIES["hiera"].forward(model, torch.zeros(1, 3, 64, 64), keep)


def test_a_family_that_forgets_to_move_its_rotary_table_is_refused():
    # The shuffled keep-all probe of verify_family catches a positional term that does not follow its token.
    from deit_patch import teachers
    model = build("eva02")
    with torch.no_grad():  # sharper attention, so where each token sits matters well above rounding
        for block in model.blocks:
            for proj in (getattr(block.attn, name, None) for name in ("qkv", "q_proj", "k_proj")):
                if proj is not None:
                    proj.weight.mul_(4.0)
    family = find_family(model)

    def forgetful(model, images, keep_idx):  # gathers the tokens but leaves the rotary table in raster order
        patches = model.patch_embed(images)
        tokens, rope = model._pos_embed(patches)
        if keep_idx is not None:
            tokens = teachers.gather_patches(tokens, keep_idx, 1)
        for block in model.blocks:
            tokens = block(tokens, rope=rope)
        return model.forward_head(model.norm(tokens))

    import dataclasses
    with pytest.raises(UnsupportedTeacherError, match="does not reproduce"):
        verify_family(model, dataclasses.replace(family, forward=forgetful))
    verify_family(model, family)



def test_vitkd_on_a_teacher_without_vit_blocks_is_refused_by_name():
    from deit_patch.features import FeatureKDError
    from losses import MaskedDistillationLoss
    model = build("hiera")
    entry, _ = CASES["hiera"]
    with pytest.raises(FeatureKDError, match="Hiera.+feature_kd"):
        MaskedDistillationLoss(nn.CrossEntropyLoss(), model, "soft", 0.5, 1.0, student=student_for(entry),
                               keep_ratio=0.5, feature_kd="vitkd", teacher_mean=(0.5,) * 3, teacher_std=(0.5,) * 3,
                               student_mean=(0.5,) * 3, student_std=(0.5,) * 3)


@pytest.mark.parametrize("keep", [0.5, 0.4, 0.3])
def test_hiera_step_reports_the_whole_units_it_ran(keep):
    # The step used to return and count the chosen patches while the teacher ran on whole mask units around them.
    from deit_patch.masked_teacher import MaskedTeacher
    model = build("hiera")
    entry, _ = CASES["hiera"]
    unit = int(model.mu_size)
    masked = MaskedTeacher(model, keep_ratio=keep, mask_mode="random")
    x = images(entry, batch=2)
    logits, keep_idx = masked(x)
    assert masked.last_step.num_kept == keep_idx.shape[1] and keep_idx.shape[1] % unit == 0
    with torch.no_grad():  # the whole units of every kept patch are kept: an independent count per sample
        rows, cols = model.tokens_spatial_shape
        unit_rows, unit_cols = model.mask_unit_size
        unit_of = [(i // cols) // unit_rows * (cols // unit_cols) + (i % cols) // unit_cols for i in range(rows * cols)]
        for sample in keep_idx.tolist():
            units = {unit_of[i] for i in sample}
            assert len(sample) == len(units) * unit
        torch.testing.assert_close(logits, pruned_forward(model, x, keep_idx))
