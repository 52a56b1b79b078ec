"""Pruned teacher logits against forwards written out by hand from each family's parts."""
import pytest
import timm
import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from tinymodels import NUM_CLASSES, tiny
from deit_patch.teachers import (TEACHER_FAMILIES, TeacherFamily, UnsupportedTeacherError, find_family,
                                 pruned_forward, register_family)


def pick(tokens, keep):
    return torch.stack([tokens[b, keep[b]] for b in range(tokens.shape[0])])


def keep_idx(batch, patches, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(patches, generator=g)[:k] for _ in range(batch)])


def run_blocks(model, tokens):
    for block in model.blocks:
        tokens = block(tokens)
    return model.norm(tokens)


def hand_vit(model, x, keep):
    patches = model.patch_embed(x)
    cls = model.cls_token.expand(x.shape[0], -1, -1)
    reg = getattr(model, "reg_token", None)  # register tokens: timm >= 0.9
    extra = [cls] + ([reg.expand(x.shape[0], -1, -1)] if reg is not None else [])
    if getattr(model, "no_embed_class", False):  # DeiT-III: position embedding on patches only
        patches = patches + model.pos_embed
        tokens = torch.cat(extra + [patches], 1)
    else:
        tokens = torch.cat(extra + [patches], 1) + model.pos_embed
    n = sum(t.shape[1] for t in extra)
    tokens = torch.cat([tokens[:, :n], pick(tokens[:, n:], keep)], 1)
    out = run_blocks(model, tokens)
    pooled = out[:, n:].mean(1) if getattr(model, "global_pool", "token") == "avg" else out[:, 0]
    return model.head(pooled)


def hand_distilled(model, x, keep):
    b = x.shape[0]
    tokens = torch.cat([model.cls_token.expand(b, -1, -1), model.dist_token.expand(b, -1, -1),
                        model.patch_embed(x)], 1) + model.pos_embed
    tokens = torch.cat([tokens[:, :2], pick(tokens[:, 2:], keep)], 1)
    out = run_blocks(model, tokens)
    return (model.head(out[:, 0]) + model.head_dist(out[:, 1])) / 2


def hand_cait(model, x, keep):
    tokens = pick(model.patch_embed(x) + model.pos_embed, keep)
    for block in model.blocks:
        tokens = block(tokens)
    cls = model.cls_token.expand(x.shape[0], -1, -1)
    for block in model.blocks_token_only:
        cls = block(tokens, cls)
    return model.head(model.norm(torch.cat([cls, tokens], 1))[:, 0])


class RepoDistilled(VisionTransformer):
    """A teacher written the way DeiT's models.py writes DistilledVisionTransformer."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.dist_token = nn.Parameter(torch.randn(1, 1, self.embed_dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, self.patch_embed.num_patches + 2, self.embed_dim) * 0.02)
        self.head_dist = nn.Linear(self.embed_dim, self.num_classes)

    def forward_features(self, x):
        b = x.shape[0]
        x = torch.cat([self.cls_token.expand(b, -1, -1), self.dist_token.expand(b, -1, -1), self.patch_embed(x)], 1)
        x = self.pos_drop(x + self.pos_embed)
        x = self.norm(self.blocks(x))
        return x[:, 0], x[:, 1]

    def forward(self, x):
        x, x_dist = self.forward_features(x)
        return (self.head(x) + self.head_dist(x_dist)) / 2


def make(name):
    if name == "repo_distilled":
        torch.manual_seed(0)
        return RepoDistilled(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2, num_classes=NUM_CLASSES)
    if name == "cait":
        return tiny("cait_xxs24_224", depth=2, depth_token_only=1)
    kwargs = {"vit_avg": {"global_pool": "avg", "class_token": False},
              "vit_reg": {"reg_tokens": 3}}.get(name, {})
    base = {"vit_avg": "vit_small_patch16_224", "vit_reg": "vit_small_patch16_224"}.get(name, name)
    return tiny(base, **kwargs)


CASES = {
    "deit_small_patch16_224": ("vit", hand_vit),
    "deit3_small_patch16_224": ("vit", hand_vit),
    "vit_reg": ("vit", hand_vit),
    "deit_small_distilled_patch16_224": ("vit", hand_distilled),
    "repo_distilled": ("deit_repo_distilled", hand_distilled),
    "cait": ("cait", hand_cait),
}


@pytest.mark.parametrize("name", list(CASES))
def test_pruned_logits_equal_hand_forward(name, batch):
    x, _ = batch
    model = make(name).eval()
    family, hand = CASES[name]
    assert find_family(model).name == family
    keep = keep_idx(4, 16, 6)
    with torch.no_grad():
        got = pruned_forward(model, x, keep)
        want = hand(model, x, keep)
        full = pruned_forward(model, x, None)
        plain = model(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full, plain, rtol=1e-5, atol=1e-5)  # keeping everything is the unmodified model
    assert not torch.allclose(got, plain)


def test_avg_pooled_teacher_averages_kept_tokens(batch):
    x, _ = batch
    model = make("vit_avg").eval()
    keep = keep_idx(4, 16, 5)
    with torch.no_grad():
        tokens = model.patch_embed(x) + model.pos_embed
        want = model.head(model.fc_norm(run_blocks(model, pick(tokens, keep)).mean(1)))
        torch.testing.assert_close(pruned_forward(model, x, keep), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet18", "resnet10t", "convnext_atto"])
def test_cnn_teachers_are_unsupported(name):
    if not timm.list_models(name):
        pytest.skip(f"timm {timm.__version__} has no {name}")
    model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES)
    with pytest.raises(UnsupportedTeacherError, match="keep_ratio=1.0"):
        pruned_forward(model, torch.randn(1, 3, 32, 32), keep_idx(1, 16, 4))


def test_register_family_is_one_entry(batch):
    x, _ = batch
    calls = []

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(3 * 8 * 8, 16)
            self.head = nn.Linear(16, NUM_CLASSES)

    def embed(model, images):
        p = images.unfold(2, 8, 8).unfold(3, 8, 8).permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)
        return model.proj(p), 0

    def finish(model, tokens):
        calls.append(tokens.shape[1])
        return model.head(tokens.mean(1))

    register_family(TeacherFamily("toy", lambda m: isinstance(m, Toy), embed, finish, num_prefix=lambda m: 0))
    try:
        pruned_forward(Toy(), x, keep_idx(4, 16, 3))
        assert calls == [3]
    finally:
        TEACHER_FAMILIES.pop("toy")
