"""The benchmark's own references (bench/models.py) against independent computations.

The hand-written gather forwards are what the plugin's pruned teacher is timed against, so they must compute the
teacher's own function: with every patch kept they must give ``model(x)``; with a subset, the EVA one must match
timm's own patch-dropout path (rotary table indexed there by timm's code) and the ViT one the plugin's forward.
"""
import pytest
import timm
import torch
import torch.nn as nn

from bench.models import TokenCounter, keep_count, reference_forward
from deit_patch.masking import topk_indices
from deit_patch.teachers import find_family, pruned_forward
from tinymodels import tiny


def _subset(batch: int, patches: int, kept: int, seed: int = 0) -> torch.Tensor:
    noise = torch.rand(batch, patches, generator=torch.Generator().manual_seed(seed))
    return noise.argsort(dim=1)[:, :kept].sort(dim=1).values


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit3_small_patch16_224"])
def test_vit_reference_is_the_model_with_every_patch_and_the_plugin_with_a_subset(name):
    model = tiny(name).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    patches = 16  # 32 px / patch 8
    with torch.no_grad():
        every = reference_forward(model, x, torch.arange(patches).expand(2, -1))
        torch.testing.assert_close(every, model(x), rtol=1e-5, atol=1e-5)
        idx = _subset(2, patches, 6)
        torch.testing.assert_close(reference_forward(model, x, idx), pruned_forward(model, x, idx, find_family(model)),
                                   rtol=1e-5, atol=1e-5)


class _FixedPatchDrop(nn.Module):
    """Stands in for timm's PatchDropout: keeps the given patches and returns their indices, as timm expects."""

    def __init__(self, keep_idx: torch.Tensor, prefix: int):
        super().__init__()
        self.keep_idx, self.prefix = keep_idx, prefix

    def forward(self, x):
        rows = torch.arange(x.shape[0]).unsqueeze(1)
        kept = x[rows, self.prefix + self.keep_idx]
        return torch.cat([x[:, :self.prefix], kept], dim=1), self.keep_idx


def test_eva_reference_matches_timm_patch_dropout_path():
    if not timm.list_models("eva02_tiny_patch14_224"):
        pytest.skip(f"timm {timm.__version__} has no EVA-02")
    torch.manual_seed(0)
    model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=48, patch_size=6, depth=2,
                              embed_dim=32, num_heads=2, num_classes=0).eval()  # features: O(1)
    if not hasattr(model, "patch_drop") or "keep_indices" not in timm.models.eva.Eva._pos_embed.__code__.co_varnames:
        pytest.skip("this timm's Eva has no patch-dropout path that returns the kept indices")
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    patches, prefix = 64, int(model.num_prefix_tokens)
    with torch.no_grad():
        every = reference_forward(model, x, torch.arange(patches).expand(2, -1))
        torch.testing.assert_close(every, model(x), rtol=1e-5, atol=1e-5)
        idx = _subset(2, patches, 20)
        ours = reference_forward(model, x, idx)
        model.patch_drop = _FixedPatchDrop(idx, prefix)
        timm_way = model(x)
    torch.testing.assert_close(ours, timm_way, rtol=1e-5, atol=1e-5)
    assert (ours - every).abs().max() > 1e-2, "dropping 44 of 64 patches should change the features"


def test_keep_count_is_the_nearest_count_and_at_least_one():
    class Grid(nn.Module):
        def __init__(self, rows, cols):
            super().__init__()
            self.patch_embed = nn.Module()
            self.patch_embed.grid_size = (rows, cols)

    assert keep_count(Grid(14, 14), 0.5) == 98   # the paper's 98 of 196
    assert keep_count(Grid(14, 14), 0.25) == 49
    assert keep_count(Grid(16, 16), 0.75) == 192
    assert keep_count(Grid(4, 4), 0.01) == 1
    assert keep_count(Grid(4, 4), 1.0) == 16


def test_topk_indices_and_token_counter():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.8, 0.2, 0.6, 0.1]])
    assert topk_indices(scores, 2).tolist() == [[1, 3], [0, 2]]
    model = tiny("deit_tiny_patch16_224").eval()
    counter = TokenCounter(model)
    with torch.no_grad():
        pruned_forward(model, torch.randn(1, 3, 32, 32), torch.tensor([[0, 3, 5]]), find_family(model))
    counter.remove()
    assert counter.tokens == 1 + 3
