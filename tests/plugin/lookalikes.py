"""Models written the way DeiT's own repository writes them (models.py, models_v2.py, cait_models.py), for tests.

Written for these tests from the architectures' descriptions, not copied: what matters is the shape of the code a
DeiT user has (a distilled subclass of timm's VisionTransformer with its own forward, modules that are not timm
classes at all), built only from timm parts that exist from timm 0.4.12 to 1.0.x.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import PatchEmbed, VisionTransformer

NUM_CLASSES = 10
DIM, HEADS = 32, 2


class RepoDistilled(VisionTransformer):
    """models.py style: timm's ViT plus a distillation token, head and its own forward_features/forward."""

    def __init__(self, img_size=32, patch_size=8, depth=2, num_classes=NUM_CLASSES, embed_dim=DIM, num_heads=HEADS):
        super().__init__(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                         num_heads=num_heads, num_classes=num_classes)
        self.dist_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, self.patch_embed.num_patches + 2, embed_dim) * 0.02)
        self.head_dist = nn.Linear(embed_dim, num_classes)
        nn.init.normal_(self.head.weight, std=0.2)  # old timm zero-initialises heads: give the test logits to compare
        nn.init.normal_(self.head_dist.weight, std=0.2)

    def forward_features(self, x):
        n = x.shape[0]
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(n, -1, -1), self.dist_token.expand(n, -1, -1), x), dim=1)
        x = self.pos_drop(x + self.pos_embed)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return x[:, 0], x[:, 1]

    def forward(self, x):
        cls_feat, dist_feat = self.forward_features(x)
        cls_out, dist_out = self.head(cls_feat), self.head_dist(dist_feat)
        if self.training:
            return cls_out, dist_out
        return (cls_out + dist_out) / 2


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection, written out (no SDPA)."""

    def __init__(self, dim, num_heads, talking_heads=False):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        # CaiT's talking heads: linear maps across heads before and after the softmax.
        self.mix_pre = nn.Linear(num_heads, num_heads) if talking_heads else None
        self.mix_post = nn.Linear(num_heads, num_heads) if talking_heads else None

    def forward(self, x):
        n, t, c = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        logits = (q * self.scale) @ k.transpose(-2, -1)
        if self.mix_pre is not None:
            logits = self.mix_pre(logits.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        weights = logits.softmax(-1)
        if self.mix_post is not None:
            weights = self.mix_post(weights.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.proj((weights @ v).transpose(1, 2).reshape(n, t, c))


class ClassAttention(nn.Module):
    """CaiT's class attention: only the class token queries; keys/values are class token + patches."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        n, t, c = x.shape
        split = lambda y, m: y.view(n, m, self.num_heads, c // self.num_heads).transpose(1, 2)
        q = split(self.q(x[:, :1]), 1) * self.scale
        k, v = split(self.k(x), t), split(self.v(x), t)
        out = (q @ k.transpose(-2, -1)).softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(n, 1, c))


class ScaledBlock(nn.Module):
    """Pre-norm block with per-channel layer scale on both residual branches (DeiT-III / CaiT)."""

    def __init__(self, dim, num_heads, talking_heads=False, init=0.5):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, num_heads, talking_heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.gamma_1 = nn.Parameter(init * torch.ones(dim))
        self.gamma_2 = nn.Parameter(init * torch.ones(dim))

    def forward(self, x):
        x = x + self.gamma_1 * self.attn(self.norm1(x))
        return x + self.gamma_2 * self.mlp(self.norm2(x))


class ClassBlock(nn.Module):
    """CaiT's class-attention block: updates the class token from (class token, patches)."""

    def __init__(self, dim, num_heads, init=0.5):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = ClassAttention(dim, num_heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.gamma_1 = nn.Parameter(init * torch.ones(dim))
        self.gamma_2 = nn.Parameter(init * torch.ones(dim))

    def forward(self, x, x_cls):
        both = torch.cat((x_cls, x), dim=1)
        x_cls = x_cls + self.gamma_1 * self.attn(self.norm1(both))
        return x_cls + self.gamma_2 * self.mlp(self.norm2(x_cls))


class OwnDeiT3(nn.Module):
    """models_v2.py style (DeiT-III): not a timm class; position embedding on patches, class token added after."""

    def __init__(self, img_size=32, patch_size=8, depth=2, num_classes=NUM_CLASSES, embed_dim=DIM, num_heads=HEADS,
                 drop_rate=0.1):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=3, embed_dim=embed_dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, self.patch_embed.num_patches, embed_dim) * 0.02)
        self.blocks = nn.ModuleList([ScaledBlock(embed_dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        self.drop_rate = drop_rate

    def forward_features(self, x):
        x = self.patch_embed(x) + self.pos_embed
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 0]

    def forward(self, x):
        return self.head(F.dropout(self.forward_features(x), p=self.drop_rate, training=self.training))


class OwnCaiT(nn.Module):
    """cait_models.py style: talking-heads self-attention over patches, then class-attention blocks."""

    def __init__(self, img_size=32, patch_size=8, depth=2, depth_token_only=1, num_classes=NUM_CLASSES,
                 embed_dim=DIM, num_heads=HEADS):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=3, embed_dim=embed_dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, self.patch_embed.num_patches, embed_dim) * 0.02)
        self.pos_drop = nn.Dropout(0.0)
        self.blocks = nn.ModuleList([ScaledBlock(embed_dim, num_heads, talking_heads=True) for _ in range(depth)])
        self.blocks_token_only = nn.ModuleList([ClassBlock(embed_dim, num_heads) for _ in range(depth_token_only)])
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward_features(self, x):
        x = self.pos_drop(self.patch_embed(x) + self.pos_embed)
        for blk in self.blocks:
            x = blk(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        for blk in self.blocks_token_only:
            cls = blk(x, cls)
        return self.norm(torch.cat((cls, x), dim=1))[:, 0]

    def forward(self, x):
        return self.head(self.forward_features(x))


LOOKALIKES = {"repo_distilled": RepoDistilled, "own_deit3": OwnDeiT3, "own_cait": OwnCaiT}


def build(name: str, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return LOOKALIKES[name](**kwargs)
