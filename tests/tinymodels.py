"""Tiny models shared by the tests: 32 px images, depth 2, so the whole suite runs on a 2-core CPU.

Imported as ``from tinymodels import tiny``: pyproject.toml puts tests/ on pytest's path.
"""
import inspect
import os
import sys

import pytest
import timm
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NUM_CLASSES = 10


def _checkpoint_non_reentrant() -> bool:
    # timm >= 1.0's checkpoint_seq takes use_reentrant and defaults to non-reentrant; older timm checkpoints
    # reentrantly, which runs the checkpointed forward without grad (no attention can be read there).
    try:
        from timm.models._manipulate import checkpoint_seq
    except ImportError:
        return False
    return "use_reentrant" in inspect.signature(checkpoint_seq).parameters


TIMM_CHECKPOINT_NON_REENTRANT = _checkpoint_non_reentrant()


def tiny(name: str = "deit_tiny_patch16_224", *, img_size: int = 32, patch_size: int = 8, depth: int = 2,
         seed: int = 0, **kwargs) -> torch.nn.Module:
    """A freshly initialised small timm model; the seed makes two calls build the same weights."""
    torch.manual_seed(seed)
    kwargs.setdefault("num_classes", NUM_CLASSES)
    arch = dict(patch_size=patch_size, depth=depth)
    if not timm.list_models(name):
        pytest.skip(f"timm {timm.__version__} has no {name}")
    try:
        try:
            return timm.create_model(name, pretrained=False, img_size=img_size, **arch, **kwargs)
        except TypeError as err:
            if "multiple values" not in str(err):
                raise
        torch.manual_seed(seed)
        return _create_overriding_entrypoint(name, arch, img_size=img_size, **kwargs)
    except TypeError as err:
        if "unexpected keyword argument" in str(err):  # an option this timm's model lacks (reg_tokens, ...)
            pytest.skip(f"timm {timm.__version__}: {err}")
        raise


def _create_overriding_entrypoint(name: str, arch: dict, **kwargs) -> torch.nn.Module:
    """timm < 0.9 entrypoints fix patch_size/depth and refuse them as kwargs (``dict(patch_size=16, **kwargs)``).

    They hand their merged kwargs to a module-level ``_create_*`` builder; wrap those builders for one call so the
    test's architecture overrides win, the way timm >= 0.9 entrypoints let them.
    """
    entrypoint = timm.models.model_entrypoint(name)
    module = sys.modules[entrypoint.__module__]
    builders = {key: fn for key, fn in vars(module).items() if key.startswith("_create_") and callable(fn)}
    assert builders, f"{module.__name__} has no _create_* builder to pass {arch} through"

    def overriding(fn):
        def build(*args, **kw):
            kw.update(arch)
            return fn(*args, **kw)
        return build

    try:
        for key, fn in builders.items():
            setattr(module, key, overriding(fn))
        model = entrypoint(pretrained=False, **kwargs)
    finally:
        for key, fn in builders.items():
            setattr(module, key, fn)
    assert len(model.blocks) == arch["depth"], "the depth override did not reach the model"
    return model


def save_tiny_teacher(path, *, num_classes: int = NUM_CLASSES):
    """A small ViT teacher (patch 8, depth 2, width 96) in DeiT's checkpoint format, for the CLI tests."""
    model = tiny("vit_small_patch16_224", patch_size=8, depth=2, embed_dim=96, num_heads=2, num_classes=num_classes)
    torch.save({"model": model.state_dict()}, path)
    return path
